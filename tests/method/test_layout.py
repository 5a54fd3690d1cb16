"""The project's layout, checked on the source (issue #31: a codebase shaped by its reader):

    scripts   train, sample, edit, eval                 (and the lab's tools: python -m shapes.X)
    lab       shapes/: the offline world and our tooling
    measures  metrics, benchmarks                        (what eval.py and edit.py score with)
    arms      lora, whole, counting, trained             (the papers' other arms, the whole denoiser, the file reader)
    core      families, recipe, models, softtokens, prompt, hooks, losses, step, run, data, sampler, files, flags

Imports run one way, downward: a core module imports only core modules, never shapes/, an arm, a measure
or a script; nothing imports a script; there is no import cycle. The scripts are where the shapes world is
chosen (its backbones, its data stream, its counter) and handed to the core."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = [
    "families",
    "recipe",
    "models",
    "softtokens",
    "prompt",
    "hooks",
    "losses",
    "step",
    "run",
    "data",
    "sampler",
    "files",
    "flags",
]
ARMS = ["lora", "whole", "counting", "trained"]
MEASURES = ["metrics", "benchmarks"]
SCRIPTS = ["train", "sample", "edit", "eval"]
LAB_TOOLS = [
    "shapes.pretrain",
    "shapes.bench",
    "shapes.sweep",
    "shapes.report",
    "shapes.gpu_jobs",
    "shapes.counter",
    "shapes.ladder_eval",
]
# what each layer may import from the project (a module may always import within its own layer, except scripts)
ALLOWED = {
    "core": set(CORE),
    "arms": set(CORE) | set(ARMS),
    "measures": set(CORE) | set(MEASURES),
}


def top_level_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def lab_modules():
    return sorted("shapes." + f[:-3] for f in os.listdir(os.path.join(ROOT, "shapes")) if f.endswith(".py"))


def path_of(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def project_imports(module):
    """The project modules that `module` imports, anywhere in its file (`from shapes import X` counts as
    shapes.X; `import shapes` as the package shapes)."""
    known = set(top_level_modules()) | set(lab_modules()) | {"shapes"}
    found = set()
    for node in ast.walk(ast.parse(open(path_of(module)).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known or a.name.split(".")[0] == "shapes"}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "shapes":
                found |= {f"shapes.{a.name}" for a in node.names}
            elif node.module in known or node.module.startswith("shapes."):
                found.add(node.module)
    return found


def layer_of(module):
    for layer, names in (("core", CORE), ("arms", ARMS), ("measures", MEASURES), ("scripts", SCRIPTS)):
        if module in names:
            return layer
    return "lab" if module.startswith("shapes") else None


def test_every_module_has_a_layer():
    unplaced = [m for m in top_level_modules() if layer_of(m) is None]
    assert not unplaced, f"place {unplaced} in a layer of tests/method/test_layout.py"


@pytest.mark.parametrize("module", CORE + ARMS + MEASURES)
def test_imports_run_downward(module):
    upward = project_imports(module) - ALLOWED[layer_of(module)]
    assert not upward, f"{module}.py ({layer_of(module)}) imports {sorted(upward)}, a layer above it"


def test_the_layer_check_fails_on_an_upward_import(tmp_path, monkeypatch):
    """The rule above can fail: a core module that imported the shapes world would be caught."""
    fake_root = tmp_path / "repo"
    fake_root.mkdir()
    (fake_root / "shapes").mkdir()
    (fake_root / "shapes" / "world.py").write_text("")
    (fake_root / "models.py").write_text("import torch\nfrom shapes import world\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(fake_root))
    assert project_imports("models") == {"shapes.world"}


@pytest.mark.parametrize("module", top_level_modules() + lab_modules())
def test_nothing_imports_a_script(module):
    scripts = (set(SCRIPTS) | set(LAB_TOOLS)) - {module}
    assert not project_imports(module) & scripts, f"{module} imports a script"


def test_no_import_cycle():
    modules = top_level_modules() + lab_modules()
    graph = {m: {i for i in project_imports(m) if i in modules and i != m} for m in modules}

    def visit(node, path):
        assert node not in path, "import cycle: " + " -> ".join(path + [node])
        for nxt in graph[node]:
            visit(nxt, path + [node])

    for m in modules:
        visit(m, [])


def test_the_step_branches_on_the_loss_and_calls_each_loss_by_keyword():
    source = open(path_of("step")).read()
    step = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    text = ast.get_source_segment(source, step)
    for loss in ("dsm", "softrepa", "agsm"):
        assert f'args.loss == "{loss}"' in text
    calls = [
        n
        for n in ast.walk(step)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr.endswith("_loss")
    ]
    assert {c.func.attr for c in calls} == {"dsm_loss", "softrepa_loss", "agsm_loss"}
    assert all(not c.args and c.keywords for c in calls), "the step calls each loss with keyword arguments"


def test_train_main_has_no_nested_functions_and_reaches_the_loop_early():
    source = open(path_of("train")).read()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    nested = [n.name for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n is not main]
    assert not nested, f"train.main holds nested functions {nested}"
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.While))
    assert loop.lineno - main.lineno < 100, "the loop is the heart of main: a reader reaches it in the first screens"

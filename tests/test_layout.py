"""The project's layout rules, checked on the source (issue: a reader's codebase):
- the top level is the method, at most 14 files a student opens by name; the shapes world and the lab
  tooling live in shapes/;
- no file above 450 lines; no import cycle; project imports at the top of a file; nothing imports a
  script (train, edit, eval, and the lab's command-line tools);
- train.py and step.py (the file holding the training step) are at least 30% comment lines, docstrings
  included, and the step calls no loss through a table of callables: each loss is an explicit branch."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = [
    "families",
    "models",
    "softtokens",
    "lora",
    "hooks",
    "losses",
    "step",
    "data",
    "sample",
    "metrics",
    "benchmarks",
    "train",
    "edit",
    "eval",
]
LAB = [
    "shapes/__init__",
    "shapes/world",
    "shapes/checker",
    "shapes/classifier",
    "shapes/pretrain",
    "shapes/bench",
    "shapes/sweep",
    "shapes/report",
    "shapes/gpu_jobs",
    "shapes/counter",
    "shapes/ladder_eval",
]
SCRIPTS = {
    "train",
    "edit",
    "eval",
    "shapes.pretrain",
    "shapes.bench",
    "shapes.sweep",
    "shapes.report",
    "shapes.gpu_jobs",
    "shapes.counter",
    "shapes.ladder_eval",
}
MAX_LINES = 450


def source(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        return f.read()


def module_name(name):
    return name.replace("/__init__", "").replace("/", ".")


def project_imports(name):
    """[(module, at_top)] of the project modules `name` imports (shapes.X for `from shapes import X`)."""
    known = {module_name(n) for n in METHOD + LAB}
    found = []
    module = ast.parse(source(name))
    top = {id(n) for n in module.body} | {id(n) for n in module.body if isinstance(n, ast.If) for n in ast.walk(n)}
    for node in ast.walk(module):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in known:
                found.append((n, id(node) in top))
    return found


def test_the_top_level_is_the_method_and_the_lab_is_in_shapes():
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top == set(METHOD)
    lab = {"shapes/" + f[:-3] for f in os.listdir(os.path.join(ROOT, "shapes")) if f.endswith(".py")}
    assert lab == set(LAB)


@pytest.mark.parametrize("name", METHOD + LAB)
def test_imports_at_the_top_and_never_of_a_script(name):
    for module, at_top in project_imports(name):
        assert module not in SCRIPTS or module == module_name(name), f"{name}.py imports the script {module}"
        assert at_top, f"{name}.py imports {module} inside a function: project imports go at the top"


def test_no_import_cycle():
    names = {module_name(n): n for n in METHOD + LAB}
    graph = {m: {i for i, _ in project_imports(n) if i != m} for m, n in names.items()}

    def visit(node, path):
        assert node not in path, "import cycle: " + " -> ".join(path + [node])
        for nxt in graph.get(node, ()):
            if nxt != "shapes" or node.startswith("shapes.") is False:
                visit(nxt, path + [node])

    for m in graph:
        visit(m, [])


def test_the_step_branches_on_the_loss_and_calls_no_table_of_callables():
    for name in ("train", "step"):
        assert not re.search(r"\]\s*\[\s*[\"'][a-z_]+[\"']\s*\]\s*\(", source(name)), name
        assert "objective](" not in source(name)
    step = next(n for n in ast.parse(source("step")).body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    text = ast.get_source_segment(source("step"), step)
    for loss in ("dsm", "softrepa", "agsm"):
        assert f'args.loss == "{loss}"' in text

"""The project's layout rules, checked on the source: library files never import scripts, scripts import
only library files and only at the top, no import cycle, no file above 450 lines, and train_step (the
step a reader follows beside AGSM Alg. 1) stays within 60 lines."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ["families", "models", "softtokens", "hooks", "losses", "data", "shapes", "checker", "classifier",
           "metrics", "sampler", "step"]
SCRIPTS = ["train", "sample", "edit", "eval", "pretrain", "bench", "sweep", "report"]
MAX_LINES = 450


def tree(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        return ast.parse(f.read())


def project_imports(name):
    """[(module, at_top)] of the project modules `name` imports."""
    found = []
    module = tree(name)
    top = {id(n) for n in module.body}
    for node in ast.walk(module):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for n in names:
            if n in LIBRARY + SCRIPTS:
                found.append((n, id(node) in top))
    return found


def test_every_python_file_is_library_or_script():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == set(LIBRARY + SCRIPTS)


@pytest.mark.parametrize("name", LIBRARY + SCRIPTS)
def test_imports_follow_the_library_script_split(name):
    for module, at_top in project_imports(name):
        assert module in LIBRARY, f"{name}.py imports the script {module}.py"
        assert at_top, f"{name}.py imports {module} inside a function: project imports go at the top"


def test_no_import_cycle_among_library_files():
    graph = {name: {m for m, _ in project_imports(name)} for name in LIBRARY}

    def visit(node, path):
        assert node not in path, "import cycle: " + " -> ".join(path + [node])
        for nxt in graph[node]:
            visit(nxt, path + [node])
    for name in LIBRARY:
        visit(name, [])


@pytest.mark.parametrize("name", LIBRARY + SCRIPTS)
def test_files_are_readable_in_one_sitting(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        assert len(f.read().splitlines()) <= MAX_LINES


def test_train_step_fits_on_a_page():
    step = next(n for n in tree("step").body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    assert step.end_lineno - step.lineno + 1 <= 60

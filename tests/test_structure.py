"""The shape of the code: no import cycle between the project's modules, each importable on its own."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))


def project_imports(module):
    """Project modules that `module` imports anywhere in its file (top level or inside functions)."""
    with open(os.path.join(REPO, f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_the_import_graph_has_no_cycle():
    graph = {m: project_imports(m) for m in MODULES}
    assert {"data", "models", "common", "finetune", "study", "report", "download"} <= set(graph)
    order, visiting, done = [], set(), set()

    def visit(node, path):
        assert node not in visiting, f"import cycle: {' -> '.join(path + [node])}"
        if node in done:
            return
        visiting.add(node)
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        visiting.discard(node)
        done.add(node)
        order.append(node)

    for module in MODULES:
        visit(module, [])
    assert graph["common"] == set() and graph["data"] == {"common"}  # the bottom of the graph
    assert "report" not in graph["study"]  # the study runs report.py as its own stage, through the output directory


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_interpreter():
    """Run concurrently: one fresh interpreter per module; data must not pull in models."""
    check = ("import sys, importlib; m = sys.argv[1]; importlib.import_module(m); "
             "assert m != 'data' or 'models' not in sys.modules, 'data imported models'")
    procs = {m: subprocess.Popen([sys.executable, "-c", check, m], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for m in MODULES}
    failures = {m: p.communicate()[1][-500:] for m, p in procs.items() if p.wait() != 0}
    assert not failures, failures

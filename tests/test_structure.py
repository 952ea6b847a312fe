"""The shape of the code: no import cycle between the project's modules, each importable on its own;
bench/gpu.sh within the time a lent device gives."""

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


# ----------------------------------------------------------------------------- where things live

def _code_lines(module):
    """The lines of a module's code, comments and docstrings left out (what a grep should judge)."""
    with open(os.path.join(REPO, f"{module}.py"), encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            first = node.body[0]
            docstrings |= set(range(first.lineno, first.end_lineno + 1))
    return [(n, line.split("#")[0]) for n, line in enumerate(source.splitlines(), 1) if n not in docstrings]


def test_no_stage_branches_on_a_task_name_or_kind():
    """What differs between tasks is a field of data.TASKS (and of data.KINDS); no module asks
    `task == ...` or `kind == ...`. Checked on this very test: the pattern finds a planted branch."""
    import re
    pattern = re.compile(r"""\b(task|kind|args\.task)\s*(==|!=)|(==|!=)\s*["'](xquad|xlsum|squad|qa|summarization)["']""")
    assert pattern.search('if args.task == "xquad":') and pattern.search('elif kind == "qa":')
    assert pattern.search('if name != "xlsum"') and not pattern.search('split == "text"')
    found = [f"{m}.py:{n}: {line.strip()}" for m in MODULES + [f"bench/{b[:-3]}" for b in os.listdir(os.path.join(REPO, "bench"))
                                                             if b.endswith(".py")]
             for n, line in _code_lines(m) if pattern.search(line)]
    assert found == []


def test_report_reads_the_plan_module_not_the_study():
    assert "study" not in project_imports("report")
    assert "plan" in project_imports("report") and "plan" in project_imports("study")


def test_the_study_holds_no_scheduler_code():
    """study.py is the protocol; how a command runs (SLURM, heartbeats, forks) is launch.py's."""
    words = ("sbatch", "squeue", "scancel", "heartbeat", "forkserver", "subprocess", "SLURM")
    found = [f"study.py:{n}: {line.strip()}" for n, line in _code_lines("study") if any(w in line for w in words)]
    assert found == []
    assert {"sbatch", "squeue", "heartbeat", "forkserver"} <= {w for w in words for _, line in _code_lines("launch") if w in line}


def test_gpu_sh_step_limits_add_up_to_its_header_and_fit_eight_minutes(tmp_path):
    """bench/gpu.sh has to finish in under 8 minutes (issue 23; a lent device has ~15 minutes in
    all, its start included). Its steps' `timeout` limits are collected by running the script with
    `timeout`, `nvidia-smi`, python and bash replaced by recorders that run nothing; they must add
    up to the figure its header states (it said 445 s when the limits were 465 s) and leave 15 s of
    the 480 for the pricing at the end (cost.py and two dry runs, no limit of their own: 12 s on
    2 cores, run at once; one after another they took 21 s)."""
    import re
    bin_dir, log = tmp_path / "bin", tmp_path / "limits"
    bin_dir.mkdir()
    (bin_dir / "timeout").write_text(f'#!/bin/sh\necho "$1" >> "{log}"\n')
    for name in ("nvidia-smi", "bash", "python"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), OUT="")
    subprocess.run(["/bin/bash", os.path.join(REPO, "bench", "gpu.sh"), str(tmp_path / "data")], env=env,
                   capture_output=True, timeout=60)
    limits = [int(line) for line in log.read_text().split()]
    with open(os.path.join(REPO, "bench", "gpu.sh"), encoding="utf-8") as f:
        stated = int(re.search(r"time\s+(?:#\s+)?limit, (\d+) s in all", f.read()).group(1))
    assert len(limits) == 5  # training, mT5 decoding, mBART and NLLB decoding, beam search
    assert sum(limits) == stated
    assert stated <= 8 * 60 - 15

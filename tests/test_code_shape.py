"""The code's shape, checked: dependencies point one way, and importing a module has no side effects on logging."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray_jobs", "serve_app")


def _files(package: str) -> dict[str, Path]:
    """module name -> file, subpackages included; `__main__` (it runs a command when imported) left out."""
    out = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _modules(package: str) -> list[str]:
    return sorted(_files(package))


FILES = {name: path for package in PACKAGES for name, path in _files(package).items()}
CLI = "ray_jobs.cli"


def _imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too); for
    `from package import name`, also `package.name` (it may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    return {name: {m for m in _imported(path) if m in FILES and m != name} for name, path in FILES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_ray_jobs_never_imports_serve_app():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imported(p) if n.split(".")[0] == "serve_app")
        for p in (ROOT / "ray_jobs").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, "ray_jobs must not depend on serve_app"


def test_no_import_circle_among_project_modules():
    assert _cycles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    # The check above must fail on a circle, also one through a lazy import three modules long.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_imports_the_commands_and_only_commands_parse_argv():
    """Commands (ray_jobs.cli) parse, call the library and print; the library never imports them, and no
    library module builds an argument parser or reads sys.argv (the process entries of a model worker,
    of the fork server and of the HAProxy wrapper read their own, documented arguments)."""
    graph = _graph()
    importers = {m for m, deps in graph.items() if not m.startswith(CLI) and any(d.startswith(CLI) for d in deps)}
    assert importers == set()
    entries = {"serve_app.model_worker", "serve_app.haproxy", "serve_app.fork_server"}
    parsing = {
        name
        for name, path in FILES.items()
        if not name.startswith(CLI)
        and name not in entries
        and ("argparse" in _imported(path) or "sys.argv" in path.read_text())
    }
    assert parsing == set()


def test_the_import_graph_check_sees_lazy_imports(tmp_path):
    # The check above must catch an import hidden in a function body, the way one would creep in.
    f = tmp_path / "m.py"
    f.write_text("def deploy():\n    from serve_app.app import build_app\n    return build_app\n")
    assert "serve_app.app" in _imported(f)


def test_importing_any_module_adds_no_log_handler():
    # A fresh interpreter: import every module of both packages, then look at the loggers they own and
    # at the root logger. Entry points configure logging in main(); an import must not.
    code = f"""
import importlib, json, logging
before = list(logging.getLogger().handlers)
for name in {json.dumps(sorted(FILES))}:
    importlib.import_module(name)
ours = {{name: len(logging.getLogger(name).handlers) for name in logging.root.manager.loggerDict
         if name.split(".")[0] in {list(PACKAGES)!r}}}
print(json.dumps({{"root_added": len(logging.getLogger().handlers) - len(before), "ours": ours}}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["root_added"] == 0
    assert not any(seen["ours"].values()), seen["ours"]


def test_entry_points_configure_logging_once():
    # A fresh interpreter, as a command starts: two calls, one handler; records reach stderr once.
    code = """
import logging
from ray_jobs.runtime import LOGGERS, configure_logging
configure_logging(); configure_logging()
print([len(logging.getLogger(name).handlers) for name in LOGGERS])
logging.getLogger("ray_jobs.train").info("hello from a worker")
logging.getLogger("ray_jobs.train").debug("not shown at INFO")
logging.getLogger("__main__").info("from python -m ray_jobs pipeline")  # an entry point's own name
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1, 1, 1]"
    assert r.stderr.count("INFO ray_jobs.train: hello from a worker") == 1 and "not shown" not in r.stderr
    assert "INFO __main__: from python -m ray_jobs pipeline" in r.stderr


@pytest.mark.parametrize(
    "module, command",
    [
        ("pipeline", "pipeline"),
        ("train", "train"),
        ("tune", "tune"),
        ("deploy", "deploy"),
        ("evaluate", "evaluate"),
        ("behaviour", "behaviour"),
        ("registry", "registry"),
        ("onnx_runtime", "onnx"),
    ],
)
def test_a_former_entry_point_fails_and_names_the_command(module, command):
    """`python -m ray_jobs.pipeline` was the command before ray_jobs.cli: a script or `ray job submit` that
    still runs it must fail (a job that "succeeded" having done nothing would hide it), naming the new form."""
    import runpy
    import warnings

    with pytest.raises(SystemExit) as done, warnings.catch_warnings():
        # runpy warns that the module was imported already (by other tests): running it again is the point.
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module(f"ray_jobs.{module}", run_name="__main__")
    assert f"python -m ray_jobs {command}" in str(done.value.code)

"""The code's shape, checked: dependencies point one way, and importing a module has no side effects on logging."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray_jobs", "serve_app")


def _modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" if p.stem != "__init__" else package for p in (ROOT / package).glob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_ray_jobs_never_imports_serve_app():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imported(p) if n.split(".")[0] == "serve_app")
        for p in (ROOT / "ray_jobs").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, "ray_jobs must not depend on serve_app"


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
for name in {json.dumps([m for p in PACKAGES for m in _modules(p)])}:
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
logging.getLogger("__main__").info("from python -m ray_jobs.pipeline")  # an entry point's own name
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1, 1, 1]"
    assert r.stderr.count("INFO ray_jobs.train: hello from a worker") == 1 and "not shown" not in r.stderr
    assert "INFO __main__: from python -m ray_jobs.pipeline" in r.stderr

"""The commands: `python -m ray_jobs <command> [args]` (or the `sentiment-ray` script pip installs).

Each command is a module here with `main(argv) -> exit code`: it parses its arguments, calls one library
function and prints. Nothing in the library imports this package, so the commands can change freely.
"""

from __future__ import annotations

import importlib
import sys

# command -> one line of help; the module is ray_jobs.cli.<command>.
COMMANDS = {
    "pipeline": "tune, register, gate and serve: the whole job",
    "train": "fine-tune with Ray Train (no search, no registry); prints the best checkpoint",
    "tune": "search hyper-parameters with Ray Tune (no registry, no gate)",
    "evaluate": "metrics of any model on any labelled file",
    "behaviour": "the behavioural test suite on any model",
    "deploy": "deploy the champion with Ray Serve, or hot-swap a running app to it",
    "registry": "versions, aliases, rollback, promotion, and challengers on live traffic",
    "retrain": "when a trigger fires, retrain on production labels and shadow the result",
    "onnx": "export a version to ONNX once and guard its accuracy",
    "config": "every config key with its value, type and meaning",
    "ingress-env": "the environment `ray start` needs for ray.serve_ingress (eval it before ray start)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "usage: python -m ray_jobs <command> [--help] [args]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"unknown command {name!r}\n\n" + usage())
        return 2
    # `ray job stop` sends SIGTERM (SIGKILL 3 s later): handled as Ctrl-C, so that cleanup runs (the
    # pipeline's MLflow run ends KILLED). Only in the process entry: code that calls a command's main()
    # keeps its own signal handling.
    from ray_jobs.runtime import interrupt_on_sigterm

    interrupt_on_sigterm()
    return importlib.import_module(f"ray_jobs.cli.{name.replace('-', '_')}").main(rest)

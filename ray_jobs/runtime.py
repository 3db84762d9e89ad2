"""Process-level plumbing shared by the entry points: logging, the `--config/--set` CLI, Ray start-up, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ray_jobs.config import PipelineConfig, RayConfig, load_config

# Exit codes of every `python -m ray_jobs.*` command.
EXIT_OK = 0  # success (pipeline: the challenger was promoted)
EXIT_FAILURE = 1  # something broke; nothing was promoted
EXIT_USAGE = 2  # bad config, bad arguments or bad input data
EXIT_BLOCKED = 3  # pipeline/gate: a valid run whose challenger the gate did not promote


def get_logger(name: str) -> logging.Logger:
    """A logger that prints `time level name: message` to stderr, configured once per process
    (Ray workers are separate processes, so this runs in each of them on first use)."""
    root = logging.getLogger("ray_jobs")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("RAY_JOBS_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("ray_jobs") else f"ray_jobs.{name}")


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file, e.g. tune_configs/quickstart.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-5 (repeatable; the value is YAML)",
    )
    return parser


def load_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def absolute(path: str) -> str:
    """Ray and MLflow want absolute local paths; URIs (s3://, gs://, ...) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def init_ray(cfg: RayConfig, runtime_env: dict | None = None) -> None:
    """Connect to the configured cluster, a running local cluster (`ray start`) or RAY_ADDRESS;
    else start one in this process. Keeps the dashboard on: Tune needs it to release the
    resources of trials it stops early."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"address": cfg.address, "runtime_env": runtime_env, "include_dashboard": True, "log_to_driver": True}
    if cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    try:
        ray.init(**kwargs)
    except ValueError as err:
        # num_cpus is only allowed when starting a new cluster: drop it when connecting to one.
        if "num_cpus" in kwargs and "existing cluster" in str(err):
            kwargs.pop("num_cpus")
            ray.init(**kwargs)
        else:
            raise


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM: keeps an in-process Ray (and its Serve app) alive."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass

"""`python -m ray_jobs ingress-env [--config FILE] [--set ...]`: the environment a `ray start` needs for the
config's `ray.serve_ingress` (`auto`: what this install runs, haproxy on Linux), as shell `export` lines.
Serve reads its ingress mode when a node starts, so on every node of a `ray start`/`ray up` cluster:

    eval "$(python -m ray_jobs ingress-env)" && ray start ...
"""

from __future__ import annotations

import shlex
import sys

from ray_jobs.cli.common import EXIT_OK, config_parser, load_from_args, run
from ray_jobs.runtime import resolve_serve_ingress, serve_ingress_env


def main(argv: list[str] | None = None) -> int:
    p = config_parser(
        "ingress-env",
        "Print the environment `ray start` needs for the config's ray.serve_ingress, as shell export lines.",
        config_required=False,
    )
    args = p.parse_args(argv)

    def body() -> int:
        mode = load_from_args(args).ray.serve_ingress
        sys.stdout.write(f"# ray.serve_ingress={mode}: {resolve_serve_ingress(mode)}\n")
        for key, value in serve_ingress_env(mode).items():
            sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
        return EXIT_OK

    return run(body, "ingress-env")

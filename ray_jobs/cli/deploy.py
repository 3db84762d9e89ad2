"""`python -m ray_jobs deploy --config FILE [--block]`: deploy the champion with Ray Serve, or hot-swap a
running app to it; prints the endpoint URL."""

from __future__ import annotations

import logging

from ray_jobs.cli.common import EXIT_OK, config_parser, load_from_args, run
from ray_jobs.deploy import deploy_champion
from ray_jobs.errors import ConfigError
from ray_jobs.runtime import wait_until_interrupted

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("deploy", "Deploy the champion with Ray Serve, or hot-swap a running app to it.")
    parser.add_argument(
        "--block", action="store_true", help="stay up until Ctrl-C/SIGTERM (containers, in-process Ray)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        version, url = deploy_champion(load_from_args(args))
        log.info("serving version %s at %s", version, url)
        print(url, flush=True)
        if args.block:
            wait_until_interrupted()
        return EXIT_OK

    return run(body, "deploy", usage_errors=(ConfigError,))

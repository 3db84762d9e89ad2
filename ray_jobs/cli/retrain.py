"""`python -m ray_jobs retrain --config FILE [--force] [--no-deploy]`: check the retraining triggers and,
if one fires, train the next version on the base data plus the labelled production reviews, gate it,
and put it in shadow (ray_jobs.retrain). Run it from cron, or as a `ray job submit` entry point:

    ray job submit --working-dir . -- python -m ray_jobs retrain --config tune_configs/imdb.yaml

Exit codes: 0 nothing fired, a run in flight or a rollout undecided (nothing started), or a run that put
its version in shadow (or promoted a first model); 3 a run whose version the gate blocked; 2 bad config;
1 failure; 130 interrupted.
"""

from __future__ import annotations

import logging

from ray_jobs.cli.common import EXIT_BLOCKED, EXIT_OK, config_parser, load_from_args, run
from ray_jobs.errors import ConfigError, DataError
from ray_jobs.retrain import retrain
from ray_jobs.runtime import with_cluster_addresses

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("retrain", "Retrain on production labels when a trigger fires; the result goes to shadow.")
    parser.add_argument("--force", action="store_true", help="run even if no trigger fired")
    parser.add_argument("--no-deploy", action="store_true", help="record the shadow; the next deploy applies it")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = with_cluster_addresses(load_from_args(args))
        result = retrain(cfg, force=args.force, deploy_app=not args.no_deploy)
        fired = "; ".join(result.reasons) or "nothing"
        print(f"fired          {fired}")
        print(f"retrain        {'started' if result.started else 'not started'}: {result.message}")
        if result.started:
            print(f"run            {result.run_id}, version {result.version}")
            if result.shadowed:
                print(
                    f"shadow         v{result.version}: decide with "
                    f"python -m ray_jobs registry ... promote {result.version}"
                )
        return EXIT_BLOCKED if result.started and not result.promote else EXIT_OK

    return run(body, "retrain", usage_errors=(ConfigError, DataError))

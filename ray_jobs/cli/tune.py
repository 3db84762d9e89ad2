"""`python -m ray_jobs tune --config FILE [--resume EXPERIMENT_PATH]`: search hyper-parameters with Ray Tune
(no registry, no gate); prints the best trial's checkpoint folder."""

from __future__ import annotations

import logging

from ray_jobs.cli.common import EXIT_OK, config_parser, run, start_training
from ray_jobs.errors import ConfigError, DataError
from ray_jobs.tune import CHECKPOINT_KEY, run_search

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("tune", "Search hyper-parameters with Ray Tune (no registry, no gate).")
    parser.add_argument("--resume", metavar="EXPERIMENT_PATH", help="continue an interrupted search from its folder")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg, data, meta = start_training(args)
        best = run_search(cfg, data, meta, restore_path=args.resume).best_trial
        log.info(
            "best trial %s by %s: val_loss %.4f val_f1 %.4f, checkpoint %s",
            best.trial_id,
            best.select_by,
            best.best["val_loss"],
            best.best["val_f1"],
            best.best[CHECKPOINT_KEY],
        )
        print(best.best[CHECKPOINT_KEY])
        return EXIT_OK

    return run(body, "search", usage_errors=(ConfigError, DataError))

"""`python -m ray_jobs train --config FILE`: fine-tune with Ray Train (no search, no registry); prints the
best checkpoint folder, the one line of stdout, for scripts."""

from __future__ import annotations

import logging

from ray_jobs.cli.common import EXIT_OK, config_parser, run, start_training
from ray_jobs.errors import ConfigError, DataError
from ray_jobs.train import best_checkpoint, fit, system_settings

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = config_parser(
        "train", "Fine-tune the sentiment classifier with Ray Train (no search, no registry)."
    ).parse_args(argv)

    def body() -> int:
        cfg, data, meta = start_training(args)
        result = fit(cfg, system_settings(cfg, data, meta))
        path, metrics = best_checkpoint(result, cfg.train.select_by)
        log.info(
            "best checkpoint by %s (val_loss %.4f, val_f1 %.4f, epoch %.2f): %s",
            cfg.train.select_by,
            metrics["val_loss"],
            metrics["val_f1"],
            metrics["epoch"],
            path,
        )
        print(path)
        return EXIT_OK

    return run(body, "training", usage_errors=(ConfigError, DataError))

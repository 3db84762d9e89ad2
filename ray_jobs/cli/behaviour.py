"""`python -m ray_jobs behaviour --model REF [--json]`: the behavioural test suite (ray_jobs.behaviour) on
any model."""

from __future__ import annotations

import json

from ray_jobs.behaviour import format_report, run_on_model
from ray_jobs.cli.common import EXIT_OK, add_model_argument, config_parser, load_from_args, run
from ray_jobs.registry import Registry
from ray_jobs.runtime import with_cluster_addresses


def main(argv: list[str] | None = None) -> int:
    p = config_parser("behaviour", "Run the behavioural test suite on a sentiment model.", config_required=False)
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)

    def body() -> int:
        cfg = with_cluster_addresses(load_from_args(args))
        model_dir = Registry(cfg.registry).resolve_model_dir(args.model)
        report = run_on_model(model_dir, cfg.gate.eval_batch_size)
        print(json.dumps({"model": args.model, **report.to_dict()}) if args.json else format_report(report))
        return EXIT_OK

    return run(body, "behavioural suite")

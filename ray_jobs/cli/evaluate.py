"""`python -m ray_jobs evaluate --model REF --data FILE [--json]`: metrics of any model on a labelled file.

The config (default: the built-in one) supplies the registry, the column names (`data.text_column`,
`data.label_column`) and the batch size (`gate.eval_batch_size`), as it does for the gate.
"""

from __future__ import annotations

import json

from ray_jobs.cli.common import EXIT_OK, add_model_argument, config_parser, load_from_args, run
from ray_jobs.data import load_file
from ray_jobs.evaluate import evaluate_dir, report
from ray_jobs.registry import Registry
from ray_jobs.runtime import with_cluster_addresses


def main(argv: list[str] | None = None) -> int:
    p = config_parser(
        "evaluate", "Evaluate a sentiment model on a labelled .parquet/.csv/.jsonl file.", config_required=False
    )
    add_model_argument(p)
    p.add_argument("--data", required=True, help="labelled file (.parquet, .csv, .jsonl)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        help="default: the config's gate.precision (as the gate scores)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)

    def body() -> int:
        cfg = with_cluster_addresses(load_from_args(args))
        split = load_file(args.data, cfg.data.text_column, cfg.data.label_column)
        model_dir = Registry(cfg.registry).resolve_model_dir(args.model)
        precision = args.precision or cfg.gate.precision
        out = report(evaluate_dir(model_dir, split, cfg.gate.eval_batch_size, precision, name=args.model))
        if args.json:
            print(json.dumps(out))
        else:
            print(f"model     {out['model']}\nsamples   {out['n']}\ndigest    {out['data_digest']}")
            for k in ("accuracy", "precision", "recall", "f1"):
                print(f"{k:<9} {out[k]:.4f}")
        return EXIT_OK

    return run(body, "evaluation")

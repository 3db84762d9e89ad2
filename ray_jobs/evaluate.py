"""Metrics of a model on a labelled split. Used by the gate, the benchmarks and the command line:

    python -m ray_jobs.evaluate --model <models:/name@alias | version | folder> --data <file> [--json]
        [--config tune_configs/quickstart.yaml] [--set data.text_column=review --set data.label_column=y]

The config (default: the built-in one) supplies the registry, the column names (`data.text_column`,
`data.label_column`) and the batch size (`gate.eval_batch_size`), as it does for the gate.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from ray_jobs.data import Split, load_file
from ray_jobs.drift import Reference
from ray_jobs.errors import SentimentError
from ray_jobs.gate import Evaluation, evaluation_from
from ray_jobs.inference import Predictor
from ray_jobs.runtime import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_model_argument,
    config_parser,
    configure_logging,
    load_from_args,
    with_cluster_addresses,
)

log = logging.getLogger(__name__)


def evaluate_dir(
    model_dir: str,
    split: Split,
    batch_size: int = 64,
    precision: str = "fp32",
    num_threads: int | None = None,
    name: str = "",
) -> Evaluation:
    """Predictions of the model in `model_dir` on `split`, with the split's digest."""
    predictor = Predictor(model_dir, num_threads=num_threads, precision=precision, batch_size=batch_size)
    preds = predictor.predict_proba(split.texts).argmax(axis=1)
    return evaluation_from(split.labels, preds.tolist(), split.digest(), name or model_dir)


def evaluate_and_profile(
    model_dir: str, split: Split, batch_size: int = 64, precision: str = "fp32", name: str = ""
) -> tuple[Evaluation, Reference]:
    """`evaluate_dir`, and from the same forward pass the model's drift reference profile on `split`
    (held-out text: what served traffic is compared with, ray_jobs.drift)."""
    predictor = Predictor(model_dir, precision=precision, batch_size=batch_size)
    _, features = predictor.predict_features(split.texts)
    reference = Reference.from_features(
        features, {"data_digest": split.digest(), "precision": precision, "created_at": time.time()}
    )
    return evaluation_from(split.labels, features.label.tolist(), split.digest(), name or model_dir), reference


def report(ev: Evaluation) -> dict:
    return {**{k: round(v, 6) for k, v in ev.metrics.items()}, "n": ev.n, "data_digest": ev.digest, "model": ev.model}


def main(argv: list[str] | None = None) -> int:
    p = config_parser("Evaluate a sentiment model on a labelled .parquet/.csv/.jsonl file.", config_required=False)
    add_model_argument(p)
    p.add_argument("--data", required=True, help="labelled file (.parquet, .csv, .jsonl)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        help="default: the config's gate.precision (as the gate scores)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    configure_logging()
    try:
        from ray_jobs.registry import Registry

        cfg = with_cluster_addresses(load_from_args(args))
        split = load_file(args.data, cfg.data.text_column, cfg.data.label_column)
        model_dir = Registry(cfg.registry).resolve_model_dir(args.model)
        precision = args.precision or cfg.gate.precision
        ev = evaluate_dir(model_dir, split, cfg.gate.eval_batch_size, precision, name=args.model)
    except SentimentError as err:
        log.error("%s", err)
        return EXIT_USAGE
    except Exception as err:
        log.error("evaluation failed: %s: %s", type(err).__name__, err)
        return EXIT_FAILURE
    out = report(ev)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"model     {out['model']}\nsamples   {out['n']}\ndigest    {out['data_digest']}")
        for k in ("accuracy", "precision", "recall", "f1"):
            print(f"{k:<9} {out[k]:.4f}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Metrics of a model on a labelled split. Used by the gate, the benchmarks and the command line:

    python -m ray_jobs.evaluate --model <models:/name@alias | version | folder> --data <file> [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_jobs.data import Split, load_file
from ray_jobs.errors import SentimentError
from ray_jobs.gate import Evaluation, evaluation_from
from ray_jobs.runtime import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, get_logger

log = get_logger("ray_jobs.evaluate")


def evaluate_dir(model_dir: str, split: Split, batch_size: int = 64, precision: str = "fp32", num_threads: int | None = None, name: str = "") -> Evaluation:
    """Predictions of the model in `model_dir` on `split`, with the split's digest."""
    from serve_app.predictor import Predictor

    predictor = Predictor(model_dir, num_threads=num_threads, precision=precision, batch_size=batch_size)
    preds = predictor.predict_proba(split.texts).argmax(axis=1)
    return evaluation_from(split.labels, preds.tolist(), split.digest(), name or model_dir)


def report(ev: Evaluation) -> dict:
    return {**{k: round(v, 6) for k, v in ev.metrics.items()}, "n": ev.n, "data_digest": ev.digest, "model": ev.model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a sentiment model on a labelled .parquet/.csv/.jsonl file.")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, a version number, or a model folder")
    p.add_argument("--data", required=True, help="labelled file (.parquet, .csv, .jsonl)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for registry models (default: the embedded store)")
    p.add_argument("--model-name", default="sentiment-distilbert", help="registered model name for a bare version number")
    p.add_argument("--registry-root", default="runs/mlflow", help="root of the embedded MLflow store")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    try:
        split = load_file(args.data, args.text_column, args.label_column)
        from ray_jobs.config import RegistryConfig
        from ray_jobs.registry import Registry

        reg = Registry(RegistryConfig(tracking_uri=args.tracking_uri, root=args.registry_root, model_name=args.model_name))
        model_dir = reg.resolve_model_dir(args.model)
        ev = evaluate_dir(model_dir, split, args.batch_size, args.precision, name=args.model)
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

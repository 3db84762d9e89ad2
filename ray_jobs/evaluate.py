"""Metrics of a model on a labelled split. Used by the gate, the benchmarks and the command line:

    python -m ray_jobs evaluate --model <models:/name@alias | version | folder> --data <file> [--json]
        [--config tune_configs/quickstart.yaml] [--set data.text_column=review --set data.label_column=y]

The config (default: the built-in one) supplies the registry, the column names (`data.text_column`,
`data.label_column`) and the batch size (`gate.eval_batch_size`), as it does for the gate.
"""

from __future__ import annotations

import logging
import time

from ray_jobs.data import Split
from ray_jobs.drift import Reference
from ray_jobs.gate import Evaluation, evaluation_from
from ray_jobs.inference import Predictor

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


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.evaluate is no command: run `python -m ray_jobs evaluate`")

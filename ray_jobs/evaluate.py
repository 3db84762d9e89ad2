"""Metrics of a model on a labelled split. Used by the gate, the benchmarks and the command line:

    python -m ray_jobs evaluate --model <models:/name@alias | version | folder> --data <file> [--json]
        [--config tune_configs/quickstart.yaml] [--set data.text_column=review --set data.label_column=y]

The config (default: the built-in one) supplies the registry, the column names (`data.text_column`,
`data.label_column`) and the batch size (`gate.eval_batch_size`), as it does for the gate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ray_jobs.data import Split, unit_hash
from ray_jobs.drift import REFERENCE_EMBEDDINGS, Features, Reference
from ray_jobs.gate import Evaluation, evaluation_from
from ray_jobs.inference import Predictor
from ray_jobs.ingest import BLOCK_ROWS, StreamedTest, quiet_data_context

log = logging.getLogger(__name__)


def evaluate_dir(
    model_dir: str,
    split: Split | StreamedTest,
    batch_size: int = 64,
    precision: str = "fp32",
    num_threads: int | None = None,
    name: str = "",
) -> Evaluation:
    """Predictions of the model in `model_dir` on `split`, with the split's digest."""
    if isinstance(split, StreamedTest):
        return score_streamed(model_dir, split, batch_size, precision, name or model_dir)[0]
    predictor = Predictor(model_dir, num_threads=num_threads, precision=precision, batch_size=batch_size)
    preds = predictor.predict_proba(split.texts).argmax(axis=1)
    return evaluation_from(split.labels, preds.tolist(), split.digest(), name or model_dir)


def evaluate_and_profile(
    model_dir: str, split: Split | StreamedTest, batch_size: int = 64, precision: str = "fp32", name: str = ""
) -> tuple[Evaluation, Reference]:
    """`evaluate_dir`, and from the same forward pass the model's drift reference profile on `split`
    (held-out text: what served traffic is compared with, ray_jobs.drift)."""
    meta = {"data_digest": split.digest() if isinstance(split, Split) else split.digest}
    meta |= {"precision": precision, "created_at": time.time()}
    if isinstance(split, StreamedTest):
        ev, features = score_streamed(model_dir, split, batch_size, precision, name or model_dir, profile=True)
        return ev, Reference(features, {"n": len(split), **meta})
    predictor = Predictor(model_dir, precision=precision, batch_size=batch_size)
    _, features = predictor.predict_features(split.texts)
    reference = Reference.from_features(features, meta)
    return evaluation_from(split.labels, features.label.tolist(), split.digest(), name or model_dir), reference


# Scalar drift features per text, as score_streamed's map returns them.
_SCALARS = {"confidence": np.float32, "length": np.int32, "unk": np.float32, "truncated": bool}


class _Scorer:
    """A Ray Data actor: the model (its folder's files, from the object store: the driver's folder
    need not exist on this node) scoring blocks of a test split."""

    def __init__(self, files_ref, batch_size: int, precision: str, embed_share: float):
        import tempfile

        import ray

        folder = Path(tempfile.mkdtemp(prefix="sentiment-scorer-"))
        for name, data in ray.get(files_ref).items():
            (folder / name).write_bytes(data)
        self.predictor = Predictor(folder, num_threads=1, precision=precision, batch_size=batch_size)
        self.embed_share = embed_share

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch["text"].to_pylist()
        _, f = self.predictor.predict_features(texts)
        orders = batch["order"].to_pylist()
        # A share of the [CLS] vectors, picked by each row's order key (the same rows whatever the blocks).
        keep = [unit_hash(str(o), "reference") < self.embed_share for o in orders]
        emb = [row.astype(np.float32).tolist() if k else None for row, k in zip(f.embedding, keep, strict=True)]
        return pa.table(
            {
                "order": batch["order"],
                "label": batch["label"],
                "pred": pa.array(f.label, pa.int8()),
                **{k: pa.array(getattr(f, k)) for k in _SCALARS},
                "embedding": pa.array(emb, pa.list_(pa.float32())),
            }
        )


def _model_files(model_dir: str) -> dict[str, bytes]:
    """What a Predictor loads from a model folder (weights, tokenizer, config, meta): no checkpoint's
    training state."""
    from ray_jobs.train_worker import RESUME_FILES

    return {f.name: f.read_bytes() for f in Path(model_dir).iterdir() if f.is_file() and f.name not in RESUME_FILES}


# Texts per scoring actor at most: an actor costs seconds to start (torch, the model), worth it only for
# that many texts or more.
TEXTS_PER_SCORER = 20_000


def _scorers(n: int) -> int:
    """How many scoring actors for `n` texts: one per TEXTS_PER_SCORER, at most one per CPU of the cluster."""
    import ray

    return max(1, min(int(ray.cluster_resources().get("CPU", 1)), 1 + n // TEXTS_PER_SCORER))


def score_streamed(
    model_dir: str, test: StreamedTest, batch_size: int, precision: str, name: str, profile: bool = False
) -> tuple[Evaluation, Features | None]:
    """`model_dir` on a test split left on the cluster: Ray Data actors (one CPU each, `_scorers` of
    them) score its blocks; the driver gets each row's order, label and prediction (and with
    `profile` the drift features, [CLS] vectors for about REFERENCE_EMBEDDINGS rows) and puts them in the
    split's order, so the Evaluation is the one scoring the collected split would give."""
    import ray

    quiet_data_context()
    t0 = time.perf_counter()
    files = ray.put(_model_files(model_dir))
    share = min(1.0, 1.5 * REFERENCE_EMBEDDINGS / max(1, test.n)) if profile else 0.0
    scored = test.dataset.map_batches(
        _Scorer,
        fn_constructor_kwargs={
            "files_ref": files,
            "batch_size": batch_size,
            "precision": precision,
            "embed_share": share,
        },
        batch_size=BLOCK_ROWS // 4,
        batch_format="pyarrow",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_scorers(test.n)),
    )
    cols: dict[str, list] = {k: [] for k in ("order", "label", "pred", *_SCALARS)}
    embedded: list[tuple[int, list]] = []
    for batch in scored.iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow"):
        for k in cols:
            cols[k].append(batch[k].to_numpy(zero_copy_only=False))
        if profile:
            for o, e in zip(batch["order"].to_pylist(), batch["embedding"].to_pylist(), strict=True):
                if e is not None:
                    embedded.append((o, e))
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    if len(arrays["order"]) != test.n:
        raise RuntimeError(f"scored {len(arrays['order'])} rows of a {test.n}-row test split")
    idx = np.argsort(arrays["order"], kind="stable")
    ev = evaluation_from(arrays["label"][idx].tolist(), arrays["pred"][idx].tolist(), test.digest, name)
    log.info("scored %d test texts on the cluster in %.1fs (%s)", test.n, time.perf_counter() - t0, name)
    if not profile:
        return ev, None
    # The REFERENCE_EMBEDDINGS rows with the smallest hashes among those kept: a fixed-size sample.
    embedded.sort(key=lambda oe: unit_hash(str(oe[0]), "reference"))
    emb = np.asarray([e for _, e in embedded[:REFERENCE_EMBEDDINGS]], dtype=np.float16)
    features = Features(
        label=arrays["pred"][idx].astype(np.int8),
        **{k: arrays[k][idx].astype(t) for k, t in _SCALARS.items()},
        embedding=emb.reshape(len(emb), -1) if len(emb) else np.zeros((0, 0), np.float16),
    )
    return ev, features


def report(ev: Evaluation) -> dict:
    return {**{k: round(v, 6) for k, v in ev.metrics.items()}, "n": ev.n, "data_digest": ev.digest, "model": ev.model}


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.evaluate is no command: run `python -m ray_jobs evaluate`")

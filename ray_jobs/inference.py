"""Scoring texts with a classifier, one way for every caller: tokenize, batch by length, forward under
autocast, count the confusion matrix.

Train's validation, the gate's evaluation, the Serve replica's model process and the benchmarks all
use these pieces, so a model is scored the same way wherever a number about it comes from.
Plain Python and PyTorch: no Ray, no MLflow, no Serve.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ray_jobs.data import encode, encode_counted, pad_batch
from ray_jobs.errors import ModelError
from ray_jobs.model import LABELS, load_model

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype for `precision` on this device, or None for plain fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        if device_type == "cpu" and not cpu_supports_bf16():
            _warn_emulated_bf16()
        return torch.bfloat16
    # auto
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def require_cuda() -> None:
    """Raise ModelError unless this process sees a CUDA device: a process configured for a GPU fails
    when it starts, with what it saw, not at its first batch."""
    import os

    import torch

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ModelError(
            f"a GPU was asked for, but this process sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}; torch {torch.__version__}, {built})"
        )


def resolved_precision(precision: str) -> str:
    """The precision `precision` (auto included) computes in on this machine's CPU: bf16 or fp32."""
    return "bf16" if autocast_dtype(precision, "cpu") is not None else "fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    # Once per process. Nothing else would tell why a run or a replica is that slow: on an AMD EPYC with
    # AVX2 only, a 512x384 @ 384x1536 linear layer ran at 6.5 GFLOP/s in bf16 autocast and 51 in fp32.
    log.warning(
        "precision bf16 on a CPU without AVX-512 BF16 or AMX: its bf16 matrix products are emulated and run "
        "several times slower than fp32; 'auto' picks fp32 on this CPU"
    )


def autocast(device_type: str, amp_dtype):
    """torch.autocast for `amp_dtype`, or a no-op context for fp32 (None)."""
    import torch

    return torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def length_batches(seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int):
    """(indices, ids, mask) batches of `seqs` grouped by length, so that each forward pass pads little:
    a caller writes each batch's rows back at `indices`, and the result does not depend on the grouping."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        yield idx, ids, mask


def batched_logits(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, device, amp_dtype=None):
    """(n, 2) float32 logits on the CPU, in input order. Sequences are grouped by length so that each
    forward pass pads little; the result does not depend on that grouping. The caller sets the model's
    mode (eval for scoring)."""
    return batched_outputs(model, seqs, pad_id, batch_size, device, amp_dtype)[0]


def batched_outputs(
    model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, device, amp_dtype=None, embeddings=False
):
    """(logits, embeddings or None): `batched_logits`, and with `embeddings` the (n, d) float32
    [CLS] vectors that the classifier head reads, taken from the same forward pass (a hook on
    DistilBERT's `pre_classifier`), in input order.

    On a GPU nothing waits for one batch's answer before the next batch is queued: pinned host tensors,
    asynchronous copies, and the results gathered on the device and copied back once."""
    import torch

    gpu = device.type == "cuda"
    seen: list = []
    hook = None
    if embeddings:
        hook = model.pre_classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0].float()))
    rows, logits = [], []
    try:
        with torch.inference_mode(), autocast(device.type, amp_dtype):
            for idx, ids, mask in length_batches(seqs, pad_id, batch_size):
                if gpu:
                    ids = ids.pin_memory().to(device, non_blocking=True)
                    mask = mask.pin_memory().to(device, non_blocking=True)
                logits.append(model(input_ids=ids, attention_mask=mask).logits.float())
                rows.append(torch.as_tensor(idx, dtype=torch.long))
    finally:
        if hook is not None:
            hook.remove()
    out = torch.zeros((len(seqs), 2), dtype=torch.float32)
    emb = torch.zeros((len(seqs), model.pre_classifier.in_features), dtype=torch.float32) if embeddings else None
    if rows:
        order = torch.cat(rows)
        out[order] = torch.cat(logits).cpu()
        if emb is not None:
            emb[order] = torch.cat(seen).cpu()
    return out, emb


def confusion_counts(labels, preds) -> tuple[float, float, float, float]:
    """(tp, fp, fn, tn) of binary predictions (1 = positive); array-likes of equal length."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    tp = float(((preds == 1) & (labels == 1)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    return tp, fp, fn, tn


def binary_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the positive class from confusion counts (which may be
    sums over DDP ranks)."""
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1}


def classification_metrics(labels, preds) -> dict[str, float]:
    return binary_metrics(*confusion_counts(labels, preds))


class Predictor:
    """Texts in, class probabilities out, for a saved model folder (safetensors).

    On a CUDA device at bf16 or fp16 the weights themselves are cast to that dtype (no autocast): every
    matrix product then reads half the bytes and skips autocast's per-call casts
    (benchmarks/gpu_train.py measures both). On the CPU, reduced precision stays autocast, which keeps
    LayerNorm and softmax in fp32."""

    def __init__(
        self,
        model_dir: str | Path,
        num_threads: int | None = None,
        precision: str = "fp32",
        batch_size: int = 64,
        device: str = "cpu",
        cast_weights: bool = True,
    ):
        """`device`: cpu or cuda (the device Ray assigned: CUDA_VISIBLE_DEVICES). `cast_weights`: False keeps
        fp32 weights under autocast on a GPU too (the explainer's gradients)."""
        import torch

        if num_threads:
            # One replica per CPU it reserved: more threads than that only contend with other replicas.
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            require_cuda()
        self.model, self.tokenizer, self.meta = load_model(model_dir)
        self.amp_dtype = autocast_dtype(precision, self.device.type)
        self.compute_amp = self.amp_dtype  # what forward passes autocast to (None once the weights are cast)
        if self.device.type == "cuda" and self.amp_dtype is not None and cast_weights:
            self.model.to(dtype=self.amp_dtype)
            self.compute_amp = None
        self.model.to(self.device)
        self._text_settings(model_dir, batch_size)

    @property
    def device_name(self) -> str:
        """ "cpu", or "cuda:0 (NVIDIA H200)": what /model shows."""
        import torch

        if self.device.type != "cuda":
            return self.device.type
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"

    def _text_settings(self, model_dir: str | Path, batch_size: int) -> None:
        """How texts become token ids and batches, from the folder's meta (as training saved it)."""
        self.batch_size = batch_size
        self.max_length = int(self.meta.get("max_length", 128))
        self.truncation = self.meta.get("truncation", "head")
        self.head_fraction = float(self.meta.get("head_fraction", 0.25))
        self.model_dir = str(model_dir)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode(self.tokenizer, texts, self.max_length, self.truncation, self.head_fraction)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 2) class probabilities, in input order."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        logits, _ = self.forward(self.encode(texts), embeddings=False)
        return torch.softmax(logits, dim=-1).numpy()

    @property
    def embedding_dim(self) -> int:
        """Width of the [CLS] vector the classifier head reads (drift features)."""
        return self.model.pre_classifier.in_features

    def forward(self, seqs: Sequence[Sequence[int]], embeddings: bool):
        """(logits (n, 2), [CLS] vectors (n, d) or None), float32 torch tensors in input order: the one
        place a runtime computes (ray_jobs.onnx_runtime.OnnxPredictor overrides it)."""
        return batched_outputs(
            self.model, seqs, self.tokenizer.pad_token_id, self.batch_size, self.device, self.compute_amp, embeddings
        )

    def predict_features(self, texts: Sequence[str]):
        """(predictions as `predict` gives them, drift Features) from one forward pass."""
        import torch

        from ray_jobs.drift import empty_features, features_from

        if len(texts) == 0:
            return [], empty_features(self.embedding_dim)
        seqs, raw_lengths, unk = encode_counted(
            self.tokenizer, texts, self.max_length, self.truncation, self.head_fraction
        )
        logits, emb = self.forward(seqs, embeddings=True)
        probs = torch.softmax(logits, dim=-1).numpy()
        return self._results(probs), features_from(probs, seqs, raw_lengths, unk, emb.numpy())

    def predict(self, texts: Sequence[str]) -> list[dict]:
        return self._results(self.predict_proba(texts))

    @staticmethod
    def _results(probs: np.ndarray) -> list[dict]:
        results = []
        for p in probs:
            label = int(p.argmax())
            results.append(
                {
                    "label": LABELS[label],
                    "score": float(p[label]),
                    "probabilities": {LABELS[0]: float(p[0]), LABELS[1]: float(p[1])},
                }
            )
        return results

"""ONNX Runtime for serving (`serve.runtime: onnx`, `serve.quantization: none | int8`): what a replica's
model process needs to serve a version's export, CPU only (CPUExecutionProvider): the export's files, its
accuracy guard and the check against the replica's thresholds, and the predictor that scores with it.

The export and the guard are made offline, once per version (ray_jobs.onnx_export: by the pipeline at
registration, or `python -m ray_jobs onnx`); replicas only load the file. The guard (`GuardReport`): the
export's labels on the version's test split against the eager model's (at the gate's precision, as
served), kept beside the model (`onnx_guard[.int8].json`) with the ONNX file's sha256, so a replica checks
it against its own config's thresholds (`serve.max_f1_drop`, `serve.min_label_agreement`) without scoring
anything, and a replaced file fails the check. A replica that cannot serve the export serves eager PyTorch
and says why (`/model`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field

from ray_jobs.config import ServeConfig
from ray_jobs.errors import SentimentError
from ray_jobs.inference import Predictor, length_batches
from ray_jobs.model import load_tokenizer, read_meta

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8"]
MODEL_FILES: dict[str, str] = {"none": "model.onnx", "int8": "model.int8.onnx"}
GUARD_FILES: dict[str, str] = {"none": "onnx_guard.json", "int8": "onnx_guard.int8.json"}
OPSET = 17


class OnnxError(SentimentError):
    """The model cannot be exported or its export cannot be loaded."""


class RuntimeChoice(NamedTuple):
    """What a model process is asked to run: the `serve` settings that pick the runtime (their defaults
    and their meaning are ServeConfig's)."""

    runtime: Literal["torch", "onnx"]
    quantization: Quantization
    max_f1_drop: float
    min_label_agreement: float
    min_guard_texts: int = 1
    test_digest: str | None = None  # the served version's test split, where the registry records it

    @classmethod
    def of(cls, serve: ServeConfig, test_digest: str | None = None) -> RuntimeChoice:
        return cls(
            serve.runtime,
            serve.quantization,
            serve.max_f1_drop,
            serve.min_label_agreement,
            serve.min_guard_texts,
            test_digest,
        )


EAGER = RuntimeChoice("torch", "none", 0.0, 1.0)  # the thresholds only apply to an ONNX export


class RuntimeInfo(BaseModel):
    """What computes a model process's answers (serve.runtime, serve.quantization); `/model` shows it."""

    runtime: Literal["torch", "onnx"]
    quantization: Quantization
    precision: str = Field(
        description="eager: bf16, fp16 or fp32 (autocast on a CPU, the weights' dtype on a GPU); ONNX: fp32 or int8"
    )
    device: str = Field("cpu", description='where it computes: "cpu", or "cuda:0 (NVIDIA H200)"')
    fallback: str | None = Field(None, description="why the configured ONNX export is not served (eager is)")


class GuardReport(BaseModel):
    """An export scored against the eager model on the same labelled texts."""

    quantization: Quantization
    onnx_sha256: str
    n: int
    data_digest: str
    eager_precision: str
    f1_eager: float
    f1_onnx: float
    agreement: float  # share of texts whose label the export gives as eager does
    created_at: float

    @property
    def f1_drop(self) -> float:
        return self.f1_eager - self.f1_onnx

    def refusal(
        self,
        max_f1_drop: float,
        min_label_agreement: float,
        min_texts: int = 1,
        test_digest: str | None = None,
    ) -> str | None:
        """Why the export may not be served under these thresholds, or None when it may. `test_digest`:
        the version's own test split, which the guard must have scored (None: not recorded)."""
        reasons = []
        if self.n < min_texts:
            reasons.append(f"it scored {self.n} texts, fewer than the {min_texts} required (serve.min_guard_texts)")
        if test_digest is not None and self.data_digest != test_digest:
            reasons.append(
                f"it scored another split (digest {self.data_digest}) than the version's test split ({test_digest})"
            )
        if self.f1_drop > max_f1_drop + 1e-12:
            reasons.append(f"F1 {self.f1_onnx:.4f} is {self.f1_drop:.4f} below eager's {self.f1_eager:.4f}")
        if self.agreement < min_label_agreement:
            reasons.append(f"labels agree with eager on {self.agreement:.2%}")
        if not reasons:
            return None
        return (
            f"the {self.quantization} export failed its accuracy guard on {self.n} test texts: "
            + "; ".join(reasons)
            + f" (allowed: F1 drop <= {max_f1_drop:g}, agreement >= {min_label_agreement:.0%}, "
            f"at least {min_texts} texts of the version's test split)"
        )

    def summary(self) -> str:
        return (
            f"F1 {self.f1_onnx:.4f} vs eager {self.eager_precision} {self.f1_eager:.4f} "
            f"(drop {self.f1_drop:+.4f}), labels agree on {self.agreement:.2%} of {self.n}"
        )


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------- scoring
class OnnxPredictor(Predictor):
    """A Predictor whose forward pass is ONNX Runtime's (same tokenization, truncation, batching and
    answers). No PyTorch model is loaded."""

    def __init__(
        self,
        model_dir: str | Path,
        quantization: Quantization = "none",
        num_threads: int | None = None,
        batch_size: int = 64,
        onnx_path: str | Path | None = None,
    ):
        import onnxruntime as ort

        path = Path(onnx_path or Path(model_dir) / MODEL_FILES[quantization])
        if not path.is_file():
            raise OnnxError(f"{path} does not exist (export it: python -m ray_jobs onnx --model ...)")
        self.tokenizer, self.meta = load_tokenizer(model_dir), read_meta(model_dir)
        self._text_settings(model_dir, batch_size)
        self.quantization = quantization
        options = ort.SessionOptions()
        if num_threads:
            # As for torch: one replica per reserved CPU; more threads only contend with other replicas.
            options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise OnnxError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: {err}") from None
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(outputs) != {"logits", "cls"}:
            raise OnnxError(f"{path} has outputs {sorted(outputs)}, not logits and cls")
        self._dim = int(outputs["cls"].shape[1])

    @property
    def embedding_dim(self) -> int:
        return self._dim

    def forward(self, seqs: Sequence[Sequence[int]], embeddings: bool):
        import torch

        logits = np.zeros((len(seqs), 2), np.float32)
        emb = np.zeros((len(seqs), self._dim), np.float32) if embeddings else None
        names = ["logits", "cls"] if embeddings else ["logits"]
        for idx, ids, mask in length_batches(seqs, self.tokenizer.pad_token_id, self.batch_size):
            out = self.session.run(names, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            logits[idx] = out[0]
            if emb is not None:
                emb[idx] = out[1]
        return torch.from_numpy(logits), None if emb is None else torch.from_numpy(emb)


def served_precision(predictor: Predictor) -> str:
    if isinstance(predictor, OnnxPredictor):
        return "int8" if predictor.quantization == "int8" else "fp32"
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[predictor.amp_dtype]


def read_guard(model_dir: str | Path, quantization: Quantization) -> GuardReport | None:
    path = Path(model_dir) / GUARD_FILES[quantization]
    return GuardReport.model_validate_json(path.read_text()) if path.is_file() else None


def unservable(model_dir: str | Path, choice: RuntimeChoice) -> str | None:
    """Why the version's ONNX export may not be served under `choice`, or None when it may."""
    path = Path(model_dir) / MODEL_FILES[choice.quantization]
    if not path.is_file():
        return (
            f"no {path.name} in the model folder (export it once per version: "
            f"python -m ray_jobs onnx --model <version> --quantization {choice.quantization})"
        )
    try:
        guard = read_guard(model_dir, choice.quantization)
    except ValueError as err:
        return f"unreadable {GUARD_FILES[choice.quantization]}: {err}"
    if guard is None:
        return f"no accuracy guard ({GUARD_FILES[choice.quantization]}) beside {path.name}"
    if guard.onnx_sha256 != sha256(path):
        return f"{path.name} is not the file its accuracy guard scored (sha256 differs)"
    return guard.refusal(choice.max_f1_drop, choice.min_label_agreement, choice.min_guard_texts, choice.test_digest)


def load_predictor(
    model_dir: str | Path,
    choice: RuntimeChoice = EAGER,
    num_threads: int | None = None,
    precision: str = "auto",
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[Predictor, dict[str, Any]]:
    """(predictor, what it runs) for a model process: the ONNX export where `choice` asks for it and it
    passed its guard, else eager PyTorch with the reason (`fallback`). ONNX Runtime runs on the CPU only
    (the config refuses runtime onnx with a GPU); eager PyTorch runs on `device`."""
    reason = None
    if choice.runtime == "onnx":
        reason = unservable(model_dir, choice)
        if reason is None:
            try:
                onnx = OnnxPredictor(model_dir, choice.quantization, num_threads=num_threads, batch_size=batch_size)
                return onnx, runtime_info(onnx, None)
            except Exception as err:  # noqa: BLE001 - an export that cannot load: serve eager, say why
                reason = f"{type(err).__name__}: {err}"
        log.warning("serving %s with eager PyTorch instead of ONNX Runtime: %s", model_dir, reason)
    predictor = Predictor(model_dir, num_threads=num_threads, precision=precision, batch_size=batch_size, device=device)
    return predictor, runtime_info(predictor, reason)


def runtime_info(predictor: Predictor, fallback: str | None) -> dict[str, Any]:
    """RuntimeInfo as a plain dict: what crosses from the model process to the replica."""
    onnx = isinstance(predictor, OnnxPredictor)
    return RuntimeInfo(
        runtime="onnx" if onnx else "torch",
        quantization=predictor.quantization if onnx else "none",
        precision=served_precision(predictor),
        device="cpu" if onnx else predictor.device_name,
        fallback=fallback,
    ).model_dump()


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.onnx_runtime is no command: run `python -m ray_jobs onnx`")

"""ONNX Runtime for serving (`serve.runtime: onnx`, `serve.quantization: none | int8`): export a model
folder once, guard the export's accuracy against the eager model, and score texts with it.

    python -m ray_jobs onnx --model <version | models:/name@alias | folder> [--quantization int8]
        [--data <labelled file>] [--config tune_configs/imdb_cpu.yaml --set data.path=...]

Once per registered version: the pipeline exports at registration when `serve.runtime` is onnx (the
files join the version's model folder, as the drift reference does); this command adds them to a
version registered before, or to a local folder. Replicas only load the file; none exports.

- Export: TorchScript tracing with dynamic batch and token axes, the model switched to transformers'
  eager attention first. ORT's transformer optimizer fuses attention only from that MatMul/Softmax
  pattern: SDPA exports as ops it does not recognise (measured on this model: 6 Attention nodes fused
  against none). The graph has two outputs: the logits and the [CLS] vector the classifier head reads
  (drift features come from the same pass, as in eager).
- int8: dynamic quantization of the weights of every MatMul/Attention (ORT's `quantize_dynamic`, per
  channel, signed), activations quantized per batch at run time.
- The guard (`GuardReport`): the export's labels on the version's test split against the eager
  model's (at the gate's precision, as served). It is kept beside the model (`onnx_guard[.int8].json`)
  with the ONNX file's sha256, so a replica checks it against its own config's thresholds
  (`serve.max_f1_drop`, `serve.min_label_agreement`) without scoring anything, and a replaced file
  fails the check. A replica that cannot serve the export serves eager PyTorch and says why (`/model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field

from ray_jobs.config import ServeConfig
from ray_jobs.data import Split
from ray_jobs.errors import SentimentError
from ray_jobs.inference import Predictor, classification_metrics, length_batches, resolved_precision
from ray_jobs.model import load_model, load_tokenizer, read_meta

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

    @classmethod
    def of(cls, serve: ServeConfig) -> RuntimeChoice:
        return cls(serve.runtime, serve.quantization, serve.max_f1_drop, serve.min_label_agreement)


EAGER = RuntimeChoice("torch", "none", 0.0, 1.0)  # the thresholds only apply to an ONNX export


class RuntimeInfo(BaseModel):
    """What computes a model process's answers (serve.runtime, serve.quantization); `/model` shows it."""

    runtime: Literal["torch", "onnx"]
    quantization: Quantization
    precision: str = Field(description="bf16 or fp32 (eager autocast), fp32 or int8 (ONNX)")
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

    def refusal(self, max_f1_drop: float, min_label_agreement: float) -> str | None:
        """Why the export may not be served under these thresholds, or None when it may."""
        reasons = []
        if self.f1_drop > max_f1_drop + 1e-12:
            reasons.append(f"F1 {self.f1_onnx:.4f} is {self.f1_drop:.4f} below eager's {self.f1_eager:.4f}")
        if self.agreement < min_label_agreement:
            reasons.append(f"labels agree with eager on {self.agreement:.2%}")
        if not reasons:
            return None
        return (
            f"the {self.quantization} export failed its accuracy guard on {self.n} test texts: "
            + "; ".join(reasons)
            + f" (allowed: F1 drop <= {max_f1_drop:g}, agreement >= {min_label_agreement:.0%})"
        )

    def summary(self) -> str:
        return (
            f"F1 {self.f1_onnx:.4f} vs eager {self.eager_precision} {self.f1_eager:.4f} "
            f"(drop {self.f1_drop:+.4f}), labels agree on {self.agreement:.2%} of {self.n}"
        )


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------- export
def export(model_dir: str | Path, out: Path, quantization: Quantization = "none") -> Path:
    """Write the ONNX graph of the model in `model_dir` to `out` (fused by ORT's transformer optimizer,
    then quantized for int8)."""
    with _root_logging_kept():
        _export(model_dir, out, quantization)
    return out


@contextlib.contextmanager
def _root_logging_kept():
    """ORT's quantizer calls logging.basicConfig, on import and in quantize_dynamic (onnxruntime 1.32):
    a handler on the root logger would print every later log line of this process twice. Undone here."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def _export(model_dir: str | Path, out: Path, quantization: Quantization) -> None:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from ray_jobs.data import encode, pad_batch

    model, tokenizer, _ = load_model(model_dir)
    model.set_attn_implementation("eager")  # the pattern ORT fuses into its Attention kernel
    config = model.config

    class LogitsAndCls(torch.nn.Module):
        """DistilBertForSequenceClassification's forward in eval mode, also returning its head's input."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            cls = self.m.distilbert(input_ids=input_ids, attention_mask=attention_mask)[0][:, 0]
            return self.m.classifier(torch.relu(self.m.pre_classifier(cls))), cls

    # Two rows of different lengths: the trace sees padding, so the mask path is part of the graph.
    seqs = encode(tokenizer, ["a trace", "a longer text for the trace of the model"], 32, "head", 1.0)
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id)
    axes = {name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask")}
    axes.update({"logits": {0: "batch"}, "cls": {0: "batch"}})
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export's, whose graph ORT's
            # optimizer does not fuse yet; its tracer warnings are about shapes made dynamic above.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LogitsAndCls(model).eval(),
                (ids, mask),
                str(plain),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits", "cls"],
                dynamic_axes=axes,
                dynamo=False,
                opset_version=OPSET,
            )
        fused = optimize_model(str(plain), model_type="bert", num_heads=config.n_heads, hidden_size=config.dim)
        stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        if not stats.get("Attention"):
            log.warning("ORT's optimizer fused no attention in %s (%s): the export will be slow", model_dir, stats)
        else:
            log.info("exported %s; ORT's optimizer fused %s", model_dir, stats)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")  # never a half-written model under the real name
        if quantization == "int8":
            opt = Path(tmp) / "fused.onnx"
            fused.save_model_to_file(str(opt))
            quantize_dynamic(
                str(opt),
                str(partial),
                weight_type=QuantType.QInt8,
                per_channel=True,
                # The optimizer's fused nodes carry no output types; they are all float32.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        else:
            fused.save_model_to_file(str(partial))
        partial.replace(out)


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
    return "bf16" if predictor.amp_dtype is not None else "fp32"


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
    return guard.refusal(choice.max_f1_drop, choice.min_label_agreement)


def load_predictor(
    model_dir: str | Path,
    choice: RuntimeChoice = EAGER,
    num_threads: int | None = None,
    precision: str = "auto",
    batch_size: int = 64,
) -> tuple[Predictor, dict[str, Any]]:
    """(predictor, what it runs) for a model process: the ONNX export where `choice` asks for it and it
    passed its guard, else eager PyTorch with the reason (`fallback`)."""
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
    predictor = Predictor(model_dir, num_threads=num_threads, precision=precision, batch_size=batch_size)
    return predictor, runtime_info(predictor, reason)


def runtime_info(predictor: Predictor, fallback: str | None) -> dict[str, Any]:
    """RuntimeInfo as a plain dict: what crosses from the model process to the replica."""
    onnx = isinstance(predictor, OnnxPredictor)
    return RuntimeInfo(
        runtime="onnx" if onnx else "torch",
        quantization=predictor.quantization if onnx else "none",
        precision=served_precision(predictor),
        fallback=fallback,
    ).model_dump()


# ---------------------------------------------------------------------------- guard
def build(
    model_dir: str | Path,
    split: Split,
    quantization: Quantization,
    eager_labels: Sequence[int] | None = None,
    precision: str = "auto",
    batch_size: int = 64,
) -> tuple[dict[str, bytes], GuardReport]:
    """Export the model and score the export against eager on `split` (labelled, held out). Returns the
    files for the model folder ({name: content}) and the report. `eager_labels`: the eager model's
    labels on `split` where the caller has them already (the pipeline's gate evaluation, at
    `precision`); else they are computed here."""
    if len(split) == 0:
        raise OnnxError("the accuracy guard needs a non-empty labelled split")
    if eager_labels is None:
        eager = Predictor(model_dir, precision=precision, batch_size=batch_size)
        eager_labels = eager.predict_proba(split.texts).argmax(axis=1).tolist()
    precision = resolved_precision(precision)
    if len(eager_labels) != len(split):
        raise OnnxError(f"{len(eager_labels)} eager labels for {len(split)} texts")
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model_dir, Path(tmp) / MODEL_FILES[quantization], quantization)
        started = time.perf_counter()
        onnx = OnnxPredictor(model_dir, quantization, batch_size=batch_size, onnx_path=path)
        labels = onnx.predict_proba(split.texts).argmax(axis=1)
        log.info("the %s export scored %d texts in %.0f s", quantization, len(split), time.perf_counter() - started)
        eager_arr, truth = np.asarray(eager_labels), np.asarray(split.labels)
        report = GuardReport(
            quantization=quantization,
            onnx_sha256=sha256(path),
            n=len(split),
            data_digest=split.digest(),
            eager_precision=precision,
            f1_eager=classification_metrics(truth, eager_arr)["f1"],
            f1_onnx=classification_metrics(truth, labels)["f1"],
            agreement=float((labels == eager_arr).mean()),
            created_at=time.time(),
        )
        files = {path.name: path.read_bytes(), GUARD_FILES[quantization]: report.model_dump_json(indent=1).encode()}
    return files, report


def store(reg, model_ref: str, model_dir: str, files: dict[str, bytes]) -> str:
    """Put `files` (from `build`) beside the model `model_ref` names: into a model folder (each file
    written whole, then renamed into place), or into a registered version (Registry.add_version_files).
    `reg` is the config's Registry; a bare version number is one of its model. Returns where, in words."""
    from ray_jobs.registry import parse_model_uri

    if Path(model_ref).is_dir():
        for name, content in files.items():
            partial = Path(model_dir) / (name + ".partial")
            partial.write_bytes(content)
            partial.replace(Path(model_dir) / name)
        return model_dir
    bare = model_ref.isdigit()
    target = reg if bare else reg.for_model(parse_model_uri(model_ref)[0])
    version = model_ref if bare else reg.resolve_version(model_ref)
    target.add_version_files(version, files)
    return f"version {version} of '{target.name}'"

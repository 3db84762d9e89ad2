"""ONNX export of a model folder and its accuracy guard, made offline once per version (by the pipeline at
registration when `serve.runtime` is onnx, or by `python -m ray_jobs onnx` for a version registered before
or a local folder); replicas only load the result (ray_jobs.onnx_runtime).

- Export: TorchScript tracing with dynamic batch and token axes, the model switched to transformers'
  eager attention first. ORT's transformer optimizer fuses attention only from that MatMul/Softmax
  pattern: SDPA exports as ops it does not recognise (measured on this model: 6 Attention nodes fused
  against none). The graph has two outputs: the logits and the [CLS] vector the classifier head reads
  (drift features come from the same pass, as in eager).
- int8: dynamic quantization of the weights of every MatMul/Attention (ORT's `quantize_dynamic`, per
  channel, signed), activations quantized per batch at run time.
- The guard: the export's labels on a labelled split (the version's test split) against the eager
  model's, as a GuardReport stored beside the export.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ray_jobs.data import Split
from ray_jobs.inference import Predictor, classification_metrics, resolved_precision
from ray_jobs.model import load_model
from ray_jobs.onnx_runtime import (
    GUARD_FILES,
    MODEL_FILES,
    OPSET,
    GuardReport,
    OnnxError,
    OnnxPredictor,
    Quantization,
    sha256,
)

log = logging.getLogger(__name__)

EXPORT_LOCK = ".onnx-export.lock"


def _partial(path: Path) -> Path:
    """A name of this writer's own beside `path`: two exports at once never write the same file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


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
        partial = _partial(out)  # never a half-written model under the real name
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
        partials = {}
        for name, content in files.items():
            partials[name] = _partial(Path(model_dir) / name)
            partials[name].write_bytes(content)
        # The export and its guard are renamed into place as a pair: another export of the same folder
        # renames its own pair before or after, never in between (the guard names its file by sha256).
        with open(Path(model_dir) / EXPORT_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, partial in partials.items():
                partial.replace(Path(model_dir) / name)
        return model_dir
    bare = model_ref.isdigit()
    target = reg if bare else reg.for_model(parse_model_uri(model_ref)[0])
    version = model_ref if bare else reg.resolve_version(model_ref)
    target.add_version_files(version, files)
    return f"version {version} of '{target.name}'"

"""Would ONNX Runtime (fp32, int8) serve faster than eager PyTorch on this CPU? A first probe for the
`serve.runtime: onnx` question, in-process, one thread, batches of 32 sorted by length, same texts:

    pip install '.[onnx]'
    python benchmarks/onnx_probe.py --model <model folder> --data ../shared/data/sst2/dev.parquet --n 872
    python benchmarks/onnx_probe.py --model <model folder> --data ../shared/data/imdb/train.parquet --n 160

Variants: eager fp32 and bf16 (autocast, as served), the exported graph (TorchScript exporter, dynamic
batch and sequence axes), the same after onnxruntime's transformer optimizer, and dynamic int8
quantization of each (per tensor, per channel). Each reports texts/s and the share of labels that agree
with eager fp32 (the accuracy guard the issue asks for wants >= 99%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.data import load_file, pad_batch  # noqa: E402
from ray_jobs.inference import Predictor  # noqa: E402


def export(predictor: Predictor, seqs: list[list[int]], path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    ids, mask = pad_batch(seqs[:4], predictor.tokenizer.pad_token_id)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    torch.onnx.export(
        Logits(predictor.model).eval(),
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes=axes,
        dynamo=False,
        opset_version=17,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="texts (.parquet/.csv/.jsonl with a text column)")
    p.add_argument("--n", type=int, default=256, help="texts to score")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    torch.set_num_threads(1)
    texts = load_file(args.data).texts[: args.n]
    eager = {}
    for precision in ("fp32", "bf16"):
        pred = Predictor(args.model, num_threads=1, precision=precision, batch_size=args.batch)
        pred.predict_proba(texts[: args.batch])
        start = time.perf_counter()
        eager[precision] = pred.predict_proba(texts)
        print(f"eager {precision:<22} {len(texts) / (time.perf_counter() - start):7.1f} texts/s", flush=True)
    pred = Predictor(args.model, num_threads=1, precision="fp32", batch_size=args.batch)
    seqs = pred.encode(texts)
    print(f"{len(texts)} texts, mean {np.mean([len(s) for s in seqs]):.0f} tokens", flush=True)

    tmp = Path(tempfile.mkdtemp())
    plain, optimized = tmp / "model.onnx", tmp / "model.opt.onnx"
    export(pred, seqs, plain)
    hidden = pred.model.config.dim
    opt = optimize_model(str(plain), model_type="bert", num_heads=pred.model.config.n_heads, hidden_size=hidden)
    opt.save_model_to_file(str(optimized))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    print(f"optimizer fused: {fused}", flush=True)
    variants = {"onnx fp32": plain, "onnx fp32 optimized": optimized}
    for name, src, per_channel in (
        ("onnx int8", plain, False),
        ("onnx int8 per-channel", plain, True),
        ("onnx int8 optimized", optimized, True),
    ):
        out = tmp / f"{name.replace(' ', '_')}.onnx"
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # the optimizer's fused ops carry no types
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=per_channel, extra_options=extra)
        variants[name] = out

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for name, path in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(session=session) -> np.ndarray:
            out = np.zeros((len(seqs), 2), np.float32)
            for s in range(0, len(order), args.batch):
                idx = order[s : s + args.batch]
                ids, mask = pad_batch([seqs[k] for k in idx], pred.tokenizer.pad_token_id)
                out[idx] = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            return out

        run()
        start = time.perf_counter()
        labels = run().argmax(1)
        rate = len(texts) / (time.perf_counter() - start)
        agree = float((labels == eager["fp32"].argmax(1)).mean())
        print(f"{name:<28} {rate:7.1f} texts/s, labels agree with eager fp32 on {agree:.2%}", flush=True)
    bf16_agree = (eager["bf16"].argmax(1) == eager["fp32"].argmax(1)).mean()
    print(f"eager bf16 labels agree with eager fp32 on {bf16_agree:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

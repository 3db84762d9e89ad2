"""GPU check of the training step and the predictor on CUDA: fp32, bf16 autocast, fp16 with loss scaling.

    python benchmarks/gpu_check.py --out gpu_check.json

1. Learning: the tiny DistilBERT learns the synthetic task in each precision (validation F1 after training).
2. Speed: a distilbert-base-shaped model (768 wide, 6 layers), training batch 32 x 256 tokens and
   inference batch 128 x 128 tokens, samples/s per precision, side by side.
3. Serving: `Predictor` on CUDA in bf16 agrees with fp32 on the validation split.
Needs torch with CUDA, transformers, tokenizers, safetensors, pydantic, pyyaml, pandas, numpy (no Ray, no MLflow).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ray_jobs.config import ModelConfig  # noqa: E402
from ray_jobs.data import batch_order, encode, generate_reviews, pad_batch, split_examples  # noqa: E402
from ray_jobs.inference import autocast, autocast_dtype, classification_metrics  # noqa: E402
from ray_jobs.model import build_model, save_model  # noqa: E402
from ray_jobs.train_steps import make_optimizer, train_step  # noqa: E402

DEV = torch.device("cuda")


def learn(precision: str, epochs: int = 6) -> dict:
    splits = split_examples(generate_reviews(4000, seed=0), 0.1, 0.1, seed=1234)
    model, tok = build_model(ModelConfig(source="tiny"), seed=42)
    model.to(DEV).train()
    amp = autocast_dtype(precision, "cuda")
    opt = make_optimizer(model, 1e-3, 0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    seqs = encode(tok, splits.train.texts, 64)
    t0, losses = time.time(), []
    for epoch in range(epochs):
        for idx in batch_order([len(s) for s in seqs], 16, seed=epoch, bucketing=True):
            ids, mask = pad_batch([seqs[i] for i in idx], tok.pad_token_id)
            losses.append(
                train_step(model, ids, mask, [splits.train.labels[i] for i in idx], opt, scaler, amp, 1.0, DEV).item()
            )
    torch.cuda.synchronize()
    out = Path(tempfile.mkdtemp()) / f"tiny-{precision}"
    save_model(model, tok, out, {"max_length": 64, "truncation": "head_tail"})
    from ray_jobs.inference import Predictor

    probs = Predictor(out, precision=precision, device="cuda").predict_proba(splits.val.texts)
    labels = splits.val.labels
    f1 = classification_metrics(np.asarray(labels), probs.argmax(1))["f1"]
    return {
        "precision": precision,
        "amp_dtype": str(amp),
        "first_loss": sum(losses[:20]) / 20,
        "last_loss": sum(losses[-20:]) / 20,
        "val_f1": f1,
        "seconds": time.time() - t0,
        "model_dir": str(out),
        "val_texts": len(labels),
    }


def speed(precision: str) -> dict:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=30522, attention_dropout=0.0, num_labels=2
    )
    model = DistilBertForSequenceClassification(cfg).to(DEV).train()
    amp = autocast_dtype(precision, "cuda")
    opt = make_optimizer(model, 3e-5, 0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    ids = torch.randint(1000, 30000, (32, 256))
    mask = torch.ones_like(ids)
    labels = [i % 2 for i in range(32)]
    for _ in range(5):
        train_step(model, ids, mask, labels, opt, scaler, amp, 1.0, DEV)
    torch.cuda.synchronize()
    t0 = time.time()
    n = 30
    for _ in range(n):
        train_step(model, ids, mask, labels, opt, scaler, amp, 1.0, DEV)
    torch.cuda.synchronize()
    train_sps = n * 32 / (time.time() - t0)
    model.eval()
    x = torch.randint(1000, 30000, (128, 128), device=DEV)
    m = torch.ones_like(x)
    with torch.inference_mode(), autocast("cuda", amp):
        for _ in range(3):
            model(input_ids=x, attention_mask=m)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(20):
            model(input_ids=x, attention_mask=m)
        torch.cuda.synchronize()
    infer_rps = 20 * 128 / (time.time() - t0)
    return {"precision": precision, "train_samples_per_s_32x256": train_sps, "inference_req_per_s_128x128": infer_rps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    res: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    res["learning"] = [learn(p) for p in ("fp32", "bf16", "fp16")]
    for r in res["learning"]:
        print(
            f"learn {r['precision']:>4}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, val F1 "
            f"{r['val_f1']:.4f} ({r['seconds']:.1f}s)",
            flush=True,
        )
    from ray_jobs.data import generate_reviews as gen
    from ray_jobs.inference import Predictor

    texts = gen(2000, seed=5).texts
    bf = Predictor(res["learning"][1]["model_dir"], precision="bf16", device="cuda").predict_proba(texts).argmax(1)
    fp = Predictor(res["learning"][1]["model_dir"], precision="fp32", device="cuda").predict_proba(texts).argmax(1)
    res["predictor_bf16_vs_fp32_agreement"] = float((bf == fp).mean())
    print(
        f"predictor bf16 vs fp32 label agreement on 2000 texts: {res['predictor_bf16_vs_fp32_agreement']:.4f}",
        flush=True,
    )
    res["speed"] = [speed(p) for p in ("fp32", "bf16", "fp16")]
    base = res["speed"][0]
    for r in res["speed"]:
        print(
            f"speed {r['precision']:>4}: train {r['train_samples_per_s_32x256']:.0f} samples/s "
            f"({r['train_samples_per_s_32x256'] / base['train_samples_per_s_32x256']:.2f}x), inference "
            f"{r['inference_req_per_s_128x128']:.0f} req/s "
            f"({r['inference_req_per_s_128x128'] / base['inference_req_per_s_128x128']:.2f}x)",
            flush=True,
        )
    print(json.dumps(res, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

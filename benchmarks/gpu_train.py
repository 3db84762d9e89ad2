"""GPU measurements, in one run, side by side, each as a share of the chip's own bf16 matmul rate measured
in the same run (so the figures survive a slower or faster card):

    python benchmarks/gpu_train.py --data imdb.parquet --backbone <BERT folder> --out gpu_train.json

Sections, in this order (each is written to --out as it finishes, so a run cut short keeps what it measured;
`--budget-s` skips what would not finish in time):
  matmul    the ceiling: 8192^3 bf16 matrix products, TFLOP/s.
  serve     the shipped backbone (all-MiniLM-L6-v2 as DistilBERT) at 128 tokens on IMDB reviews, tokenizing
            included: the Predictor in this process (the bound) against the replica's model process
            (serve_app.model_worker.ModelWorker, the code a GPU replica starts, fed pipelined batches as the
            replica feeds it), texts/s per batch size.
  infer     the distilbert-base shape (768 wide, 6 layers) at 128 tokens through the Predictor: before (fp32
            weights under bf16 autocast) and after (bf16 weights), then compiled.
  train256  the same shape, 256 random tokens: the training step before (for-each AdamW, blocking copies, the
            loss read every step, batch 32) and after (fused AdamW, pinned asynchronous copies, no reads), at
            batch 32 and 128, then compiled.
  recipe    tune_configs/imdb_gpu.yaml's recipe on the project's IMDB split with the pipeline's step: test F1
            and training seconds, per seed.
  train512  the same shape on IMDB reviews cut to 512 tokens (their real lengths, length-bucketed batches of
            64): before and after on the same batches from the same initial weights; the share counts only
            real (unpadded) tokens; the two loss curves side by side.
FLOPs: a forward pass of L tokens costs 2 x (encoder parameters) x L + 4 x layers x L^2 x width (the attention
products); a training step three forward passes. Embeddings and the classifier head are not counted.

Needs torch with CUDA, transformers, tokenizers, safetensors, pydantic, pyyaml, pyarrow (no Ray, no MLflow).
`--smoke` runs every section on the CPU at toy sizes, to check the script before spending GPU time on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ray_jobs.config import ModelConfig, load_config  # noqa: E402
from ray_jobs.data import batch_order, encode, encode_counted, load_splits, pad_batch  # noqa: E402
from ray_jobs.inference import Predictor  # noqa: E402
from ray_jobs.model import convert_bert, load_tokenizer, save_model  # noqa: E402
from ray_jobs.train_steps import StepSettings, make_optimizer, train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_sweep import parse_variant, run_variant  # noqa: E402


@dataclass(frozen=True)
class Shape:
    dim: int
    layers: int
    heads: int
    ffn: int

    @property
    def encoder_params(self) -> int:
        return self.layers * (4 * self.dim * self.dim + 2 * self.dim * self.ffn)

    def forward_flops(self, tokens: int) -> float:
        return 2.0 * self.encoder_params * tokens + 4.0 * self.layers * tokens * tokens * self.dim

    def train_flops(self, tokens: int) -> float:
        return 3.0 * self.forward_flops(tokens)


BASE = Shape(768, 6, 12, 3072)  # distilbert-base
TOY = Shape(64, 2, 2, 128)


class Run:
    """The measurements so far, written after every section; the time budget that sections check."""

    def __init__(self, out: Path, budget_s: float, smoke: bool):
        self.out, self.budget_s, self.smoke, self.t0 = out, budget_s, smoke, time.time()
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.res: dict = {"sections": {}, "skipped": []}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def fits(self, name: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.res["skipped"].append(f"{name} (needs ~{estimate_s:.0f}s, {self.left():.0f}s left)")
        say(f"skip {name}: ~{estimate_s:.0f}s needed, {self.left():.0f}s left")
        self.save()
        return False

    def record(self, section: str, key: str, value) -> None:
        self.res["sections"].setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out.write_text(json.dumps(self.res, indent=1, default=str))

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def share(run: Run, flops_per_s: float) -> float:
    return round(flops_per_s / (run.res["matmul_tflops"] * 1e12), 4)


# ----------------------------------------------------------------------------------------------- sections


def matmul(run: Run) -> None:
    n = 1024 if run.smoke else 8192
    dtype = torch.float32 if run.smoke else torch.bfloat16
    a, b = (torch.randn(n, n, device=run.dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    run.sync()
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        run.sync()
        rates.append(10 * 2 * n**3 / (time.perf_counter() - t))
    run.res["matmul_tflops"] = round(max(rates) / 1e12, 1)
    run.res["matmul_tflops_runs"] = [round(r / 1e12, 1) for r in rates]
    run.save()
    say(f"matmul {n}^3 {dtype}: {run.res['matmul_tflops']} TFLOP/s (best of {run.res['matmul_tflops_runs']})")


def minilm_folder(run: Run, backbone: str, max_length: int) -> str:
    model, tok = convert_bert(backbone, ModelConfig(source="bert", name=backbone, max_length=max_length))
    folder = tempfile.mkdtemp(prefix="minilm-")
    save_model(model, tok, folder, {"max_length": max_length, "truncation": "head_tail", "head_fraction": 0.25})
    return folder


def serve(run: Run, backbone: str, texts: list[str]) -> None:
    from serve_app.model_worker import ModelWorker

    folder = minilm_folder(run, backbone, 128)
    sizes = [8, 32] if run.smoke else [32, 128, 256]
    texts = texts[: (64 if run.smoke else 8192)]
    for size in sizes:
        p = Predictor(folder, precision="auto", batch_size=size, device=run.dev.type)
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        p.predict(chunks[0])
        t = time.perf_counter()
        for c in chunks:
            p.predict(c)
        rate = len(texts) / (time.perf_counter() - t)
        run.record("serve", f"in_process_b{size}", round(rate))
        say(f"serve in-process batch {size}: {rate:.0f} texts/s")
        if size == sizes[-1]:
            run.record("serve", f"ms_per_batch_b{size}", breakdown(run, p, chunks))
        del p
    size = sizes[-2]
    worker = ModelWorker(folder, num_threads=1, precision="auto", device=run.dev.type, batch_size=size)
    try:
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        worker.predict(chunks[0])
        t = time.perf_counter()
        in_flight = []
        for c in chunks:  # a replica keeps a few batches queued on the socket (pipelining)
            in_flight.append(worker.submit(c))
            if len(in_flight) >= 4:
                in_flight.pop(0).result()
        for f in in_flight:
            f.result()
        rate = len(texts) / (time.perf_counter() - t)
        run.record("serve", f"model_process_b{size}", round(rate))
        run.record("serve", "model_process_runtime", worker.runtime)
        bound = run.res["sections"]["serve"][f"in_process_b{size}"]
        run.record("serve", f"model_process_share_of_bound_b{size}", round(rate / bound, 3))
        say(f"serve model process batch {size}: {rate:.0f} texts/s ({rate / bound:.0%} of in-process)")
    finally:
        worker.close()


def breakdown(run: Run, p: Predictor, chunks: list[list[str]]) -> dict[str, float]:
    """Where an in-process batch's time goes: tokenizing, padding, the forward pass, the answers."""
    times = {"encode": 0.0, "pad": 0.0, "forward": 0.0, "answers": 0.0}
    for c in chunks:
        t = time.perf_counter()
        seqs, _, _ = encode_counted(p.tokenizer, c, p.max_length, p.truncation, p.head_fraction)
        times["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        pad_batch(seqs, p.tokenizer.pad_token_id)
        times["pad"] += time.perf_counter() - t
        t = time.perf_counter()
        logits, _ = p.forward(seqs, embeddings=False)
        times["forward"] += time.perf_counter() - t  # its own padding included; copied back, so synchronized
        t = time.perf_counter()
        p._results(torch.softmax(logits, -1).numpy())
        times["answers"] += time.perf_counter() - t
    return {k: round(1000 * v / len(chunks), 2) for k, v in times.items()}


def base_model(shape: Shape, vocab: int, seed: int = 0):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    cfg = DistilBertConfig(
        dim=shape.dim,
        n_layers=shape.layers,
        n_heads=shape.heads,
        hidden_dim=shape.ffn,
        vocab_size=vocab,
        attention_dropout=0.0,
        num_labels=2,
    )
    model = DistilBertForSequenceClassification(cfg)
    model.set_attn_implementation("sdpa")
    return model


def infer(run: Run, backbone: str) -> None:
    shape = TOY if run.smoke else BASE
    length, n = (32, 64) if run.smoke else (128, 128 * 40)
    tok = load_tokenizer(backbone)
    folder = tempfile.mkdtemp(prefix="base-")
    save_model(base_model(shape, tok.vocab_size), tok, folder, {"max_length": length, "truncation": "head"})
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(1000, 29000, (n, length), generator=g).tolist()
    variants = [
        ("autocast_b128", dict(cast_weights=False), 128),
        ("bf16_weights_b128", {}, 128),
        ("bf16_weights_b512", {}, 512),
        ("bf16_weights_compiled_b512", dict(compile=True), 512),
    ]
    ceiling(run, shape, folder, length)
    for name, kw, size in variants:
        if kw.get("compile") and not run.fits(f"infer {name}", 60):
            continue
        torch._dynamo.reset()
        compiled = kw.pop("compile", False)
        p = Predictor(folder, precision="bf16" if not run.smoke else "fp32", batch_size=size, device=run.dev.type, **kw)
        if compiled:  # measured only: the serving predictor stays eager (docs/gpu.md)
            p.model.compile(dynamic=True)  # dynamic: a replica's batches vary in size and length
        p.forward(seqs[: size * 2], embeddings=False)  # warm-up (and compilation)
        p.forward(seqs[: size * 2], embeddings=False)
        run.sync()
        t = time.perf_counter()
        p.forward(seqs, embeddings=False)
        seconds = time.perf_counter() - t
        rate = n / seconds
        row = {"texts_per_s": round(rate), "share": share(run, rate * shape.forward_flops(length))}
        run.record("infer", name, row)
        say(f"infer {name}: {rate:.0f} texts/s, {row['share']:.1%} of the matmul rate")
        del p


def ceiling(run: Run, shape: Shape, folder: str, length: int) -> None:
    """The model alone on one device-resident batch of 512 (no host work): eager, then compiled for that shape."""
    from ray_jobs.model import load_model

    model = load_model(folder)[0].to(run.dev, dtype=torch.float32 if run.smoke else torch.bfloat16)
    x = torch.randint(1000, 29000, (512 if not run.smoke else 16, length), device=run.dev)
    m = torch.ones_like(x)
    for name in ("eager", "compiled_static"):
        if name != "eager":
            if not run.fits("infer ceiling compiled", 60):
                return
            torch._dynamo.reset()
            model = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            for _ in range(3):
                model(input_ids=x, attention_mask=m)
            run.sync()
            t = time.perf_counter()
            for _ in range(20):
                model(input_ids=x, attention_mask=m)
            run.sync()
        rate = 20 * x.shape[0] / (time.perf_counter() - t)
        row = {"texts_per_s": round(rate), "share": share(run, rate * shape.forward_flops(length))}
        run.record("infer", f"model_alone_{name}_b{x.shape[0]}", row)
        say(f"infer model alone {name}: {rate:.0f} texts/s, {row['share']:.1%} of the matmul rate")


def time_steps(run: Run, model, batches, before: bool, compiled: bool, warmup: int, pad_multiple: int, max_len: int):
    """Losses of every step and the seconds of the steps after `warmup` (the project's train_step)."""
    model.to(run.dev).train()
    amp = None if run.smoke else torch.bfloat16
    opt = make_optimizer(model, 5e-5, 0.01, fused=False if before else None)
    scaler = torch.amp.GradScaler(run.dev.type, enabled=False)
    pin = not before and run.dev.type == "cuda"
    settings = StepSettings(compile=compiled, pad_to_multiple=1 if before else pad_multiple, pin_memory=pin)
    torch._dynamo.reset()
    settings.prepare(model)
    losses, t, padded = [], None, 0
    for k, (seqs, labels) in enumerate(batches):
        if k == warmup:
            run.sync()
            t = time.perf_counter()
        ids, mask, y = settings.batch(seqs, labels, 0, max_len)
        if k >= warmup:
            padded += ids.numel()
        if before:  # the loop as it was: pageable tensors, labels as a list, the loss read every step
            loss = train_step(model, ids, mask, labels, opt, scaler, amp, 1.0, run.dev)
            losses.append(loss.item())
        else:
            losses.append(train_step(model, ids, mask, y, opt, scaler, amp, 1.0, run.dev).detach())
    run.sync()
    seconds = time.perf_counter() - t
    return [float(x) for x in losses], seconds, padded


def train256(run: Run) -> None:
    shape = TOY if run.smoke else BASE
    length = 32 if run.smoke else 256
    g = torch.Generator().manual_seed(2)
    variants = [  # name, batch, before, compiled, steps, warm-up steps, seconds estimate
        ("before_b32", 32, True, False, 100, 10, 10),
        ("after_b32", 32, False, False, 100, 10, 10),
        ("after_b128", 128, False, False, 40, 5, 15),
        ("after_b128_compiled", 128, False, True, 50, 6, 40),
        ("after_b256_compiled", 256, False, True, 30, 6, 45),
    ]
    for name, size, before, compiled, steps, warmup, estimate in variants:
        if not run.fits(f"train256 {name}", estimate):
            continue
        if run.smoke:
            steps, warmup = 4, 1
        ids = torch.randint(1000, 29000, (size, length), generator=g).tolist()
        labels = [i % 2 for i in range(size)]
        _, seconds, _ = time_steps(
            run, base_model(shape, 30522), [(ids, labels)] * steps, before, compiled, warmup, 8, length
        )
        rate = (steps - warmup) * size / seconds
        row = {"samples_per_s": round(rate), "share": share(run, rate * shape.train_flops(length))}
        run.record("train256", name, row)
        say(f"train256 {name}: {rate:.0f} samples/s, {row['share']:.1%} of the matmul rate")


def train512(run: Run, seqs: list[list[int]], labels: list[int]) -> None:
    shape = TOY if run.smoke else BASE
    steps, warmup = (6, 2) if run.smoke else (150, 30)
    variants = [  # name, batch, before, compiled, pad multiple, seconds estimate
        ("before_b64", 64, True, False, 1, 30),
        ("after_b64_compiled_pad64", 64, False, True, 64, 45),
        ("after_b64_compiled_pad8", 64, False, True, 8, 45),
        ("after_b128_compiled_pad8", 128, False, True, 8, 60),
    ]
    for name, size, before, compiled, multiple, estimate in variants:
        if not run.fits(f"train512 {name}", estimate):
            continue
        size = 8 if run.smoke else size
        order = batch_order([len(s) for s in seqs], size, seed=0, bucketing=True, drop_last=True)[:steps]
        batches = [([seqs[i] for i in idx], [labels[i] for i in idx]) for idx in order]
        real = sum(shape.train_flops(len(s)) for b, _ in batches[warmup:] for s in b)
        losses, seconds, padded = time_steps(
            run, base_model(shape, 30522, seed=3), batches, before, compiled, warmup, multiple, 512
        )
        n_real = sum(len(s) for b, _ in batches[warmup:] for s in b)
        rate = (len(batches) - warmup) * size / seconds
        row = {
            "samples_per_s": round(rate),
            "real_tokens_per_s": round(n_real / seconds),
            "padded_share": round(1 - n_real / padded, 3),
            "share_real_tokens": share(run, real / seconds),
            "loss_per_10_steps": [round(statistics.fmean(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)],
        }
        run.record("train512", name, row)
        say(f"train512 {name}: {rate:.0f} samples/s, {row['share_real_tokens']:.1%} of the matmul rate (real tokens)")
    rows = run.res["sections"].get("train512", {})
    if "before_b64" in rows and "after_b64_compiled_pad8" in rows:
        a, b = (rows[k]["loss_per_10_steps"] for k in ("before_b64", "after_b64_compiled_pad8"))
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        run.record("train512", "loss_curves_max_abs_diff", round(diff, 4))


def recipe(run: Run, config: str, data: str, backbone: str, variants: list[str]) -> None:
    overrides = [f"data.path={data}", f"model.name={backbone}"]
    if run.smoke:
        overrides += ["data.max_train_samples=64", "model.max_length=64", "train.eval_every_steps=4"]
    cfg = load_config(config, overrides)
    splits = load_splits(cfg.data)
    tok = load_tokenizer(backbone)
    raw = {
        name: [ids[1:-1] for ids in encode(tok, getattr(splits, name).texts, max_length=8192, truncation="head")]
        for name in ("train", "val", "test")
    }
    data_ = {**raw, **{f"{n}_labels": getattr(splits, n).labels for n in ("train", "val", "test")}}
    run.record("recipe", "config", cfg.train.model_dump())
    run.record("recipe", "split", splits.digests())
    for text in variants:
        v = parse_variant(text)
        epochs = v.pop("epochs", None) or cfg.train.epochs
        v["seed"] = cfg.train.seed if v["seed"] is None else v["seed"]
        v["batch_size"] = v["batch_size"] or cfg.train.batch_size
        v["max_length"] = cfg.model.max_length if "max_length=" not in text else v["max_length"]
        steps = epochs * -(-len(raw["train"]) // v["batch_size"])
        if not run.fits(f"recipe {text}", 60 + steps * v["batch_size"] / 1500):
            continue
        r = run_variant(cfg, v, data_, run.dev, steps, cfg.train.eval_every_steps or 500)
        run.record("recipe", text, {**r, "epochs": epochs})
        say(f"recipe {text}: test F1 {r['test_f1']:.4f} (val {r['val_f1']:.4f}), {r['train_seconds']:.0f}s training")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="IMDB parquet (text, label)")
    p.add_argument("--backbone", required=True, help="the BERT folder of all-MiniLM-L6-v2 (model.name: minilm)")
    p.add_argument("--config", default="tune_configs/imdb_gpu.yaml")
    p.add_argument("--recipe", action="append", help="recipe_sweep variant, plus epochs=N (repeatable)")
    p.add_argument("--out", default="gpu_train.json")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: does the script run?")
    p.add_argument("--sections", default="serve,infer,train256,recipe,train512", help="which to run (matmul always)")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 1
    run = Run(Path(args.out), args.budget_s, args.smoke)
    import transformers

    run.res.update(
        gpu=torch.cuda.get_device_name(0) if not args.smoke else "cpu (smoke)",
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        command=" ".join(sys.argv),
    )
    run.save()
    import pyarrow.parquet as pq

    table = pq.read_table(args.data, columns=["text", "label"]).to_pydict()
    sections = set(args.sections.split(","))
    matmul(run)
    if "serve" in sections:
        serve(run, args.backbone, table["text"])
    if "infer" in sections:
        infer(run, args.backbone)
    if "train256" in sections:
        train256(run)
    n = 64 if args.smoke else 10000  # 150 batches of 64
    recipes = args.recipe or ["seed=42", "seed=1"]
    if "train512" in sections:
        # A random sample (the file is sorted by label), cut as the recipes cut: head and tail, 512 tokens.
        pick = torch.randperm(len(table["text"]), generator=torch.Generator().manual_seed(0))[:n].tolist()
        seqs = encode(load_tokenizer(args.backbone), [table["text"][i] for i in pick], 64 if args.smoke else 512)
        train512(run, seqs, [table["label"][i] for i in pick])
    if "recipe" in sections:
        recipe(run, args.config, args.data, args.backbone, recipes)
    say(f"done in {time.time() - run.t0:.0f}s; skipped: {run.res['skipped']}")
    print(json.dumps({k: v for k, v in run.res.items() if k != "sections"}, default=str))
    for section, rows in run.res["sections"].items():
        for key, value in rows.items():
            if key not in ("config", "split"):
                print(section, key, json.dumps(value, default=str)[:300])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())

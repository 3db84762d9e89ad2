"""Which training recipe does best in the 30-minute CPU budget? Each variant of
`tune_configs/imdb_cpu.yaml` takes exactly the number of optimizer steps that 2 CPU cores
manage in the budget at its sequence length (from samples/s measured on the CPU), then is
scored on the same held-out split as `benchmarks/accuracy.py`. The steps, the data order,
the LR schedule and the selection on the validation split are the CPU run's; only the
device differs. That lets a GPU answer in seconds per variant what costs 33 CPU-minutes
each, and the winner is then confirmed by `benchmarks/accuracy.py` on the CPU.

    # on the CPU: training samples/s per sequence length (the step budget of each length)
    python benchmarks/recipe_sweep.py --data ../shared/data/imdb/train.parquet --measure-cpu 128 256 384
    # on a GPU: the sweep
    python benchmarks/recipe_sweep.py --data ../shared/data/imdb/train.parquet --device cuda \
        --cpu-rate 128=25.0 --cpu-rate 256=13.2 --cpu-rate 384=9.5 --out sweep.json

Variants are `key=value,...` strings over: max_length, lr, pooling (cls|mean), head_fraction,
seed, freeze (0|1), batch_size (and epochs: benchmarks/gpu_train.py). `--model` points at a BERT folder
(default: the pip-shipped MiniLM).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.data import batch_order, encode, load_splits, pad_batch, truncate_ids  # noqa: E402
from ray_jobs.inference import batched_logits, classification_metrics  # noqa: E402

DEFAULT_VARIANTS = [
    "max_length=256,lr=1e-4",  # the recipe of the last CPU run
    "max_length=256,lr=1e-4,seed=1",  # the same with another seed: the noise floor
    "max_length=256,lr=2e-4",
    "max_length=256,lr=3e-4",
    "max_length=256,lr=5e-5",
    "max_length=128,lr=1e-4",
    "max_length=128,lr=2e-4",
    "max_length=384,lr=2e-4",
    "max_length=256,lr=1e-4,pooling=mean",
    "max_length=256,lr=2e-4,pooling=mean",
    "max_length=128,lr=2e-4,pooling=mean",
    "max_length=384,lr=2e-4,pooling=mean",
]


def parse_variant(text: str) -> dict:
    v = {
        "max_length": 256,
        "lr": 1e-4,
        "pooling": "cls",
        "head_fraction": 0.25,
        "seed": None,
        "freeze": 1,
        "batch_size": None,
        "epochs": None,  # benchmarks/gpu_train.py: whole epochs instead of a CPU step budget
    }
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in v:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
        v[key] = value if key == "pooling" else float(value) if key in ("lr", "head_fraction") else int(value)
    return v


def mean_pooled(model):
    """`model` (DistilBertForSequenceClassification) classifying from the masked mean of the last hidden
    states (how all-MiniLM-L6-v2 was pre-trained) instead of the [CLS] position."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
            x = self.m.dropout(torch.relu(self.m.pre_classifier(pooled)))
            return SimpleNamespace(logits=self.m.classifier(x))

    return MeanPooled(model)


def scores(model, seqs, labels, pad_id, device, amp_dtype, batch_size=128) -> dict:
    import torch

    model.eval()
    with torch.compiler.set_stance("force_eager"):  # as the pipeline validates: no eval graph to compile
        logits = batched_logits(model, seqs, pad_id, batch_size, device, amp_dtype)
    model.train()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    return {**classification_metrics(labels, logits.argmax(-1).numpy()), "loss": loss}


def build(cfg, v: dict, device):
    from ray_jobs.model import build_model, prepare_for_training

    model, tok = build_model(cfg.model, seed=v["seed"])
    prepare_for_training(model, v["freeze"], cfg.train.attention)  # as the pipeline trains
    if v["pooling"] == "mean":
        model = mean_pooled(model)
    return model.to(device), tok


def cut(raw: list[list[int]], max_length: int, head_fraction: float, cls: int, sep: int) -> list[list[int]]:
    return [[cls] + truncate_ids(ids, max_length - 2, "head_tail", head_fraction) + [sep] for ids in raw]


def run_variant(cfg, v: dict, data: dict, device, steps: int, eval_every: int) -> dict:
    """Train one variant for `steps` with the pipeline's step (ray_jobs.train_steps: the same optimizer, batches
    and compile setting as a Ray Train worker on `device`); best validation checkpoint scored on test."""
    import torch

    from ray_jobs.inference import autocast_dtype
    from ray_jobs.train_steps import LinearSchedule, StepSettings, make_optimizer, train_step

    tc = cfg.train
    model, tok = build(cfg, v, device)
    settings = StepSettings.of(tc, device)
    settings.prepare(model)
    amp = autocast_dtype(tc.precision, device.type)
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    tr = cut(data["train"], v["max_length"], v["head_fraction"], cls, sep)
    va = cut(data["val"], v["max_length"], v["head_fraction"], cls, sep)
    te = cut(data["test"], v["max_length"], v["head_fraction"], cls, sep)
    opt = make_optimizer(model, v["lr"], tc.weight_decay)
    schedule = LinearSchedule(steps, tc.warmup_ratio)  # the pipeline's schedule, without a time budget
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    lengths = [len(s) for s in tr]
    bs = v["batch_size"]
    step, epoch, best, history, eval_seconds = 0, 0, None, [], 0.0
    t0 = time.time()
    model.train()
    while step < steps:
        for idx in batch_order(lengths, bs, seed=v["seed"] * 1000 + epoch, bucketing=tc.length_bucketing):
            labels = [data["train_labels"][i] for i in idx]
            ids, mask, y = settings.batch([tr[i] for i in idx], labels, pad, v["max_length"])
            train_step(model, ids, mask, y, opt, scaler, amp, tc.max_grad_norm, device)
            sched.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                t_eval = time.time()
                val = scores(model, va, data["val_labels"], pad, device, amp)
                history.append({"step": step, "val_f1": round(val["f1"], 4), "val_loss": round(val["loss"], 4)})
                # The pipeline's choice (train.select_by); ties go to the later checkpoint, as in the pipeline.
                score = {"val_f1": val["f1"], "last": step}.get(tc.select_by, -val["loss"])
                if best is None or score >= best["score"]:
                    state = copy.deepcopy(model.state_dict())
                    best = {"step": step, "score": score, "val_f1": val["f1"], "state": state}
                eval_seconds += time.time() - t_eval
            if step == steps:
                break
        epoch += 1
    train_seconds = time.time() - t0 - eval_seconds
    last_test = scores(model, te, data["test_labels"], pad, device, amp)
    model.load_state_dict(best["state"])
    test = scores(model, te, data["test_labels"], pad, device, amp)
    return {
        "steps": steps,
        "epochs": round(steps * bs / len(tr), 2),
        "best_step": best["step"],
        "val_f1": round(best["val_f1"], 4),
        "test_f1": round(test["f1"], 4),
        "test_acc": round(test["accuracy"], 4),
        "test_f1_last": round(last_test["f1"], 4),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "history": history,
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(train_seconds, 1),
    }


def measure_cpu(cfg, data: dict, lengths: list[int], steps: int = 40) -> dict[int, float]:
    """Training samples/s of the config's recipe on this machine's CPU, per sequence length."""
    import torch

    from ray_jobs.inference import autocast_dtype
    from ray_jobs.train_steps import make_optimizer, train_step

    torch.set_num_threads(cfg.train.threads_per_worker or 2)
    dev = torch.device("cpu")
    rates = {}
    for L in lengths:
        v = parse_variant(f"max_length={L}")
        v["seed"], v["batch_size"] = cfg.train.seed, cfg.train.batch_size
        model, tok = build(cfg, v, dev)
        tr = cut(data["train"], L, v["head_fraction"], tok.cls_token_id, tok.sep_token_id)
        opt = make_optimizer(model, 1e-5, 0.0)
        amp = autocast_dtype(cfg.train.precision, "cpu")
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        batches = batch_order([len(s) for s in tr], v["batch_size"], seed=0, bucketing=True)[: steps + 2]
        n, t0 = 0, 0.0
        for k, idx in enumerate(batches):
            if k == 2:  # two warm-up steps
                n, t0 = 0, time.time()
            ids, mask = pad_batch([tr[i] for i in idx], tok.pad_token_id)
            train_step(model, ids, mask, [data["train_labels"][i] for i in idx], opt, scaler, amp, 1.0, dev)
            n += len(idx)
        rates[L] = n / (time.time() - t0)  # a length given twice keeps its last reading
        print(f"CPU, {torch.get_num_threads()} threads, max_length {L}: {rates[L]:.1f} samples/s", flush=True)
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="tune_configs/imdb_cpu.yaml")
    p.add_argument("--model", help="BERT folder to start from (default: the config's model.name)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--measure-cpu", type=int, nargs="*", metavar="MAX_LENGTH")
    p.add_argument("--cpu-rate", action="append", default=[], metavar="MAX_LENGTH=SAMPLES_PER_S")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=1640.0,
        help="of the 1800 s budget, what the CPU run spends in training steps (start-up and validations excluded)",
    )
    p.add_argument("--variant", action="append", help="key=value,... (repeatable); default: a built-in grid")
    p.add_argument("--out")
    args = p.parse_args()

    import torch

    overrides = [f"data.path={args.data}"] + ([f"model.name={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    splits = load_splits(cfg.data)
    print(f"split digests {splits.digests()}", flush=True)
    from ray_jobs.model import build_model

    _, tok = build_model(cfg.model)
    t0 = time.time()
    # Tokenize once without truncation (the cap only clips pathological texts); each variant cuts its own length.
    raw = {
        name: [ids[1:-1] for ids in encode(tok, getattr(splits, name).texts, max_length=8192, truncation="head")]
        for name in ("train", "val", "test")
    }
    data = {**raw, **{f"{n}_labels": getattr(splits, n).labels for n in ("train", "val", "test")}}
    print(f"tokenized in {time.time() - t0:.0f}s", flush=True)
    if args.measure_cpu:
        measure_cpu(cfg, data, args.measure_cpu)
        return 0

    rates = {int(k): float(r) for k, r in (s.split("=") for s in args.cpu_rate)}
    dev = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "split": splits.digests(),
        "cpu_rates": rates,
        "train_seconds": args.train_seconds,
        "variants": [],
    }
    for text in args.variant or DEFAULT_VARIANTS:
        v = parse_variant(text)
        v["seed"] = cfg.train.seed if v["seed"] is None else v["seed"]
        v["batch_size"] = v["batch_size"] or cfg.train.batch_size
        if v["max_length"] not in rates:
            print(f"skip {text}: no --cpu-rate for max_length {v['max_length']}", flush=True)
            continue
        steps = int(args.train_seconds * rates[v["max_length"]] / v["batch_size"])
        r = run_variant(cfg, v, data, dev, steps, cfg.train.eval_every_steps or 500)
        row = {"variant": text, **{k: r[k] for k in r if k != "history"}, "history": r["history"]}
        results["variants"].append(row)
        print(
            f"{text:45s} steps {r['steps']:5d} ({r['epochs']:.2f} ep) best@{r['best_step']:5d} val F1 "
            f"{r['val_f1']:.4f} "
            f"test F1 {r['test_f1']:.4f} (last {r['test_f1_last']:.4f}) {r['seconds']:.0f}s",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| variant | CPU steps | epochs | val F1 | test F1 | test F1 (last step) |\n|---|---|---|---|---|---|")
    for row in results["variants"]:
        print(
            f"| {row['variant']} | {row['steps']} | {row['epochs']} | {row['val_f1']:.4f} | "
            f"{row['test_f1']:.4f} | {row['test_f1_last']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a CPU training step's time goes, and the old loop against the new one, side by side in one run.

    python benchmarks/train_profile.py --data ../shared/data/imdb/train.parquet
    python benchmarks/train_profile.py --data ../shared/data/imdb/train.parquet --ray   # + Ray Train's share

For each max_length (default 512 and 256) on the same reviews, batches and model (the config's recipe):
- ceilings measured in this run: one 2048x2048 matmul in fp32 and, where the CPU has bf16 (AVX-512 BF16 or
  AMX), in bf16, and the bare forward pass of the model at the training precision (no grad, SDPA: the
  serving path) on the same batches;
- the training loop with each attention kernel (`sdpa`, the old loop; `matmul`, the new default on CPUs),
  interleaved over --rounds so that machine noise hits both alike: samples/s, GFLOP/s and the split of a step
  into forward, backward and optimizer (`ray_jobs.train.train_step`'s marks);
- one torch.profiler pass per kernel: shares of linear layers, attention, autocast casts, element-wise work
  and the optimizer; from the linear share, the linear layers' own GFLOP/s (against the ceiling at the
  training precision) and the bound on any speed-up that leaves the linear layers as they are (1 / share);
- tokenization cost and padding waste (padded tokens that carry no text) with the config's length bucketing.
With --ray, Ray Train (1 worker x all cores) runs an epoch of the same reviews with each kernel: its share
over the plain loop is Ray's and the data path's cost. With --attention, only the attention kernels are
timed, forward and backward apart, on random 16 x 12-head x 32-wide inputs at 128-512 tokens, in bf16
where the CPU has it, else fp32 (on a CPU without bf16 instructions a bf16 matmul runs hundreds of times
slower than fp32: that is also why the bf16 ceiling is measured only where the CPU has them).

FLOPs are counted on padded tokens (the work the kernels do), per token and layer: 2*(4h^2 + 2hf) for the
linear layers plus 4*L*h for attention's two products; a training step is 3x its forward pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.data import batch_order, encode, load_file, pad_batch, split_examples  # noqa: E402

KERNELS = ("sdpa", "matmul")  # old, new
CATEGORIES = {
    "linear": ("aten::mm", "aten::addmm", "aten::linear"),
    "attention": (
        "aten::bmm",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::masked_fill",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "casts": ("aten::copy_", "aten::_to_copy"),
    "optimizer": ("aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::sqrt", "aten::_foreach"),
}


def matmul_ceiling(dtype, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """GFLOP/s of one n x n matmul: the best of `trials` timings (a ceiling, so noise should not lower it)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def forward_flops(cfg, batches: list[tuple[int, int]], attention: bool = True) -> float:
    """Forward FLOPs of padded batches, each given as (tokens it holds, padded length); with
    attention=False, those of the linear layers alone."""
    h, f, layers = cfg.dim, cfg.hidden_dim, cfg.n_layers
    return sum(
        tokens * layers * (2 * (4 * h * h + 2 * h * f) + (4 * length * h if attention else 0))
        for tokens, length in batches
    )


class Loop:
    """One kernel's training state, stepped through the same batches every round."""

    def __init__(self, cfg, kernel: str):
        import torch

        from ray_jobs.inference import autocast_dtype
        from ray_jobs.model import build_model, prepare_for_training
        from ray_jobs.train_steps import make_optimizer

        self.model, self.tokenizer = build_model(cfg.model, seed=cfg.train.seed)
        prepare_for_training(self.model, cfg.model.freeze_embeddings, kernel)
        self.model.train()
        self.opt = make_optimizer(self.model, cfg.train.lr, cfg.train.weight_decay)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.amp = autocast_dtype(cfg.train.precision, "cpu")

    def step(self, ids, mask, labels, marks=None):
        import torch

        from ray_jobs.train_steps import train_step

        return train_step(
            self.model, ids, mask, labels, self.opt, self.scaler, self.amp, 1.0, torch.device("cpu"), marks
        )

    def run(self, batches) -> dict[str, float]:
        fwd = bwd = opt = 0.0
        samples = 0
        for ids, mask, labels in batches:
            marks = [time.perf_counter()]
            self.step(ids, mask, labels, marks)
            marks.append(time.perf_counter())
            fwd, bwd, opt = fwd + marks[1] - marks[0], bwd + marks[2] - marks[1], opt + marks[3] - marks[2]
            samples += len(labels)
        total = fwd + bwd + opt
        return {"seconds": total, "samples": samples, "forward": fwd, "backward": bwd, "optimizer": opt}

    def categories(self, batches) -> dict[str, float]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for ids, mask, labels in batches:
                self.step(ids, mask, labels)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares = dict.fromkeys([*CATEGORIES, "other"], 0.0)
        for e in events:
            cat = next((c for c, names in CATEGORIES.items() if e.key.startswith(names)), "other")
            shares[cat] += e.self_cpu_time_total / total
        return {k: round(v, 3) for k, v in shares.items()}


def bare_forward(model, batches, amp) -> float:
    import torch

    from ray_jobs.inference import autocast

    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast("cpu", amp):
        for ids, mask, _ in batches:
            model(input_ids=ids, attention_mask=mask)
    model.train()
    return time.perf_counter() - t0


def attention_kernels(lengths=(128, 256, 384, 512), batch: int = 16, heads: int = 12, width: int = 32, reps: int = 5):
    """ms forward and backward of one attention call per kernel and length (one padded row), in bf16 where
    the CPU has it, else fp32."""
    import torch

    from ray_jobs.inference import cpu_supports_bf16
    from ray_jobs.model import matmul_attention

    dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    print(f"attention kernels in {dtype}", flush=True)

    def sdpa(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def matmul(q, k, v, mask):
        return matmul_attention(None, q, k, v, mask)[0]

    out = {}
    for length in lengths:
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
        mask[0, :, :, length // 2 :] = False
        for name, fn in (("sdpa", sdpa), ("matmul", matmul)):
            fwd = bwd = 0.0
            for i in range(reps + 1):
                q, k, v = (torch.randn(batch, heads, length, width, dtype=dtype, requires_grad=True) for _ in "qkv")
                t0 = time.perf_counter()
                o = fn(q, k, v, mask)
                t1 = time.perf_counter()
                o.float().sum().backward()
                t2 = time.perf_counter()
                if i:  # the first call warms up
                    fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
            out[f"{length}/{name}"] = {
                "forward_ms": round(1000 * fwd / reps, 1),
                "backward_ms": round(1000 * bwd / reps, 1),
            }
            print(f"attention {length} tokens, {name}: {out[f'{length}/{name}']}", flush=True)
    return out


def ray_rates(cfg, train, val) -> dict[str, float]:
    import ray

    from ray_jobs.ingest import tokenize_splits
    from ray_jobs.train import fit, system_settings

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        data = tokenize_splits(train, val, cfg.model)
        for kernel in KERNELS:
            c = cfg.model_copy(deep=True)
            c.train.attention = kernel
            result = fit(c, system_settings(c, data), run_name=f"train-profile-{kernel}-{int(time.time())}")
            out[kernel] = result.metrics["train_samples_per_s"]
            print(f"Ray Train, 1 worker x 2 CPUs, {kernel}: {out[kernel]:.2f} samples/s", flush=True)
    finally:
        ray.shutdown()
    return out


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune_configs/imdb_cpu.yaml")
    p.add_argument("--data", help="labelled file (e.g. IMDB train.parquet); required unless --attention")
    p.add_argument("--samples", type=int, default=320)
    p.add_argument("--max-length", type=int, nargs="+", default=[512, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray", action="store_true", help="also run Ray Train with each kernel")
    p.add_argument("--attention", action="store_true", help="time only the attention kernels")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(2)
    if not args.attention and not args.data:
        p.error("--data is required")
    if args.attention:
        result = attention_kernels()
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    base = load_config(args.config, ["train.epochs=1", "train.storage_path=runs/bench-profile"])
    split = split_examples(load_file(args.data), base.data.val_fraction, base.data.test_fraction, seed=0)
    train = split.train.take(range(min(args.samples, len(split.train))))
    from ray_jobs.inference import cpu_supports_bf16, resolved_precision

    precision = resolved_precision(base.train.precision)
    report: dict = {
        "samples": len(train),
        "threads": 2,
        "cpu_bf16": cpu_supports_bf16(),
        "precision": precision,
        "ceilings_gflops": {},
        "lengths": {},
    }
    ceilings = [("fp32", torch.float32)]
    if cpu_supports_bf16() or precision == "bf16":
        ceilings.insert(0, ("bf16", torch.bfloat16))
    for name, dtype in ceilings:
        report["ceilings_gflops"][f"matmul_2048_{name}"] = round(matmul_ceiling(dtype), 1)
    report["ceiling_gflops"] = report["ceilings_gflops"][f"matmul_2048_{precision}"]
    print(
        f"{len(train)} reviews, 2 threads, training in {precision}; ceilings (GFLOP/s): {report['ceilings_gflops']}",
        flush=True,
    )
    for max_length in args.max_length:
        cfg = base.model_copy(deep=True)
        cfg.model.max_length = max_length
        loops = {k: Loop(cfg, k) for k in KERNELS}
        tok = loops["sdpa"].tokenizer
        t0 = time.perf_counter()
        seqs = encode(tok, train.texts, max_length, cfg.model.truncation, cfg.model.head_fraction)
        tokenize_s = time.perf_counter() - t0
        order = batch_order([len(s) for s in seqs], cfg.train.batch_size, seed=0, bucketing=cfg.train.length_bucketing)
        batches = []
        for idx in order:
            ids, mask = pad_batch([seqs[i] for i in idx], tok.pad_token_id)
            batches.append((ids, mask, [train.labels[i] for i in idx]))
        real = sum(len(s) for s in seqs)
        padded = sum(b[0].numel() for b in batches)
        shapes = [(b[0].numel(), b[0].shape[1]) for b in batches]
        fwd_flops = forward_flops(loops["sdpa"].model.config, shapes)
        linear_flops = forward_flops(loops["sdpa"].model.config, shapes, attention=False)
        for loop in loops.values():  # warm-up: first-call allocations and kernel selection
            for b in batches[:2]:
                loop.step(*b)
        runs = {k: [] for k in KERNELS}
        forward_s = []
        for r in range(args.rounds):
            for k in KERNELS if r % 2 == 0 else reversed(KERNELS):
                runs[k].append(loops[k].run(batches))
            forward_s.append(bare_forward(loops["sdpa"].model, batches, loops["sdpa"].amp))
            rates = {k: runs[k][-1]["samples"] / runs[k][-1]["seconds"] for k in KERNELS}
            print(
                f"max_length {max_length} round {r + 1}: "
                + ", ".join(f"{k} {v:.2f} samples/s" for k, v in rates.items()),
                flush=True,
            )
        row: dict = {
            "mean_tokens": round(real / len(seqs), 1),
            "padding_waste": round(1 - real / padded, 4),
            "tokenize_ms_per_review": round(1000 * tokenize_s / len(seqs), 2),
            "train_gflop_per_review": round(3 * fwd_flops / len(seqs) / 1e9, 2),
            "bare_forward_gflops": round(fwd_flops / statistics.median(forward_s) / 1e9, 1),
            "kernels": {},
        }
        for k in KERNELS:
            med = sorted(runs[k], key=lambda x: x["seconds"])[len(runs[k]) // 2]
            shares = loops[k].categories(batches[: min(6, len(batches))])
            row["kernels"][k] = {
                "samples_per_s": round(med["samples"] / med["seconds"], 2),
                "gflops": round(3 * fwd_flops / med["seconds"] / 1e9, 1),
                "step_shares": {ph: round(med[ph] / med["seconds"], 3) for ph in ("forward", "backward", "optimizer")},
                "op_shares": shares,
                # The profiled steps are the first few batches, the timed ones all of them: an estimate.
                "linear_gflops": round(3 * linear_flops / (med["seconds"] * shares["linear"]) / 1e9, 1),
                "bound_if_only_linear": round(1 / shares["linear"], 2),
            }
        row["speedup_matmul_over_sdpa"] = round(
            row["kernels"]["matmul"]["samples_per_s"] / row["kernels"]["sdpa"]["samples_per_s"], 3
        )
        report["lengths"][str(max_length)] = row
        print(json.dumps({max_length: row}, indent=1), flush=True)
    if args.ray:
        cfg = base.model_copy(deep=True)
        cfg.model.max_length = args.max_length[0]
        cfg.train.eval_every_steps = None
        cfg.train.log_every_steps = 100000
        val = split.val.take(range(min(32, len(split.val))))
        report["ray_train_samples_per_s"] = ray_rates(cfg, train, val)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def print_table(report: dict) -> None:
    prec, ceiling = report["precision"], report["ceiling_gflops"]
    print(f"\nceilings (GFLOP/s): {report['ceilings_gflops']}; training in {prec}, compared with the {prec} matmul")
    print(
        "| max_length | loop | samples/s | GFLOP/s | of ceiling | forward / backward / optimizer "
        "| linear layers: share, GFLOP/s | bound with linear layers as they are |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for length, row in report["lengths"].items():
        print(
            f"| {length} | bare {prec} forward (SDPA) | - | {row['bare_forward_gflops']} | "
            f"{row['bare_forward_gflops'] / ceiling:.0%} | - | | |"
        )
        for k, kr in row["kernels"].items():
            sh = kr["step_shares"]
            print(
                f"| {length} | training, {k} attention | {kr['samples_per_s']} | {kr['gflops']} | "
                f"{kr['gflops'] / ceiling:.0%} | "
                f"{sh['forward']:.0%} / {sh['backward']:.0%} / {sh['optimizer']:.0%} | "
                f"{kr['op_shares']['linear']:.0%}, {kr['linear_gflops']} | {kr['bound_if_only_linear']}x |"
            )
        print(f"| {length} | new / old | {row['speedup_matmul_over_sdpa']}x | | | | | |")
    ray = report.get("ray_train_samples_per_s")
    if ray:
        first = next(iter(report["lengths"].values()))
        for k, v in ray.items():
            plain = first["kernels"][k]["samples_per_s"]
            print(f"Ray Train ({k}): {v:.2f} samples/s = {v / plain:.0%} of the plain loop")


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: a plain single-process PyTorch loop vs Ray Train with 1 and 2 workers, same
model, same data, same training step (`ray_jobs.train.train_step`), same total cores, in one run.

    python benchmarks/train_throughput.py                                  # synthetic reviews
    python benchmarks/train_throughput.py --data ../shared/data/imdb/train.parquet --samples 640

samples/s counts the training steps of one epoch (validation excluded) in every variant; the
wall column adds Ray's start-up of the workers for the Ray variants.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.data import Split, batch_order, encode, generate_reviews, load_file, pad_batch, split_examples  # noqa: E402


def plain_loop(cfg, train: Split, threads: int) -> float:
    import torch

    from ray_jobs.inference import autocast_dtype
    from ray_jobs.model import build_model, prepare_for_training
    from ray_jobs.train_steps import make_optimizer, train_step

    torch.set_num_threads(threads)
    model, tok = build_model(cfg.model, seed=cfg.train.seed)
    prepare_for_training(model, cfg.model.freeze_embeddings, cfg.train.attention)  # as the Ray Train workers do
    model.train()
    dev = torch.device("cpu")
    amp = autocast_dtype(cfg.train.precision, "cpu")
    opt = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seqs = encode(tok, train.texts, cfg.model.max_length, cfg.model.truncation, cfg.model.head_fraction)
    batches = batch_order([len(s) for s in seqs], cfg.train.batch_size, seed=0, bucketing=cfg.train.length_bucketing)
    t0 = time.time()
    n = 0
    for idx in batches:
        ids, mask = pad_batch([seqs[i] for i in idx], tok.pad_token_id)
        train_step(model, ids, mask, [train.labels[i] for i in idx], opt, scaler, amp, 1.0, dev)
        n += len(idx)
    return n / (time.time() - t0)


def ray_train(cfg, train: Split, val: Split, workers: int, cpus_per_worker: int) -> tuple[float, float]:
    from ray_jobs.ingest import tokenize_splits
    from ray_jobs.train import fit, system_settings

    c = cfg.model_copy(deep=True)
    c.train.num_workers, c.train.cpus_per_worker, c.train.threads_per_worker = workers, cpus_per_worker, cpus_per_worker
    # Ray Train's per-worker batch: keep the global batch equal to the plain loop's.
    c.train.batch_size = cfg.train.batch_size // workers
    t0 = time.time()
    result = fit(
        c, system_settings(c, tokenize_splits(train, val, c.model)), run_name=f"throughput-{workers}w-{int(t0)}"
    )
    return result.metrics["train_samples_per_s"], len(train) / (time.time() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune_configs/quickstart.yaml")
    p.add_argument("--data", help="labelled file; default: synthetic reviews")
    p.add_argument("--samples", type=int, default=960)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(
        args.config,
        [
            f"model.max_length={args.max_length}",
            "train.epochs=1",
            "train.batch_size=16",
            "train.storage_path=runs/bench-ray",
            "train.log_every_steps=100000",
            *args.overrides,
        ],
    )
    examples = load_file(args.data) if args.data else generate_reviews(args.samples * 2, seed=0)
    s = split_examples(examples, 0.02, 0.02, seed=0)
    train, val = s.train.take(range(min(args.samples, len(s.train)))), s.val.take(range(min(32, len(s.val))))
    cores = 2
    print(
        f"{len(train)} training samples, max_length {args.max_length}, global batch 16, precision "
        f"{cfg.train.precision}, {cores} cores",
        flush=True,
    )
    plain = plain_loop(cfg, train, threads=cores)
    print(f"plain PyTorch loop, 1 process x {cores} threads: {plain:.1f} samples/s", flush=True)
    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    rows = [("plain PyTorch loop (1 process, 2 threads)", plain, None)]
    for workers, cpw in ((1, 2), (2, 1)):
        sps, wall = ray_train(cfg, train, val, workers, cpw)
        rows.append(
            (
                f"Ray Train, {workers} worker(s) x {cpw} CPU (DDP)"
                if workers > 1
                else f"Ray Train, 1 worker x {cpw} CPUs",
                sps,
                wall,
            )
        )
        print(
            f"{rows[-1][0]}: {sps:.1f} samples/s ({sps / plain:.2f}x plain), wall incl. start-up {wall:.1f} samples/s",
            flush=True,
        )
    ray.shutdown()
    print("\n| variant | samples/s | vs plain | samples/s incl. start-up |\n|---|---|---|---|")
    for name, sps, wall in rows:
        print(f"| {name} | {sps:.1f} | {sps / plain:.2f}x | {'-' if wall is None else f'{wall:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

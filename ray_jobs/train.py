"""Ray Train: fine-tune the classifier with DDP over N workers, validating and checkpointing as it goes.

`train_loop_per_worker` runs in every worker; `fit` builds the `TorchTrainer` (also used by each Tune trial).
Entry point: ``python -m ray_jobs.train --config tune_configs/quickstart.yaml``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.config import TUNABLE, PipelineConfig
from ray_jobs.data import Split, batch_order, encode, pad_batch
from ray_jobs.errors import SentimentError
from ray_jobs.runtime import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, absolute, config_parser, get_logger, init_ray, load_from_args

log = get_logger("ray_jobs.train")

STATE_FILE = "training_state.pt"
METRIC = "val_f1"


@dataclass
class FaultInjection:
    """Test hook: the last-ranked worker exits once (guarded by `marker`) in the middle of the epoch
    after epoch `at_epoch` (0-based) was checkpointed, so tests can prove that Ray Train resumes from
    that checkpoint rather than from the start."""

    marker: str
    at_epoch: int = 0


# --------------------------------------------------------------------------------------------------
# Helpers that run inside a worker


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
        return torch.bfloat16
    # auto
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def binary_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1}


def _all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _validate(model, seqs: list[list[int]], labels: list[int], pad_id: int, batch_size: int, device, amp_dtype, world: int) -> dict[str, float]:
    """Loss and binary metrics over the whole validation split (each rank scores its shard, then sum)."""
    import torch

    model.eval()
    loss_sum = tp = fp = fn = tn = 0.0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted: little padding
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            y = torch.tensor([labels[i] for i in idx], device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(-1)
            tp += ((pred == 1) & (y == 1)).sum().item()
            fp += ((pred == 1) & (y == 0)).sum().item()
            fn += ((pred == 0) & (y == 1)).sum().item()
            tn += ((pred == 0) & (y == 0)).sum().item()
    loss_sum, tp, fp, fn, tn = _all_reduce([loss_sum, tp, fp, fn, tn], world)
    model.train()
    n = tp + fp + fn + tn
    return {"val_loss": loss_sum / max(n, 1), **{f"val_{k}": v for k, v in binary_metrics(tp, fp, fn, tn).items()}}


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW without weight decay on biases and LayerNorm weights (the BERT recipe)."""
    import torch

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def train_step(model, ids, mask, labels: list[int], optimizer, scaler, amp_dtype, max_grad_norm: float, device):
    """One optimizer step on one padded batch (autocast when `amp_dtype` is set; loss scaling for fp16).
    Shared by the Ray Train loop and the benchmarks' plain PyTorch loop, so both time the same work."""
    import torch

    y = torch.tensor(labels, device=device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss


def _inject_fault(fault: dict, rank: int, world: int, last_report: float) -> None:
    """Test hook (see FaultInjection): the last rank exits mid-epoch, once."""
    if rank != world - 1 or os.path.exists(fault["marker"]):
        return
    # Give the controller time to register the last reported checkpoint, as it would have in a
    # real run where failures do not strike within a second of a report.
    time.sleep(max(0.0, 3.0 - (time.time() - last_report)))
    Path(fault["marker"]).write_text("killed once\n")
    get_logger("ray_jobs.train.worker").warning("fault injection: worker %d exits mid-epoch", rank)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker. `config` holds the hyper-parameters (flat names from `TUNABLE`) and one
    `system` entry with what is not a hyper-parameter: the validated pipeline config, a Ray object
    reference to the (train, val) splits, run metadata and the optional fault injection."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray_jobs.model import build_model

    t_start = time.time()
    system = config["system"]
    hparams = {k: v for k, v in config.items() if k != "system"}
    cfg = PipelineConfig.model_validate(system["cfg"]).with_hparams(hparams)
    tc, mc = cfg.train, cfg.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.threads_per_worker or max(1, int(tc.cpus_per_worker)))
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(tc.precision, device.type)
    wlog = get_logger("ray_jobs.train.worker")

    # Resume state first: a resumed run continues from the checkpoint's weights and tokenizer.
    model, tokenizer = build_model(mc, seed=tc.seed)
    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "elapsed_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    resume_opt = None
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        state = saved["progress"]
        resume_opt = saved
        if rank == 0:
            wlog.info("resuming from checkpoint at epoch %d step %d", state["epoch"], state["step_in_epoch"])

    train_split, val_split = ray.get(system["data_ref"])
    # Each rank tokenizes only its shard. Shards are cut to equal size so that every rank runs the
    # same number of steps (DDP all-reduces every step; a rank with one batch more would hang).
    per_rank = len(train_split) // world
    if per_rank < 1:
        raise ValueError(f"{len(train_split)} training examples cannot feed {world} workers")
    shard = list(range(rank, len(train_split), world))[:per_rank]
    enc = dict(max_length=mc.max_length, truncation=mc.truncation, head_fraction=mc.head_fraction)
    train_seqs = encode(tokenizer, [train_split.texts[i] for i in shard], **enc)
    train_labels = [train_split.labels[i] for i in shard]
    val_idx = list(range(rank, len(val_split), world))
    val_seqs = encode(tokenizer, [val_split.texts[i] for i in val_idx], **enc)
    val_labels = [val_split.labels[i] for i in val_idx]
    lengths = [len(s) for s in train_seqs]

    if mc.freeze_embeddings:
        model.distilbert.embeddings.word_embeddings.weight.requires_grad_(False)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    steps_per_epoch = math.ceil(per_rank / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    # Linear warm-up and decay to zero at the last step. With a time budget the last step is the
    # one the budget allows, re-estimated from the measured step rate (evaluations included), so
    # the learning rate reaches zero when the clock runs out instead of being cut off mid-decay.
    horizon = [min(total_steps, state.get("horizon", total_steps))]

    def lr_factor(step: int) -> float:
        warm = int(tc.warmup_ratio * horizon[0])
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (horizon[0] - step) / max(1, horizon[0] - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if resume_opt is not None:
        optimizer.load_state_dict(resume_opt["optimizer"])
        scheduler.load_state_dict(resume_opt["scheduler"])
        scaler.load_state_dict(resume_opt["scaler"])

    resumed_from_step = state["global_step"]  # 0 for a fresh run: tests use it to prove a resume
    fault = system.get("fault")
    elapsed_before = state["elapsed_s"]
    budget = tc.time_budget_s
    pad_id = tokenizer.pad_token_id
    meta = {**system.get("meta", {}), "hparams": hparams, "max_length": mc.max_length, "truncation": mc.truncation,
            "head_fraction": mc.head_fraction, "num_workers": world}

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    def report(epoch: int, step_in_epoch: int, train_loss: float, samples: int, seconds: float, stopped: bool) -> dict:
        metrics = _validate(model, val_seqs, val_labels, pad_id, tc.eval_batch_size, device, amp_dtype, world)
        metrics.update(
            epoch=epoch + step_in_epoch / steps_per_epoch, step=state["global_step"], train_loss=train_loss,
            resumed_from_step=resumed_from_step,
            train_samples_per_s=samples * world / max(seconds, 1e-9), elapsed_s=elapsed(), stopped_by_budget=stopped,
        )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                from ray_jobs.model import save_model

                save_model(model, tokenizer, tmp, {**meta, "metrics": metrics})
                torch.save(
                    {"progress": {**state, "epoch": epoch, "step_in_epoch": step_in_epoch, "elapsed_s": elapsed(), "horizon": horizon[0]},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
                    os.path.join(tmp, STATE_FILE),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                wlog.info(
                    "epoch %.2f step %d: train_loss %.4f val_loss %.4f val_f1 %.4f val_acc %.4f (%.1f samples/s, %.0fs)",
                    metrics["epoch"], state["global_step"], train_loss, metrics["val_loss"], metrics["val_f1"],
                    metrics["val_accuracy"], metrics["train_samples_per_s"], metrics["elapsed_s"],
                )
            ray.train.report(metrics, checkpoint=ckpt)
        return metrics

    model.train()
    last_report = time.time()
    stop = False
    t_loop, start_step = time.time(), state["global_step"]
    for epoch in range(state["epoch"], tc.epochs):
        batches = batch_order(lengths, tc.batch_size, seed=tc.seed * 1000 + epoch, bucketing=tc.length_bucketing)
        skip = state["step_in_epoch"] if epoch == state["epoch"] else 0
        loss_sum, loss_n, samples, t_window = 0.0, 0, 0, time.time()
        step_in_epoch = skip
        for step_in_epoch, idx in enumerate(batches[skip:], start=skip + 1):
            ids, mask = pad_batch([train_seqs[i] for i in idx], pad_id)
            loss = train_step(model, ids, mask, [train_labels[i] for i in idx], optimizer, scaler, amp_dtype, tc.max_grad_norm, device)
            scheduler.step()
            state["global_step"] += 1
            loss_sum += loss.item()
            loss_n += 1
            samples += len(idx)
            if rank == 0 and state["global_step"] % tc.log_every_steps == 0:
                wlog.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, step_in_epoch, steps_per_epoch,
                          loss_sum / loss_n, scheduler.get_last_lr()[0])
            # Every rank must take the same decision: rank 0's clock decides, all-reduced (max).
            if budget is not None and state["global_step"] % 25 == 0 and state["global_step"] > start_step:
                rate = (time.time() - t_loop) / (state["global_step"] - start_step)  # s/step, evals included
                remaining = (budget - elapsed()) / rate
                horizon[0] = max(state["global_step"] + 1, min(total_steps, int(state["global_step"] + 0.97 * remaining)))
            if fault and epoch == fault["at_epoch"] + 1 and step_in_epoch == max(1, len(batches) // 2):
                _inject_fault(fault, rank, world, last_report)
            over = budget is not None and _all_reduce([float(elapsed() > budget)], world, op="max")[0] > 0
            due = tc.eval_every_steps and state["global_step"] % tc.eval_every_steps == 0 and step_in_epoch < len(batches)
            if over or due:
                train_loss = _all_reduce([loss_sum / max(loss_n, 1)], world)[0] / world
                report(epoch, step_in_epoch, train_loss, samples, time.time() - t_window, stopped=bool(over))
                loss_sum, loss_n, samples, t_window = 0.0, 0, 0, time.time()
                if over:
                    stop = True
                    break
        if stop:
            if rank == 0:
                wlog.info("time budget of %.0fs reached at epoch %d step %d: stopped", budget, epoch + 1, step_in_epoch)
            break
        train_loss = _all_reduce([loss_sum / max(loss_n, 1)], world)[0] / world
        report(epoch + 1, 0, train_loss, samples, time.time() - t_window, stopped=False)
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        last_report = time.time()


# --------------------------------------------------------------------------------------------------
# Driver side


def hparams_of(cfg: PipelineConfig) -> dict[str, Any]:
    """The tunable hyper-parameters' values in `cfg` (flat names, as Tune samples them)."""
    sections = {"train": cfg.train, "model": cfg.model}
    return {k: getattr(sections[s], k) for k, s in TUNABLE.items()}


def system_settings(cfg: PipelineConfig, data_ref, meta: dict[str, Any] | None = None, fault: FaultInjection | None = None) -> dict[str, Any]:
    return {
        "cfg": cfg.model_dump(mode="json"),
        "data_ref": data_ref,
        "meta": meta or {},
        "fault": None if fault is None else {"marker": fault.marker, "at_epoch": fault.at_epoch},
    }


def put_data(train: Split, val: Split):
    """Put the splits in Ray's object store once; every worker (and every trial) reads them from there."""
    import ray

    return ray.put((train, val))


def fit(cfg: PipelineConfig, system: dict[str, Any], hparams: dict[str, Any] | None = None, run_name: str | None = None, callbacks: list | None = None):
    """Build and fit the TorchTrainer. Returns Ray Train's `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**(hparams if hparams is not None else hparams_of(cfg)), "system": system},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        run_config=RunConfig(
            # A unique name per run: a reused name would resume from the old run's checkpoints.
            name=run_name or f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=absolute(tc.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def best_checkpoint(result) -> tuple[str, dict[str, Any]]:
    """(path, metrics) of the checkpoint with the highest validation F1."""
    pairs = getattr(result, "best_checkpoints", None) or []
    if not pairs:
        raise SentimentError("the training run left no checkpoint")
    # On a tie the later checkpoint wins: it has seen more data (and a lower learning rate).
    ckpt, metrics = max(pairs, key=lambda p: (p[1].get(METRIC, -1.0), p[1].get("step", 0)))
    return ckpt.path, metrics


def start_run(args) -> tuple[PipelineConfig, Any, dict[str, Any]] | None:
    """For the command-line entry points: config and splits loaded (None after logging the error:
    the caller exits with EXIT_USAGE), Ray started, the data in the object store.
    Returns (config, data reference, run metadata)."""
    from ray_jobs.data import load_splits

    try:
        cfg = load_from_args(args)
        splits = load_splits(cfg.data)
    except SentimentError as err:
        log.error("%s", err)
        return None
    log.info("data: %d train / %d val / %d test examples, digests %s", len(splits.train), len(splits.val), len(splits.test), splits.digests())
    init_ray(cfg.ray)
    return cfg, put_data(splits.train, splits.val), {"config_digest": cfg.digest(), "data_digests": splits.digests()}


def main(argv: list[str] | None = None) -> int:
    args = config_parser("Fine-tune the sentiment classifier with Ray Train (no search, no registry).").parse_args(argv)
    started = start_run(args)
    if started is None:
        return EXIT_USAGE
    cfg, data_ref, meta = started
    try:
        result = fit(cfg, system_settings(cfg, data_ref, meta))
        path, metrics = best_checkpoint(result)
    except Exception as err:  # Ray wraps worker errors; the message is what the user needs
        log.error("training failed: %s", err)
        return EXIT_FAILURE
    log.info("best checkpoint (val_f1 %.4f, epoch %.2f): %s", metrics["val_f1"], metrics["epoch"], path)
    print(path)  # the one line of stdout: the checkpoint folder, for scripts
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

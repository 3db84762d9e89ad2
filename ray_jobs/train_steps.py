"""The pieces of the training loop, each small enough to test and benchmark alone: progress and the
learning-rate schedule, the worker's data shard, the training step, validation, the weight average, the
optimizer, and fault injection for tests. ray_jobs.train_worker assembles them into a DDP worker; the
benchmarks time `train_step` on its own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.config import TrainConfig
from ray_jobs.data import pad_batch
from ray_jobs.errors import SentimentError
from ray_jobs.inference import autocast, batched_logits, binary_metrics, confusion_counts
from ray_jobs.ingest import TokenRows

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is. Saved in every checkpoint, so that a restarted worker continues from it."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    elapsed_s: float = 0.0
    horizon: int | None = None  # the LR schedule's last step, when a time budget moved it


class LinearSchedule:
    """Linear warm-up, then linear decay to zero at the horizon (the BERT recipe). With a time budget,
    the horizon is the step the budget allows, re-estimated from the measured step rate (evaluations
    included), so that the learning rate reaches zero when the clock runs out instead of being cut
    off mid-decay."""

    def __init__(
        self, total_steps: int, warmup_ratio: float, budget_s: float | None = None, horizon: int | None = None
    ):
        self.total_steps, self.warmup_ratio, self.budget_s = total_steps, warmup_ratio, budget_s
        self.horizon = min(total_steps, horizon or total_steps)

    def factor(self, step: int) -> float:
        """The learning rate's multiplier at `step` (0-based)."""
        warm = int(self.warmup_ratio * self.horizon)
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (self.horizon - step) / max(1, self.horizon - warm))

    def re_estimate(self, step: int, seconds_per_step: float, elapsed_s: float) -> None:
        if self.budget_s is not None:
            remaining_steps = (self.budget_s - elapsed_s) / seconds_per_step
            self.horizon = max(step + 1, min(self.total_steps, int(step + 0.97 * remaining_steps)))

    def over_budget(self, elapsed_s: float) -> bool:
        return self.budget_s is not None and elapsed_s > self.budget_s


@dataclass
class StepInfo:
    """What a training callback sees after each optimizer step."""

    rank: int
    world: int
    epoch: int  # 0-based
    step_in_epoch: int  # 1-based
    steps_in_epoch: int
    last_checkpoint_at: float  # time.time() of the last epoch-end report


@dataclass
class FaultInjection:
    """A training callback for tests: the last-ranked worker exits once (guarded by `marker`) in the
    middle of the epoch after epoch `at_epoch` (0-based) was checkpointed, so tests can prove that Ray
    Train resumes from that checkpoint rather than from the start."""

    marker: str
    at_epoch: int = 0

    def on_step(self, s: StepInfo) -> None:
        if s.epoch != self.at_epoch + 1 or s.step_in_epoch != max(1, s.steps_in_epoch // 2):
            return
        if s.rank != s.world - 1 or os.path.exists(self.marker):
            return
        # Give the controller time to register the last reported checkpoint, as it would have in a
        # real run where failures do not strike within a second of a report.
        time.sleep(max(0.0, 3.0 - (time.time() - s.last_checkpoint_at)))
        Path(self.marker).write_text("killed once\n")
        log.warning("fault injection: worker %d exits mid-epoch", s.rank)
        os._exit(1)


@dataclass
class ShardData:
    """This rank's token ids: an equal share of the training split (every rank must run the same number
    of steps: DDP all-reduces every step, and a rank with one batch more would hang) and its share of
    the validation split (scored per rank, then summed)."""

    train_seqs: TokenRows
    train_labels: list[int]
    val_seqs: TokenRows
    val_labels: list[int]

    @property
    def lengths(self) -> list[int]:
        return self.train_seqs.lengths()


def read_shards(rank: int, world: int) -> ShardData:
    """This rank's rows of the tokenized splits (ray_jobs.ingest), inside a Ray Train worker."""
    from ray_jobs.ingest import TRAIN, VAL, read_shard

    return ShardData(*read_shard(TRAIN, rank, world, equal=True), *read_shard(VAL, rank, world, equal=False))


def all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    """Element-wise sum (or max) over the DDP ranks."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    # NCCL (Ray Train's backend on GPUs) reduces CUDA tensors only; gloo (CPUs) CPU tensors.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def validate(model, data: ShardData, pad_id: int, batch_size: int, device, amp_dtype, world: int) -> dict[str, float]:
    """Loss and binary metrics over the whole validation split (each rank scores its shard, then sum)."""
    import torch

    was_training = model.training
    model.eval()
    # Eager even where training is compiled: an eval-mode graph would be compiled for a few passes.
    with torch.compiler.set_stance("force_eager"):
        logits = batched_logits(model, data.val_seqs, pad_id, batch_size, device, amp_dtype)
    model.train(was_training)
    loss_sum = (
        torch.nn.functional.cross_entropy(logits, torch.tensor(data.val_labels), reduction="sum").item()
        if data.val_seqs
        else 0.0
    )
    counts = confusion_counts(data.val_labels, logits.argmax(-1).numpy())
    loss_sum, *counts = all_reduce([loss_sum, *counts], world)
    n = sum(counts)
    return {"val_loss": loss_sum / max(n, 1), **{f"val_{k}": v for k, v in binary_metrics(*counts).items()}}


def weight_average(model, decay: float):
    """torch's AveragedModel of `model` as an exponential moving average: after update n (n >= 1) the
    average is d * average + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n))."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    def ema(averaged: list, current: list, n_averaged) -> None:
        n = int(n_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    average = AveragedModel(model, multi_avg_fn=ema, use_buffers=False)
    average.module.eval()
    return average


def make_optimizer(model, lr: float, weight_decay: float, fused: bool | None = None):
    """AdamW without weight decay on biases and LayerNorm weights (the BERT recipe). Fused (one kernel for
    all parameters) where they live on a GPU: the default launches several kernels per group of tensors,
    and at 32 x 256 tokens that alone kept the distilbert-base step at a fraction of the chip
    (benchmarks/gpu_train.py). `fused`: None decides by device; False is the benchmarks' "before"."""
    import torch

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for _, p in params)
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))


@dataclass(frozen=True)
class StepSettings:
    """How a training loop runs its steps on its device (`train.compile`, `train.pad_to_multiple`)."""

    compile: bool
    pad_to_multiple: int
    pin_memory: bool  # page-locked host batches: their copies to the GPU do not wait for the GPU's queue

    @classmethod
    def of(cls, tc: TrainConfig, device) -> StepSettings:
        gpu = device.type == "cuda"
        return cls(
            compile=tc.compile,
            pad_to_multiple=tc.pad_to_multiple or (64 if gpu else 1),
            pin_memory=gpu,
        )

    def batch(self, seqs: list[list[int]], labels: list[int], pad_id: int, max_length: int):
        """(ids, mask, labels) host tensors of one training batch."""
        import torch

        ids, mask = pad_batch(seqs, pad_id, self.pad_to_multiple, cap=max_length)
        y = torch.tensor(labels)
        if self.pin_memory:
            ids, mask, y = ids.pin_memory(), mask.pin_memory(), y.pin_memory()
        return ids, mask, y

    def prepare(self, model) -> None:
        """Compile `model` in place where asked (its state_dict keeps its keys, so checkpoints do not change).
        Torch compiles for the first batch's shape, then again with the length dynamic. It paid on
        fixed-length batches only: on IMDB's variable lengths it did not (docs/gpu.md)."""
        if self.compile:
            model.compile()


def train_step(model, ids, mask, labels, optimizer, scaler, amp_dtype, max_grad_norm: float, device, marks=None):
    """One optimizer step on one padded batch (autocast when `amp_dtype` is set; loss scaling for fp16).
    Shared by the Ray Train loop and the benchmarks' plain PyTorch loop, so both time the same work.
    `labels`: a list, or a tensor (pinned by StepSettings.batch). Nothing here waits for the GPU: the copies
    are asynchronous from pinned memory and the loss stays a device tensor, so the host queues the next step
    while this one computes. `marks`, a list, receives time.perf_counter() after the forward pass and after
    the backward pass (benchmarks/train_profile.py splits a step's time with them)."""
    import torch

    y = labels.to(device, non_blocking=True) if torch.is_tensor(labels) else torch.tensor(labels, device=device)
    with autocast(device.type, amp_dtype):
        logits = model(
            input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True)
        ).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    if marks is not None:
        marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if marks is not None:
        marks.append(time.perf_counter())
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss


def load_initial_weights(model, weights_ref, origin: str) -> None:
    """Load `train.init_from`'s weights (from Ray's object store) into the freshly built model; every
    parameter must be there with its shape, or the run stops with what did not fit."""
    import ray

    state = ray.get(weights_ref)
    own = model.state_dict()
    missing = [k for k, _ in model.named_parameters() if k not in state]
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or wrong:
        raise SentimentError(
            f"train.init_from {origin}: its weights do not fit the configured model "
            f"(missing: {missing[:3]}, other shapes: {wrong[:3]}); the model section must match the one it was "
            "trained with"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

"""The Ray Train worker side: what runs inside each DDP worker (`train_loop_per_worker`, `WorkerRun`):
epochs of steps, reports, checkpoints and resume, built from the pieces in ray_jobs.train_steps.

The driver side (`fit`, the trainer, checkpoint selection) is ray_jobs.train; nothing here runs on the driver.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

from ray_jobs.config import PipelineConfig, TrainConfig
from ray_jobs.data import batch_order
from ray_jobs.inference import autocast_dtype
from ray_jobs.runtime import configure_logging
from ray_jobs.train_steps import (
    LinearSchedule,
    Progress,
    StepInfo,
    StepSettings,
    all_reduce,
    load_initial_weights,
    make_optimizer,
    read_shards,
    train_step,
    validate,
    weight_average,
)

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
# With train.ema_decay, a checkpoint's model.safetensors is the average (what is validated and served) and
# this file holds the weights the optimizer steps, which a resumed run continues from.
TRAIN_WEIGHTS_FILE = "training_weights.safetensors"
# Files of a checkpoint that only a resumed run needs: a registered version leaves them out.
RESUME_FILES = (STATE_FILE, TRAIN_WEIGHTS_FILE)


class WorkerRun:
    """One DDP worker's training state: the model (restored from Ray Train's checkpoint when there is
    one), its shard of the data, the optimizer and schedule, and the progress that checkpoints save.
    Over ~150 lines: restore, epoch loop, report and save share that one state; each step's work is a
    function of ray_jobs.train_steps."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch

        from ray_jobs.model import build_model, prepare_for_training

        self.t_start = time.time()
        system = config["system"]
        self.hparams = {k: v for k, v in config.items() if k != "system"}
        cfg = PipelineConfig.model_validate(system["cfg"]).with_hparams(self.hparams)
        self.tc: TrainConfig = cfg.train
        mc = cfg.model
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(self.tc.threads_per_worker or max(1, int(self.tc.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        self.amp_dtype = autocast_dtype(self.tc.precision, self.device.type)
        self.callbacks = list(system.get("callbacks") or [])

        # Resume state last: a resumed run continues from the checkpoint's weights, whatever it started from.
        model, self.tokenizer = build_model(mc, seed=self.tc.seed)
        if system.get("init") is not None:
            load_initial_weights(model, *system["init"])
        self.progress, saved = self._restore(model)
        self.resumed_from_step = self.progress.global_step  # 0 for a fresh run: tests use it to prove a resume
        self.data = read_shards(self.rank, self.world)
        prepare_for_training(model, mc.freeze_embeddings, self.tc.attention)
        self.model = ray.train.torch.prepare_model(model)
        # The average lives beside the model on each rank: DDP keeps the ranks' weights equal, so are theirs.
        self.average = weight_average(model, self.tc.ema_decay) if self.tc.ema_decay else None
        self.step_settings = StepSettings.of(self.tc, self.device)
        self.step_settings.prepare(model)  # after the average copied the model: the average stays eager
        self.max_length = mc.max_length
        if self.average is not None and saved is not None and "average" in saved:
            self.average.module.load_state_dict(saved["average"], strict=False)
            self.average.n_averaged.fill_(saved.get("ema_updates", 1))
        self.optimizer = make_optimizer(self.model, self.tc.lr, self.tc.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.data.train_seqs) / self.tc.batch_size)
        self.schedule = LinearSchedule(
            self.steps_per_epoch * self.tc.epochs, self.tc.warmup_ratio, self.tc.time_budget_s, self.progress.horizon
        )
        # A lambda, not the bound method: LambdaLR saves no state for plain functions.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.schedule.factor(step))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if saved is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.lr_scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
        self.pad_id = self.tokenizer.pad_token_id
        self.meta = {
            **system.get("meta", {}),
            "hparams": self.hparams,
            "max_length": mc.max_length,
            "truncation": mc.truncation,
            "head_fraction": mc.head_fraction,
            "num_workers": self.world,
        }
        self.last_checkpoint_at = time.time()
        # The step rate the time budget is planned with: over the whole run so far, evaluations included.
        self.t_loop, self.start_step = time.time(), self.progress.global_step

    def _restore(self, model) -> tuple[Progress, dict | None]:
        """Progress and optimizer states from Ray Train's checkpoint (weights loaded into `model`)."""
        import ray.train
        import torch
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return Progress(), None
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            served = load_file(os.path.join(d, "model.safetensors"))
            if os.path.isfile(os.path.join(d, TRAIN_WEIGHTS_FILE)):  # written with train.ema_decay
                model.load_state_dict(load_file(os.path.join(d, TRAIN_WEIGHTS_FILE)), strict=False)
                saved["average"] = served
            else:
                model.load_state_dict(served, strict=False)
        progress = Progress(**saved["progress"])
        if self.rank == 0:
            log.info("resuming from checkpoint at epoch %d step %d", progress.epoch, progress.step_in_epoch)
        return progress, saved

    def elapsed(self) -> float:
        return self.progress.elapsed_s + time.time() - self.t_start

    def _save(self, folder: str, metrics: dict[str, float], epoch: int, step_in_epoch: int) -> None:
        """The model folder (servable as it is) plus the state a restarted run continues from."""
        import torch

        from ray_jobs.model import save_model

        if self.average is None:
            save_model(self.model, self.tokenizer, folder, {**self.meta, "metrics": metrics})
        else:
            from safetensors.torch import save_model as save_weights

            save_model(self.average.module, self.tokenizer, folder, {**self.meta, "metrics": metrics})
            save_weights(
                getattr(self.model, "module", self.model),
                os.path.join(folder, TRAIN_WEIGHTS_FILE),
                metadata={"format": "pt"},  # what transformers expects of a model.safetensors
            )
        progress = {
            **asdict(self.progress),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "elapsed_s": self.elapsed(),
            "horizon": self.schedule.horizon,
        }
        torch.save(
            {
                "progress": progress,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_updates": int(self.average.n_averaged) if self.average is not None else 0,
            },
            os.path.join(folder, STATE_FILE),
        )

    def report(self, epoch: int, step_in_epoch: int, window: _Window, stopped: bool) -> None:
        """Validate, checkpoint (rank 0 writes) and report to Ray Train. Every rank calls it."""
        import ray.train

        train_loss = all_reduce([window.mean_loss], self.world)[0] / self.world
        scored = self.model if self.average is None else self.average.module
        metrics = validate(
            scored, self.data, self.pad_id, self.tc.eval_batch_size, self.device, self.amp_dtype, self.world
        )
        metrics.update(
            epoch=epoch + step_in_epoch / self.steps_per_epoch,
            step=self.progress.global_step,
            train_loss=train_loss,
            resumed_from_step=self.resumed_from_step,
            train_samples_per_s=window.samples * self.world / max(window.seconds, 1e-9),
            elapsed_s=self.elapsed(),
            stopped_by_budget=stopped,
        )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                self._save(tmp, metrics, epoch, step_in_epoch)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                log.info(
                    "epoch %.2f step %d: train_loss %.4f val_loss %.4f val_f1 %.4f val_acc %.4f (%.1f "
                    "samples/s, %.0fs)",
                    metrics["epoch"],
                    metrics["step"],
                    train_loss,
                    metrics["val_loss"],
                    metrics["val_f1"],
                    metrics["val_accuracy"],
                    metrics["train_samples_per_s"],
                    metrics["elapsed_s"],
                )
            ray.train.report(metrics, checkpoint=checkpoint)

    def report_restored(self) -> None:
        """A run restored after its last epoch (its driver died before the end was recorded, e.g. a Tune
        trial that finished within Tune's state-saving period): report the last checkpoint's metrics
        again, so that whoever waits for this run gets its result instead of none."""
        import ray.train

        from ray_jobs.model import read_meta

        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() as d:
            metrics = read_meta(d).get("metrics", {})
        if self.rank == 0:
            log.info(
                "restored after the last epoch (step %d): reporting its checkpoint again", self.progress.global_step
            )
        ray.train.report(
            {**metrics, "resumed_from_step": self.resumed_from_step}, checkpoint=checkpoint if self.rank == 0 else None
        )

    def train_epoch(self, epoch: int) -> bool:
        """Run the rest of `epoch` (all of it unless resuming mid-epoch), validating every
        `eval_every_steps`. False when the time budget ran out (after a last validation and checkpoint)."""
        tc, p = self.tc, self.progress
        batches = batch_order(
            self.data.lengths, tc.batch_size, seed=tc.seed * 1000 + epoch, bucketing=tc.length_bucketing
        )
        skip = p.step_in_epoch if epoch == p.epoch else 0
        window = _Window()
        for step_in_epoch, idx in enumerate(batches[skip:], start=skip + 1):
            ids, mask, labels = self.step_settings.batch(
                [self.data.train_seqs[i] for i in idx],
                [self.data.train_labels[i] for i in idx],
                self.pad_id,
                self.max_length,
            )
            loss = train_step(
                self.model,
                ids,
                mask,
                labels,
                self.optimizer,
                self.scaler,
                self.amp_dtype,
                tc.max_grad_norm,
                self.device,
            )
            self.lr_scheduler.step()
            if self.average is not None:
                self.average.update_parameters(getattr(self.model, "module", self.model))
            p.global_step += 1
            window.add(loss.detach(), len(idx))  # a device tensor: read at log and report time only
            if self.rank == 0 and p.global_step % tc.log_every_steps == 0:
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.2e",
                    epoch + 1,
                    step_in_epoch,
                    self.steps_per_epoch,
                    window.mean_loss,
                    self.lr_scheduler.get_last_lr()[0],
                )
            if p.global_step % 25 == 0 and p.global_step > self.start_step:
                self.schedule.re_estimate(
                    p.global_step, (time.time() - self.t_loop) / (p.global_step - self.start_step), self.elapsed()
                )
            for callback in self.callbacks:
                callback.on_step(
                    StepInfo(self.rank, self.world, epoch, step_in_epoch, len(batches), self.last_checkpoint_at)
                )
            # Every rank must take the same decision: the slowest clock decides (all-reduced max).
            over = (
                self.schedule.budget_s is not None
                and all_reduce([float(self.schedule.over_budget(self.elapsed()))], self.world, op="max")[0] > 0
            )
            due = tc.eval_every_steps and p.global_step % tc.eval_every_steps == 0 and step_in_epoch < len(batches)
            if over or due:
                self.report(epoch, step_in_epoch, window, stopped=over)
                window = _Window()
                if over:
                    if self.rank == 0:
                        log.info(
                            "time budget of %.0fs reached at epoch %d step %d: stopped",
                            self.schedule.budget_s,
                            epoch + 1,
                            step_in_epoch,
                        )
                    return False
        self.report(epoch + 1, 0, window, stopped=False)
        p.epoch, p.step_in_epoch = epoch + 1, 0
        self.last_checkpoint_at = time.time()
        return True


class _Window:
    """Training loss and throughput since the last report."""

    def __init__(self):
        self.loss_sum, self.steps, self.samples, self.t0 = 0.0, 0, 0, time.time()

    def add(self, loss, samples: int) -> None:
        """`loss`: a float or a 0-d tensor (summed where it lives: on a GPU, without waiting for it)."""
        self.loss_sum = self.loss_sum + loss
        self.steps += 1
        self.samples += samples

    @property
    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.steps, 1)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker. `config` holds the hyper-parameters (flat names from `TUNABLE`) and one
    `system` entry with what is not a hyper-parameter: the validated pipeline config, the initial weights'
    object reference, run metadata and optional callbacks (`on_step(StepInfo)`). The token ids come from
    Ray Train's datasets ("train", "val": ray_jobs.ingest), read with `get_dataset_shard`."""
    configure_logging()  # a Ray worker is a process of its own
    run = WorkerRun(config)
    if run.resumed_from_step and run.progress.epoch >= run.tc.epochs:
        run.report_restored()
        return
    run.model.train()
    for epoch in range(run.progress.epoch, run.tc.epochs):
        if not run.train_epoch(epoch):
            break

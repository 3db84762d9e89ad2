"""Ray Train, driver side: fine-tune the classifier with DDP over N workers (`fit` builds the `TorchTrainer`,
also used by each Tune trial), the initial weights and data handed to the workers, and checkpoint selection.

What runs inside each worker is ray_jobs.train_worker. The command is `python -m ray_jobs train`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ray_jobs.config import TUNABLE, PipelineConfig, absolute_path
from ray_jobs.data import Splits
from ray_jobs.errors import SentimentError
from ray_jobs.ingest import StreamedSplits, TokenizedSplits
from ray_jobs.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)

# The reported metric behind each `train.select_by`, and whether more is better ("last": the latest step).
SELECTION_MODES = {"val_loss": "min", "val_f1": "max", "step": "max"}


def checkpoint_metric(select_by: str) -> str:
    """The reported metric that ranks a run's checkpoints under `select_by`."""
    return "step" if select_by == "last" else select_by


def trial_metric(select_by: str) -> str:
    """The reported metric that ranks trials (Tune, ASHA): every trial's last step is alike, so "last"
    compares their validation loss."""
    return "val_loss" if select_by == "last" else select_by


def selection_key(metrics: dict[str, Any], metric: str) -> tuple[float, int]:
    """Sort key for checkpoints (and trials) by a metric of SELECTION_MODES (or "last"): larger is better;
    on a tie the later step wins (it has seen more data, at a lower learning rate)."""
    metric = checkpoint_metric(metric)
    value = metrics.get(metric)
    if value is None:
        return (-math.inf, metrics.get("step", 0))
    return (value if SELECTION_MODES[metric] == "max" else -value, metrics.get("step", 0))


def hparams_of(cfg: PipelineConfig) -> dict[str, Any]:
    """The tunable hyper-parameters' values in `cfg` (flat names, as Tune samples them)."""
    sections = {"train": cfg.train, "model": cfg.model}
    return {k: getattr(sections[s], k) for k, s in TUNABLE.items()}


def initial_weights(cfg: PipelineConfig) -> tuple[Any, str] | None:
    """(object-store reference to the weights, where they came from) for `train.init_from`, or None to
    start from the backbone (also when init_from is "champion" and there is none yet). The driver resolves
    the model and puts its tensors in Ray's object store once, so that workers on any node read them."""
    ref = cfg.train.init_from
    if not ref:
        return None
    import ray
    from safetensors.torch import load_file

    from ray_jobs.registry import Registry

    reg = Registry(cfg.registry)
    if ref == "champion":
        version = reg.champion()
        if version is None:
            log.info("train.init_from champion: there is no champion yet; training starts from the backbone")
            return None
        folder, origin = reg.model_dir(version), f"models:/{cfg.registry.model_name}/{version}"
    else:
        folder, origin = reg.resolve_model_dir(ref), ref
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise SentimentError(f"train.init_from {ref}: {folder} holds no model.safetensors")
    log.info("training starts from the weights of %s", origin)
    return ray.put(load_file(str(weights))), origin


def system_settings(
    cfg: PipelineConfig, data: TokenizedSplits, meta: dict[str, Any] | None = None, callbacks: list | None = None
) -> dict[str, Any]:
    """What every worker gets besides the hyper-parameters: the config, the tokenized splits (Ray Datasets,
    read with `get_dataset_shard`) and the initial weights (`train.init_from`, an object-store
    reference), run metadata. `callbacks` (objects with `on_step(StepInfo)`, e.g. FaultInjection) travel
    to the workers pickled."""
    init = initial_weights(cfg)
    return {
        "cfg": cfg.model_dump(mode="json"),
        "datasets": data.datasets,
        "init": init,
        "meta": {**(meta or {}), "init_from": init[1] if init else "backbone"},
        "callbacks": callbacks or [],
    }


def load_data(cfg: PipelineConfig) -> Splits | StreamedSplits:
    """The run's splits: with data.split=content built on the cluster (ray_jobs.ingest.stream_splits;
    Ray must be started), else on the driver (ray_jobs.data.load_splits)."""
    from ray_jobs.data import load_splits
    from ray_jobs.ingest import stream_splits

    return stream_splits(cfg.data) if streams(cfg) else load_splits(cfg.data)


def streams(cfg: PipelineConfig) -> bool:
    """Whether the splits are built on the cluster: a content split does not depend on read order."""
    return cfg.data.split == "content"


def prepare_data(cfg: PipelineConfig, splits: Splits | StreamedSplits) -> TokenizedSplits:
    """The train and validation splits tokenized once (Ray Data, ray_jobs.ingest): every worker of every
    trial reads them."""
    from ray_jobs.ingest import TRAIN, VAL, tokenize_splits

    if isinstance(splits, StreamedSplits):
        return tokenize_splits(splits.datasets[TRAIN], splits.datasets[VAL], cfg.model, splits.sizes())
    return tokenize_splits(splits.train, splits.val, cfg.model)


def fit(
    cfg: PipelineConfig,
    system: dict[str, Any],
    hparams: dict[str, Any] | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
):
    """Build and fit the TorchTrainer. Returns Ray Train's `Result`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    # The datasets go to Ray Train, not into the workers' config. None is split by Ray Data: each worker
    # picks its rows by position (ray_jobs.ingest.read_shard), whatever the blocks' layout.
    datasets = system["datasets"]
    worker_system = {k: v for k, v in system.items() if k != "datasets"}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**(hparams if hparams is not None else hparams_of(cfg)), "system": worker_system},
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={
                "CPU": tc.cpus_per_worker,
                **({"GPU": 1} if tc.use_gpu else {}),
                **tc.resources_per_worker,
            },
        ),
        run_config=RunConfig(
            # A unique name per run: a reused name would resume from the old run's checkpoints.
            name=run_name or f"{cfg.name}-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=absolute_path(tc.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.num_to_keep,
                checkpoint_score_attribute=checkpoint_metric(tc.select_by),
                checkpoint_score_order=SELECTION_MODES[checkpoint_metric(tc.select_by)],
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def local_checkpoint_dir(path: str, storage_path: str) -> str:
    """A local folder holding the checkpoint that Ray reported at `path`. With local (or NFS) storage that
    is the folder itself. With remote storage (`s3://`, `gs://`, ...) Ray reports the path without its
    scheme; the checkpoint is downloaded to a temporary folder."""
    scheme = storage_path.split("://", 1)[0] if "://" in storage_path else ""
    if not scheme:
        return path
    import ray.train

    uri = path if "://" in path else f"{scheme}://{path}"
    return ray.train.Checkpoint(uri).to_directory(tempfile.mkdtemp(prefix="sentiment-checkpoint-"))


def best_checkpoint(result, select_by: str) -> tuple[str, dict[str, Any]]:
    """(path, metrics) of the best checkpoint by `select_by` (see `selection_key`)."""
    pairs = getattr(result, "best_checkpoints", None) or []
    if not pairs:
        raise SentimentError("the training run left no checkpoint")
    ckpt, metrics = max(pairs, key=lambda p: selection_key(p[1], select_by))
    return ckpt.path, metrics


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.train is no command: run `python -m ray_jobs train`")

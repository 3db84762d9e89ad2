"""Ray Tune: search hyper-parameters over the Ray Train trainer, stopping weak trials early with ASHA.

Ray 2.60 runs Train V2, where a trainer cannot be handed to `Tuner`: each trial runs a small driver
function that builds and fits a `TorchTrainer` (the one from `ray_jobs.train.fit`) whose reports
reach Tune through `TuneReportCallback`.

    python -m ray_jobs tune --config tune_configs/quickstart.yaml            # search only
    python -m ray_jobs tune --config ... --resume runs/tune/<experiment>     # continue an interrupted search
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_jobs.config import PipelineConfig, TrainConfig, absolute_path
from ray_jobs.errors import ConfigError, SentimentError
from ray_jobs.ingest import TokenizedSplits
from ray_jobs.train import (
    SELECTION_MODES,
    checkpoint_metric,
    fit,
    hparams_of,
    selection_key,
    system_settings,
    trial_metric,
)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "checkpoint_path"  # TuneReportCallback puts the checkpoint's path in the metrics under this key


@dataclass
class TrialRecord:
    trial_id: str
    hparams: dict[str, Any]
    status: str  # TERMINATED (ran to the end), STOPPED_EARLY (by ASHA), ERROR
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    select_by: str = TrainConfig.model_fields["select_by"].default

    @property
    def best(self) -> dict[str, Any] | None:
        """The best checkpointed report by `select_by` (ties: the later one)."""
        metric = checkpoint_metric(self.select_by)
        rows = [r for r in self.history if r.get(CHECKPOINT_KEY) and r.get(metric) is not None]
        return max(rows, key=lambda r: selection_key(r, metric)) if rows else None


@dataclass
class SearchOutcome:
    trials: list[TrialRecord]
    experiment_path: str

    @property
    def best_trial(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.best is not None]
        return max(done, key=lambda t: selection_key(t.best, trial_metric(t.select_by))) if done else None


def param_space(cfg: PipelineConfig) -> dict[str, Any]:
    """Tune domains for the configured search space; other hyper-parameters stay at their config value."""
    from ray import tune

    space: dict[str, Any] = dict(hparams_of(cfg))
    for name, p in cfg.tune.search_space.items():
        if p.type == "choice":
            space[name] = tune.choice(p.values)
        elif p.type == "grid":
            space[name] = tune.grid_search(p.values)
        elif p.type == "uniform":
            space[name] = tune.uniform(p.low, p.high)
        else:
            space[name] = tune.loguniform(p.low, p.high)
    return space


def _max_epochs(cfg: PipelineConfig) -> int:
    p = cfg.tune.search_space.get("epochs")
    if p is None:
        return cfg.train.epochs
    return int(max(p.values) if hasattr(p, "values") else math.ceil(p.high))


def _trial(config: dict[str, Any], system: dict[str, Any], run_prefix: str) -> None:
    """One trial: fit a TorchTrainer with the sampled hyper-parameters, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = PipelineConfig.model_validate(system["cfg"]).with_hparams(config)
    trial_id = tune.get_context().get_trial_id()
    # A unique Train run name per trial and per search: a reused name would load another run's checkpoints.
    fit(cfg, system, hparams=config, run_name=f"{run_prefix}-{trial_id}", callbacks=[TuneReportCallback()])


def _tuner(cfg: PipelineConfig, system: dict[str, Any], name: str, restore_path: str | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_parameters(_trial, system=system, run_prefix=name)
    # The trial driver only waits on its TorchTrainer: it reserves no CPU so that the workers get them.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 1024 * 1024})
    if restore_path:
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
    tc = cfg.tune
    scheduler = None
    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(_max_epochs(cfg), tc.asha.grace_period),
            grace_period=tc.asha.grace_period,
            reduction_factor=tc.asha.reduction_factor,
        )
    search_alg = None
    if tc.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise SentimentError("tune.search_alg 'optuna' needs optuna: pip install 'sentiment-ray[optuna]'") from None
        if any(p.type == "grid" for p in tc.search_space.values()):
            raise SentimentError("grid parameters cannot be combined with tune.search_alg 'optuna'")
        search_alg = OptunaSearch(seed=cfg.train.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=trial_metric(cfg.train.select_by),
            mode=SELECTION_MODES[trial_metric(cfg.train.select_by)],
            num_samples=tc.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=tc.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=absolute_path(tc.storage_path),
            failure_config=tune.FailureConfig(max_failures=tc.max_failures),
            verbose=1,
        ),
    )


def _records(result_grid, select_by: str) -> list[TrialRecord]:
    records = []
    for r in result_grid:
        df = r.metrics_dataframe
        history = (
            [] if df is None else [{k: v for k, v in row.items() if v == v} for row in df.to_dict("records")]
        )  # v == v drops NaN
        hp = {k: v for k, v in (r.config or {}).items() if k != "system"}
        trial_id = (r.metrics or {}).get("trial_id") or (history[-1].get("trial_id") if history else "?")
        if r.error is not None:
            status = "ERROR"
        elif history and (
            history[-1].get("epoch", 0) < hp.get("epochs", 0) and not history[-1].get("stopped_by_budget")
        ):
            status = "STOPPED_EARLY"
        else:
            status = "TERMINATED"
        records.append(
            TrialRecord(str(trial_id), hp, status, history, None if r.error is None else str(r.error)[:2000], select_by)
        )
    return records


def run_search(
    cfg: PipelineConfig,
    data: TokenizedSplits,
    meta: dict[str, Any],
    name: str | None = None,
    restore_path: str | None = None,
) -> SearchOutcome:
    """Run (or resume) the search. Crashed trials are recorded, not fatal; it fails only if no trial
    produced a checkpoint."""
    if restore_path:
        restore_path = absolute_path(restore_path).rstrip("/")
        if not Path(restore_path, "tuner.pkl").is_file():
            raise ConfigError(f"--resume: {restore_path} is not a Tune experiment folder (no tuner.pkl)")
        # The experiment's own name, not a new one: each trial's TorchTrainer run is named after it, and
        # Ray Train resumes a run of the same name from its last checkpoint. A new name would start every
        # unfinished trial from step 0.
        name = Path(restore_path).name
        log.info("resuming search %s: finished trials are kept, unfinished ones continue from their checkpoints", name)
    name = name or f"{cfg.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    system = system_settings(cfg, data, meta)
    tuner = _tuner(cfg, system, name, restore_path)
    grid = tuner.fit()
    path = restore_path or f"{absolute_path(cfg.tune.storage_path)}/{name}"
    trials = _records(grid, cfg.train.select_by)
    for t in trials:
        best = t.best
        log.info(
            "trial %s %-13s %s best (by %s): %s",
            t.trial_id,
            t.status,
            {
                k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in t.hparams.items()
                if k in cfg.tune.search_space
            },
            cfg.train.select_by,
            "-" if best is None else f"val_loss {best['val_loss']:.4f} val_f1 {best['val_f1']:.4f}",
        )
    outcome = SearchOutcome(trials, path)
    if outcome.best_trial is None:
        errors = "; ".join(t.error or t.status for t in trials)[:2000]
        raise SentimentError(f"no trial produced a checkpoint ({errors})")
    return outcome


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.tune is no command: run `python -m ray_jobs tune`")

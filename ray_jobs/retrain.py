"""Retraining that runs itself: when a trigger fires, train the next version on the base data plus the
labelled production reviews, gate it offline, and put it in shadow beside the champion.

    python -m ray_jobs retrain --config C            # from cron, or as a `ray job submit` entry point

The triggers (`retrain.*`, any one fires):
- `on_drift_alarm`: the serving app's GET /drift reports an alarm that began after the last retraining
  run gathered its data (an alarm that already caused a retraining does not cause another);
- `min_new_labels`: at least that many labels arrived in the durable log (serve_app.evidence_store)
  since the last retraining run gathered its data;
- `every_s`: the last retraining run started longer ago than this (or there was none).

The data: the pipeline's own source, whose test split (and so the gate's promise) is unchanged, plus the
labelled production texts of the log (`serve.log_texts` must be on: the log keeps only digests
otherwise), deduplicated, as `data.extra_train`, which only ever joins the train split. A
`holdout_fraction` of them (chosen by a hash of the request id, so a request is held out in every run)
is never trained on: both versions are scored on it and the scores recorded. A `val_fraction` (the next
slice of the same hash) joins the validation split as `data.extra_val`: the checkpoint kept and the
trials stopped early are chosen on data that includes the new domain. On the base data alone it
cannot tell a checkpoint that has not learned the new domain (yet, or any more): on the tests' tiny
model, 4 of 30 epochs (5 runs of 6) answered one class for every review of a new domain, one of them
between epochs that got every one right; the checkpoint kept was such a one in 1 of 6 other runs, and
in one CI run, which put that version into shadow. The labels that decide the
live promotion are fresh by construction: the new version scores only requests made after it went into
shadow.

Each run is an MLflow run (tag `retrain`) that records why it fired, when its data ends and the digests
of what it used; the pipeline's run (tuning, registration, gate) is recorded as usual and linked.
Only one runs at a time: a lease in the registry (as the gate's lock) is held for the whole run, and a
trigger that fires while one is in flight starts nothing. Nothing starts while a rollout runs either:
the shadowed version is decided first (`registry promote` or `registry abort`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray_jobs.config import PipelineConfig, absolute_path, evidence_log_uri
from ray_jobs.data import Split, text_key, unit_hash
from ray_jobs.errors import ConfigError, RegistryError, SentimentError
from ray_jobs.evidence_log import EvidenceLog
from ray_jobs.registry import Registry

log = logging.getLogger(__name__)

RETRAIN_TAG = "retrain"  # on every retraining run; its value is the run's status


@dataclass
class RetrainResult:
    reasons: list[str] = field(default_factory=list)  # why it fired; empty: nothing fired
    started: bool = False
    message: str = ""
    run_id: str | None = None
    version: str | None = None
    shadowed: bool = False
    promote: bool = False  # the gate passed (shadowed, or promoted where there was no champion)


@dataclass(frozen=True)
class Production:
    """The labelled production texts a run trains on, validates on, and holds out."""

    train: Split
    val: Split
    holdout: Split

    def digests(self) -> dict[str, str]:
        return {
            "production_train": self.train.digest(),
            "production_val": self.val.digest(),
            "production_holdout": self.holdout.digest(),
        }


def last_run(reg: Registry):
    """The newest retraining run that gathered data (any status but failed-before-data), or None."""
    runs = reg._call(
        "search_runs",
        reg.client.search_runs,
        [reg.experiment_id()],
        filter_string=f"tags.{RETRAIN_TAG} != ''",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return next((r for r in runs if "retrain.labels_until" in r.data.tags), None)


def triggers(cfg: PipelineConfig, reg: Registry, evidence: EvidenceLog) -> list[str]:
    """Why a retraining should start now (empty: it should not)."""
    rt, reasons = cfg.retrain, []
    last = last_run(reg)
    since = float(last.data.tags["retrain.labels_until"]) if last else 0.0
    if rt.on_drift_alarm:
        alarm = _drift_alarm(cfg)
        if alarm is not None and alarm["alarm_since"] > since:
            reasons.append(f"drift alarm on version {alarm.get('model_version')} since {_when(alarm['alarm_since'])}")
    if rt.min_new_labels is not None:
        n = evidence.labels_since(since)
        if n >= rt.min_new_labels:
            reasons.append(f"{n} new labelled predictions since {_when(since) if since else 'the start'}")
    if rt.every_s is not None:
        started = last.info.start_time / 1000 if last else None
        if started is None or time.time() - started >= rt.every_s:
            reasons.append(f"schedule: every {rt.every_s:g} s (last run {_when(started) if started else 'never'})")
    return reasons


def production_data(evidence: EvidenceLog, until: float, holdout_fraction: float, val_fraction: float) -> Production:
    """The labelled production texts up to `until`, deduplicated (the first label of a text wins), split by
    a hash of each request id: below `holdout_fraction` held out, the next `val_fraction` validated on, the
    rest trained on. A request stays where it is from run to run."""
    seen: set[str] = set()
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "holdout": ([], [])}
    for request_id, text, label in evidence.labelled_texts(until):
        key = text_key(text)
        if key in seen:
            continue
        seen.add(key)
        h = unit_hash(request_id, "holdout")
        part = "holdout" if h < holdout_fraction else "val" if h < holdout_fraction + val_fraction else "train"
        parts[part][0].append(text)
        parts[part][1].append(int(label))
    return Production(**{name: Split(*part) for name, part in parts.items()})


def retrain(cfg: PipelineConfig, force: bool = False, deploy_app: bool = True) -> RetrainResult:
    """Check the triggers and, if one fired (or `force`), run one retraining (see the module docstring)."""
    if not cfg.serve.feedback.log.enabled:
        raise ConfigError("retrain reads the durable prediction log: serve.feedback.log.enabled must be true")
    reg = Registry(cfg.registry)
    evidence = EvidenceLog(evidence_log_uri(cfg.serve, cfg.registry), cfg.serve.app_name)
    reasons = triggers(cfg, reg, evidence) or (["forced by hand (--force)"] if force else [])
    if not reasons:
        return RetrainResult(message="no trigger fired: nothing started")
    running = reg.rollout()
    if running is not None:
        return RetrainResult(
            reasons,
            message=f"version {running.version} is in {running.mode}: decide it first (registry promote or abort); "
            "nothing started",
        )
    with contextlib.ExitStack() as held:
        lease_s = cfg.retrain.lock_lease_s
        try:  # only the lock's own failure means "in flight"; the run's errors pass through
            held.enter_context(reg.lock(timeout_s=1.5 * lease_s, lease_s=lease_s, name="retrain"))
        except RegistryError as err:
            return RetrainResult(reasons, message=f"a retraining run is in flight ({err}): nothing started")
        return _run(cfg, reg, evidence, reasons, deploy_app)


def _run(
    cfg: PipelineConfig, reg: Registry, evidence: EvidenceLog, reasons: list[str], deploy_app: bool
) -> RetrainResult:
    from ray_jobs.pipeline import run_pipeline

    until = time.time()
    prod = production_data(evidence, until, cfg.retrain.holdout_fraction, cfg.retrain.val_fraction)
    if len(prod.train) < cfg.retrain.min_production_texts:
        raise SentimentError(
            f"{len(prod.train)} labelled production texts to train on < retrain.min_production_texts "
            f"{cfg.retrain.min_production_texts} (the log keeps texts only where serve.log_texts is on): "
            "nothing started"
        )
    log.info(
        "retrain: %s; %d production texts to train on, %d to validate on, %d held out",
        "; ".join(reasons),
        len(prod.train),
        len(prod.val),
        len(prod.holdout),
    )
    folder = Path(absolute_path(cfg.retrain.data_dir))
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(until))
    train_file, val_file = folder / f"production-{stamp}.parquet", folder / f"production-{stamp}-val.parquet"
    _write(prod.train, train_file)
    _write(prod.val, val_file)
    tags = {
        RETRAIN_TAG: "running",
        "retrain.reasons": json.dumps(reasons),
        "retrain.labels_until": f"{until:.6f}",
        "retrain.n_production_train": str(len(prod.train)),
        "retrain.n_production_val": str(len(prod.val)),
        "retrain.n_production_holdout": str(len(prod.holdout)),
        "retrain.extra_train": str(train_file),
        "retrain.extra_val": str(val_file),
        **{f"retrain.digest.{k}": v for k, v in prod.digests().items()},
    }
    # All at once: a trigger checked meanwhile sees a running run with the point its data ends.
    run_id = reg.start_run(f"retrain-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    result = RetrainResult(reasons, started=True, run_id=run_id)
    try:
        data = cfg.data.model_copy(update={"extra_train": str(train_file), "extra_val": str(val_file)})
        gate = cfg.gate.model_copy(update={"on_pass": "shadow"})
        outcome = run_pipeline(cfg.model_copy(update={"data": data, "gate": gate}), deploy_app=deploy_app)
        result.version, result.shadowed, result.promote = outcome.version, outcome.shadowed, outcome.decision.promote
        reg.set_tags(
            run_id,
            {
                "retrain.version": outcome.version,
                "retrain.gate": "shadow" if outcome.shadowed else ("promote" if outcome.decision.promote else "block"),
                "retrain.gate_reason": outcome.decision.reason,
            },
        )
        if len(prod.holdout):
            reg.log_metrics(run_id, _holdout_scores(reg, cfg, outcome, prod.holdout))
        result.message = outcome.decision.summary()
        reg.set_tags(run_id, {RETRAIN_TAG: "finished"})
        reg.end_run(run_id)
    except BaseException as err:
        reg.set_tags(run_id, {RETRAIN_TAG: "failed", "retrain.error": f"{type(err).__name__}: {err}"[:4000]})
        reg.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return result


def _holdout_scores(reg: Registry, cfg: PipelineConfig, outcome, holdout: Split) -> dict[str, float]:
    """F1 of the new version and of the champion on the production texts held out of training."""
    from ray_jobs.evaluate import evaluate_dir

    scores = {}
    for role, version in (("challenger", outcome.version), ("champion", outcome.champion_before)):
        if version is not None:
            ev = evaluate_dir(reg.model_dir(version), holdout, cfg.gate.eval_batch_size)
            scores[f"holdout_f1.{role}"] = ev.f1
    return scores


def _write(split: Split, path: Path) -> None:
    import pandas as pd

    tmp = path.with_suffix(".tmp")
    pd.DataFrame({"text": split.texts, "label": split.labels}).to_parquet(tmp, index=False)
    tmp.rename(path)  # whole or absent: the pipeline never reads half a file


def _drift_alarm(cfg: PipelineConfig) -> dict | None:
    """The app's /drift report where it has an alarm on; None where it has none or cannot be reached."""
    import httpx

    from ray_jobs.deploy import endpoint_url

    url = f"{endpoint_url(cfg)}/drift"
    try:
        r = httpx.get(url, timeout=30)
    except httpx.HTTPError as err:
        log.warning("retrain: the drift trigger cannot reach %s: %s", url, err)
        return None
    if r.status_code != 200:
        log.warning("retrain: %s answered %d: %s", url, r.status_code, r.text[:200])
        return None
    body = r.json()
    return body if body.get("alarm") and body.get("alarm_since") else None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

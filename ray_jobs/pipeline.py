"""The whole job: tune (-> train) -> register the best trial -> gate -> deploy / hot-swap -> summary.

The command is `python -m ray_jobs pipeline` (ray_jobs.cli.pipeline, which also lists the exit codes).
A failure after the champion alias moved raises PromotedNotDeployedError; an interrupted run ends its
MLflow run KILLED, and a version registered but not yet gated keeps the tag gate.decision=pending.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from ray_jobs.behaviour import REPORT_FILE, Report, run_on_model
from ray_jobs.config import PipelineConfig
from ray_jobs.data import Split, Splits
from ray_jobs.drift import REFERENCE_FILE
from ray_jobs.errors import GateError, PromotedNotDeployedError, RegistryError
from ray_jobs.evaluate import evaluate_and_profile, evaluate_dir
from ray_jobs.gate import Decision, Evaluation, decide, policy_from_config
from ray_jobs.ingest import StreamedTest
from ray_jobs.model import read_meta
from ray_jobs.registry import Registry, Rollout
from ray_jobs.rollout import refuse_to_replace
from ray_jobs.runtime import init_ray, interrupt_on_sigterm, sigterm_received, with_cluster_addresses
from ray_jobs.train import load_data, local_checkpoint_dir, prepare_data, streams
from ray_jobs.train_worker import RESUME_FILES
from ray_jobs.tune import CHECKPOINT_KEY, SearchOutcome, run_search

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    decision: Decision
    version: str
    champion_before: str | None
    url: str | None = None
    sample: str | None = None
    best_metrics: dict = field(default_factory=dict)
    shadowed: bool = False  # gate.on_pass: shadow: passed, and mirrored beside the champion instead


SAMPLE_REVIEW = "The plot was predictable, but the acting was wonderful and I would happily watch it again."


def _sample_request(url: str) -> str:
    """One real request to the live endpoint, so the run ends with proof that it answers."""
    import httpx

    r = httpx.post(f"{url}/predict", json={"text": SAMPLE_REVIEW}, timeout=30)
    r.raise_for_status()
    return r.text


def _evaluate(cfg: PipelineConfig, model_dir: str, test: Split | StreamedTest, name: str) -> Evaluation:
    return evaluate_dir(model_dir, test, batch_size=cfg.gate.eval_batch_size, precision=cfg.gate.precision, name=name)


def run_behaviour(reg: Registry, cfg: PipelineConfig, run_id: str, version: str, model_dir: str) -> Report:
    """The behavioural suite on a registered version: failure rates as run metrics and version tags,
    the whole report (with failing examples) as behaviour.json."""
    report = run_on_model(model_dir, cfg.gate.eval_batch_size)
    rates = report.failure_rates()
    log.info("behavioural suite: %s", ", ".join(f"{k} {v:.1%} failed" for k, v in rates.items()))
    reg.log_metrics(run_id, {f"behaviour.{k}_failure_rate": v for k, v in rates.items()})
    reg.log_dict(run_id, report.to_dict(), REPORT_FILE)
    tags = {f"behaviour.{k}_failure_rate": f"{v:.4f}" for k, v in rates.items()}
    reg.set_version_tags(version, {**tags, "behaviour.suite_version": report.suite_version})
    return report


def run_gate(
    reg: Registry,
    cfg: PipelineConfig,
    version: str,
    challenger: Evaluation,
    test: Split | StreamedTest,
    run_id: str | None = None,
    behaviour: Report | None = None,
) -> tuple[Decision, str | None]:
    """Decide under the registry lock and write aliases only on a promotion. The champion is read
    and evaluated on the same test split inside the lock, and re-read before the write: a decision
    is never taken against a stale champion or a stale stored F1. Any error leaves aliases unchanged.
    `behaviour`: the challenger's behavioural report, which `gate.behaviour.max_failure_rate` gates on."""
    policy = policy_from_config(cfg.gate)
    with reg.lock(timeout_s=cfg.gate.lock_timeout_s) as lease:
        champ = reg.champion()
        champ_eval = None
        if champ is not None and champ != version:
            log.info("evaluating champion version %s on the test split (%d examples)", champ, len(test))
            champ_eval = _evaluate(cfg, reg.model_dir(champ), test, f"v{champ}")
        decision = decide(challenger, champ_eval, policy, behaviour)
        tags = {
            "gate.decision": verdict(cfg, decision, champ),
            "gate.reason": decision.reason,
            "gate.challenger_f1": f"{decision.challenger_f1:.6f}",
            "gate.champion_f1": "" if decision.champion_f1 is None else f"{decision.champion_f1:.6f}",
            "gate.champion_version": champ or "",
            "gate.delta": "" if decision.delta is None else f"{decision.delta:.6f}",
            "gate.test_digest": decision.test_digest,
            "gate.n": decision.n,
            "gate.timestamp": time.time(),
        }
        to_shadow = shadows(cfg, decision, champ)
        if to_shadow:
            # A running rollout is another version's live experiment: refused, not replaced (the gate's
            # verdict is kept in the tags; `registry abort` then `registry shadow <version>` follows it).
            try:
                refuse_to_replace(reg.rollout(), version, champ)
            except RegistryError as err:
                reg.set_version_tags(
                    version, {**tags, "gate.decision": "passed, not shadowed", "gate.reason": str(err)}
                )
                raise GateError(f"version {version} passed the gate but is not shadowed: {err}") from None
        reg.set_version_tags(version, tags)
        if to_shadow:
            # gate.on_pass: shadow. The champion stays; the new version is mirrored on live traffic
            # until `python -m ray_jobs registry promote` decides on the live evidence (ray_jobs.rollout).
            shadow = Rollout(
                mode="shadow",
                version=version,
                champion=champ,
                started_at=time.time(),
                sample_size=cfg.gate.live_min_labelled,
            )
            with lease.fenced() as w:
                reg.set_rollout(shadow, w)
            reg.record_history({"event": "shadow", "version": version, "champion": champ, "by": "gate.on_pass"})
        elif decision.promote:
            # Fenced: written only while the lock is still ours, so no other driver can have moved the
            # alias since we read it (and on a database store, all of it or nothing).
            with lease.fenced() as w:
                if reg.champion() != champ:
                    raise GateError("the champion changed while the gate was deciding; no alias written")
                stale_rollout = reg.rollout() is not None  # a shadow/canary against the old champion means nothing now
                reg.set_aliases(version, champ, w)
                if stale_rollout:
                    reg.clear_rollout(w)
            if reg.champion() != version:
                raise GateError("the champion alias did not take the new version")
        # From here on a promotion has happened: a failure says so (exit code 4), never "nothing promoted".
        promoted = version if decision.promote and not to_shadow else None
        with promoted_steps(promoted, "recording the gate decision"):
            # A tag holds 5,000 characters: the failing examples stay in gate_decision.json.
            event = {"event": "gate", "version": version, "champion_before": champ, **decision.to_dict()}
            if decision.behaviour:
                event["behaviour"] = {k: v for k, v in decision.behaviour.items() if k != "failing"}
            reg.record_history(event)
    with promoted_steps(promoted, "recording the gate decision"):
        if run_id:
            reg.log_dict(
                run_id, {**decision.to_dict(), "version": version, "champion_before": champ}, "gate_decision.json"
            )
    return decision, champ


def onnx_export(
    cfg: PipelineConfig, ckpt: str, test: Split | StreamedTest, challenger: Evaluation
) -> tuple[dict, dict]:
    """(files for the version's model folder, version tags): the ONNX export that `serve.runtime: onnx`
    serves, made once here and scored against the gate's own eager predictions on the test split
    (ray_jobs.onnx_export). An export that fails costs the version nothing: replicas then serve it
    eagerly and say why."""
    if cfg.serve.runtime != "onnx":
        return {}, {}
    from ray_jobs import onnx_export

    q = cfg.serve.quantization
    if isinstance(test, StreamedTest):  # the guard scores texts on the driver: a content split's come here
        log.info("the ONNX guard reads the %d test texts into the driver", len(test))
        test = test.collect()
    try:
        files, guard = onnx_export.build(
            ckpt, test, q, challenger.predictions, cfg.gate.precision, cfg.gate.eval_batch_size
        )
    except Exception as err:  # noqa: BLE001 - the model is fine; only its faster runtime is missing
        log.warning(
            "ONNX %s export of the challenger failed (it will be served eagerly): %s: %s", q, type(err).__name__, err
        )
        return {}, {f"onnx.{q}.guard": f"export failed: {type(err).__name__}: {err}"[:4000]}
    refusal = guard.refusal(cfg.serve.max_f1_drop, cfg.serve.min_label_agreement, cfg.serve.min_guard_texts)
    log.info("ONNX %s export: %s; guard %s", q, guard.summary(), refusal or "passed")
    tags = {
        f"onnx.{q}.f1": f"{guard.f1_onnx:.6f}",
        f"onnx.{q}.agreement": f"{guard.agreement:.6f}",
        f"onnx.{q}.guard": "passed" if refusal is None else "failed",
    }
    return files, tags


def shadows(cfg: PipelineConfig, decision: Decision, champion: str | None) -> bool:
    """A passed gate puts the version in shadow instead of promoting it (gate.on_pass: shadow)."""
    return decision.promote and champion is not None and cfg.gate.on_pass == "shadow"


def verdict(cfg: PipelineConfig, decision: Decision, champion: str | None) -> str:
    """What the gate did, as the `gate.decision` tags record it: promote, shadow or block."""
    if not decision.promote:
        return "block"
    return "shadow" if shadows(cfg, decision, champion) else "promote"


@contextlib.contextmanager
def promoted_steps(version: str | None, what: str):
    """Steps after the champion alias moved to `version` (None: no promotion happened): any failure
    becomes PromotedNotDeployedError, which tells the truth about the registry."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # KeyboardInterrupt: Ctrl-C, or SIGTERM (`ray job stop`)
        if version is None or isinstance(err, PromotedNotDeployedError):
            raise
        raise PromotedNotDeployedError(version, f"{what} failed: {type(err).__name__}: {err}") from err


def _plot_trials(outcome: SearchOutcome):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in outcome.trials:
        xs = [r.get("epoch", i + 1) for i, r in enumerate(t.history) if "val_f1" in r]
        ys = [r["val_f1"] for r in t.history if "val_f1" in r]
        if xs:
            ax.plot(xs, ys, marker="o", label=f"{t.trial_id} ({t.status.lower()})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation F1")
    ax.set_title("Tune trials")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_confusion(ev: Evaluation):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.zeros((2, 2), dtype=int)
    for y, p in zip(ev.labels, ev.predictions, strict=True):
        m[y, p] += 1
    fig, ax = plt.subplots(figsize=(3.5, 3.2))
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center")
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_yticks([0, 1], ["negative", "positive"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test F1 {ev.f1:.4f}")
    fig.tight_layout()
    return fig


def run_pipeline(cfg: PipelineConfig, deploy_app: bool = True, resume_tune: str | None = None) -> Outcome:
    # A driver-side split is loaded first (bad data fails before anything starts); a content split is
    # built on the cluster once Ray is up (ray_jobs.train.load_data).
    splits = None if streams(cfg) else load_data(cfg)
    cfg = with_cluster_addresses(cfg)  # connects to the cluster first only where the URI names its head
    reg = Registry(cfg.registry)
    reg.ping()  # fail before hours of training, not after
    init_ray(cfg.ray)
    interrupt_on_sigterm()  # again: ray.init replaced it with a plain exit that skips the cleanup below
    if splits is None:
        splits = load_data(cfg)
    digests, sizes = splits.digests(), splits.sizes()
    log.info("data: %d train / %d val / %d test, digests %s", sizes["train"], sizes["val"], sizes["test"], digests)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_id = reg.start_pipeline_run(cfg, digests, sizes, run_name)
    status = "FAILED"
    try:
        meta = {"config_digest": cfg.digest(), "data_digests": digests, "pipeline_run": run_name}
        if resume_tune:
            reg.set_tags(run_id, {"resumed_tune": resume_tune})
        data = prepare_data(cfg, splits)
        outcome = run_search(cfg, data, meta, name=run_name, restore_path=resume_tune)
        if sigterm_received():  # Tune ended the search early on it: register nothing
            raise KeyboardInterrupt("SIGTERM")
        for t in outcome.trials:
            reg.log_trial(run_id, f"trial-{t.trial_id}", t.hparams, t.history, t.status, t.error)
        best = outcome.best_trial
        assert best is not None and best.best is not None  # run_search raises otherwise
        val = best.best
        ckpt = local_checkpoint_dir(val[CHECKPOINT_KEY], cfg.train.storage_path)
        reg.log_metrics(
            run_id,
            {
                "best_val_f1": val["val_f1"],
                "best_val_loss": val["val_loss"],
                "n_trials": len(outcome.trials),
                "n_trials_failed": sum(t.status == "ERROR" for t in outcome.trials),
            },
        )
        reg.set_tags(run_id, {"best_trial": best.trial_id, "tune_experiment": outcome.experiment_path})
        reg.log_figure(run_id, _plot_trials(outcome), "tune_trials.png")
        log.info(
            "best trial %s by %s: val_loss %.4f val_f1 %.4f at epoch %.2f (%s)",
            best.trial_id,
            cfg.train.select_by,
            val["val_loss"],
            val["val_f1"],
            val.get("epoch", 0),
            ckpt,
        )

        # One forward pass over the test split scores the challenger and profiles it for drift monitoring.
        # A content split's test split stays on the cluster and is scored there (ray_jobs.evaluate).
        test = splits.test if isinstance(splits, Splits) else splits.test_set()
        challenger, reference = evaluate_and_profile(
            ckpt, test, batch_size=cfg.gate.eval_batch_size, precision=cfg.gate.precision, name="challenger"
        )
        reg.log_metrics(run_id, {f"test_{k}": v for k, v in challenger.metrics.items()})
        reg.log_figure(run_id, _plot_confusion(challenger), "confusion_matrix.png")
        onnx_files, onnx_tags = onnx_export(cfg, ckpt, test, challenger)
        version = reg.register(
            run_id,
            ckpt,
            {
                # Until the gate writes its decision: a version whose pipeline died before (a stopped
                # job, a lost driver) says so instead of looking like a gated model.
                "gate.decision": "pending",
                "test_f1": f"{challenger.f1:.6f}",
                "test_accuracy": f"{challenger.metrics['accuracy']:.6f}",
                "test_n": challenger.n,
                "val_f1": f"{val['val_f1']:.6f}",
                "val_loss": f"{val['val_loss']:.6f}",
                "selected_by": cfg.train.select_by,
                "init_from": read_meta(ckpt).get("init_from", "backbone"),
                "test_precision": cfg.gate.precision,
                "data_digest.test": digests["test"],
                "data_digest.train": digests["train"],
                "config_digest": cfg.digest(),
                "pipeline_run": run_name,
                "trial_id": best.trial_id,
                **{f"hp.{k}": v for k, v in best.hparams.items()},
                **onnx_tags,
            },
            extra_files={REFERENCE_FILE: reference.to_bytes(), **onnx_files},
            exclude=RESUME_FILES,
        )
        reg.set_tags(run_id, {"registered_version": version})
        behaviour = run_behaviour(reg, cfg, run_id, version, ckpt)
        decision, champ_before = run_gate(reg, cfg, version, challenger, test, run_id, behaviour)
        log.info("%s", decision.summary())
        shadowed = shadows(cfg, decision, champ_before)
        result = Outcome(decision, version, champ_before, best_metrics=dict(val), shadowed=shadowed)
        promoted = version if decision.promote and not shadowed else None
        with promoted_steps(promoted, "tagging the pipeline run"):
            reg.set_tags(run_id, {"gate.decision": verdict(cfg, decision, champ_before)})
        if decision.promote and deploy_app:
            from ray_jobs.deploy import deploy

            served, challenger = (champ_before, version) if shadowed else (version, None)
            with promoted_steps(promoted, "deploying"):
                result.url = deploy(cfg, wait_version=served, wait_challenger=challenger)
            log.info("serving version %s at %s%s", served, result.url, f", v{version} in shadow" if shadowed else "")
            with promoted_steps(promoted, "the sample request"):
                result.sample = _sample_request(result.url)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        reg.end_run(run_id, "KILLED" if sigterm_received() else status)


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.pipeline is no command: run `python -m ray_jobs pipeline`")

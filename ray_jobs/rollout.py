"""Shadow and canary rollouts of a challenger, and promotion on live evidence.

    python -m ray_jobs registry --config ... shadow 3 [--mirror 0.5]     # champion answers, v3 scores too
    python -m ray_jobs registry --config ... canary 3 --share 0.1        # v3 answers 10% of routing keys
    python -m ray_jobs registry --config ... promote 3                   # decided on labelled live traffic
    python -m ray_jobs registry --config ... abort                       # back to the champion alone

The rollout lives in the registry (alias `challenger`, tag `rollout`: registry.Rollout), the one source
the Serve app reads when it is built. Each command records an event in the registered model's history
and then redeploys the app (ray_jobs.deploy): new replicas load the champion and the challenger while
the old ones drain, so no request fails. `--no-deploy` only records; the next deploy applies it.

Promotion reads the app's live evidence (GET /challenger/evidence: the true labels that POST /feedback
gave, with both versions' predictions on the same requests, from the durable log) and applies the offline
gate's rule to it (ray_jobs.gate.decide) with the live test `gate.live_significance` (McNemar by default:
a tie never promotes) and the behavioural bound `gate.behaviour.max_failure_rate`. The sample is fixed
when the rollout starts (gate.live_min_labelled then): the first that many labelled requests, in the
order their labels came. Before then `promote` waits; after, it gives the same decision however often it
is asked, so looking again as labels arrive does not inflate the error rate.

Every command reads and changes the rollout under the registry's gate lock; one that finds another
rollout than it expected refuses and says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import replace

from ray_jobs.behaviour import REPORT_FILE, Report
from ray_jobs.config import PipelineConfig
from ray_jobs.errors import GateError, RegistryError, SentimentError
from ray_jobs.gate import Decision, Policy, decide, evaluation_from, policy_from_config
from ray_jobs.registry import Registry, Rollout

log = logging.getLogger(__name__)


def _event(kind: str, **fields) -> dict:
    return {"event": kind, **fields, "timestamp": time.time(), "user": os.environ.get("USER", "")}


def _redeploy(cfg: PipelineConfig) -> str:
    from ray_jobs.deploy import deploy_champion

    version, url = deploy_champion(cfg)
    log.info("the app at %s serves champion version %s", url, version)
    return url


def start(
    cfg: PipelineConfig, mode: str, version: str, share: float = 0.0, mirror: float = 1.0, deploy_app: bool = True
) -> Rollout:
    """Put `version` beside the champion in `mode` (shadow | canary), record it, and hot-swap the app.
    The same version may move between modes (shadow -> canary, another share): its evidence and sample
    size carry over. Another version's rollout is never replaced: abort it first. A deploy that fails
    (the challenger does not load, say) takes the rollout back out of the registry."""
    reg = Registry(cfg.registry)
    with reg.lock(timeout_s=cfg.gate.lock_timeout_s) as lease:
        champ = reg.champion()
        if champ is None:
            raise RegistryError("there is no champion yet: a first model is promoted by the gate, not shadowed")
        if version == champ:
            raise RegistryError(f"version {version} is the champion already")
        reg.get_version(version)  # must exist
        running = reg.rollout()
        refuse_to_replace(running, version, champ)
        fixed = (
            {"started_at": running.started_at, "sample_size": running.sample_size}
            if running is not None
            else {"started_at": time.time(), "sample_size": cfg.gate.live_min_labelled}
        )
        rollout = Rollout(
            mode=mode, version=version, champion=champ, share=share if mode == "canary" else 0.0, mirror=mirror, **fixed
        )
        with lease.fenced() as w:
            reg.set_rollout(rollout, w)
        reg.record_history(_event(mode, **rollout.model_dump()))
    log.info("%s: version %s beside champion %s (share %.3g, mirror %.3g)", mode, version, champ, share, mirror)
    if deploy_app:
        try:
            _redeploy(cfg)
        except Exception as err:
            if running is None:
                reg.clear_rollout()
            else:
                reg.set_rollout(running)
            reg.record_history(_event("abort", version=version, reason=f"the deploy failed: {err}"))
            raise SentimentError(f"{mode} of version {version} not deployed, rollout taken back: {err}") from err
    return rollout


def refuse_to_replace(running: Rollout | None, version: str, champion: str) -> None:
    """A rollout of another version (or against another champion) is not replaced by a new one."""
    if running is not None and (running.version, running.champion) != (version, champion):
        raise RegistryError(
            f"version {running.version} is in {running.mode} beside champion {running.champion}: a running "
            "rollout is not replaced (python -m ray_jobs registry abort ends it)"
        )


def abort(cfg: PipelineConfig, deploy_app: bool = True, reason: str = "aborted by hand") -> Rollout:
    """Back to the champion alone."""
    reg = Registry(cfg.registry)
    with reg.lock(timeout_s=cfg.gate.lock_timeout_s) as lease:  # not in the middle of a promote
        rollout = reg.rollout()
        if rollout is None:
            raise RegistryError("no shadow or canary is running")
        with lease.fenced() as w:
            reg.clear_rollout(w)
        reg.record_history(_event("abort", version=rollout.version, mode=rollout.mode, reason=reason))
    log.info("abort: version %s is off live traffic", rollout.version)
    if deploy_app:
        _redeploy(cfg)
    return rollout


def fetch_evidence(cfg: PipelineConfig, limit: int | None = None, timeout_s: float = 60) -> dict:
    """The running app's labelled live requests that both versions scored (GET /challenger/evidence), the
    first `limit` in the order their labels came."""
    import httpx

    from ray_jobs.deploy import endpoint_url

    url = f"{endpoint_url(cfg)}/challenger/evidence"
    token = cfg.serve.feedback.token()  # the same token the replicas hold (serve.feedback.token_env/_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"limit": limit} if limit else {}
    try:
        r = httpx.get(url, timeout=timeout_s, headers=headers, params=params)
    except httpx.HTTPError as err:
        raise SentimentError(f"the app's live evidence is unreachable at {url}: {err}") from None
    if r.status_code != 200:
        raise SentimentError(f"{url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def live_decision(evidence: dict, policy: Policy, sample_size: int, behaviour: Report | None = None) -> Decision:
    """The offline gate's rule on the first `sample_size` labelled live requests both versions scored
    (a fixed sample: fewer is a wait, more are not looked at), with the challenger's behavioural report
    where the policy gates on one."""
    labels, chal, champ = evidence["labels"], evidence["challenger"], evidence["champion"]
    if not len(labels) == len(chal) == len(champ):
        raise GateError("live evidence of unequal lengths")
    labels, chal, champ = labels[:sample_size], chal[:sample_size], champ[:sample_size]
    ids = evidence.get("request_ids", labels)[:sample_size]
    digest = "live:" + hashlib.sha256(str(ids).encode()).hexdigest()[:16]
    challenger = evaluation_from(labels, chal, digest, f"v{evidence['challenger_version']}")
    champion = evaluation_from(labels, champ, digest, f"v{evidence['champion_version']}")
    if len(labels) < sample_size:
        f1 = challenger.f1 if labels else 0.0
        cf1 = champion.f1 if labels else 0.0
        reason = (
            f"waiting: {len(labels)} labelled live requests scored by both versions < the rollout's sample size "
            f"{sample_size} (gate.live_min_labelled when it started)"
        )
        return Decision(False, reason, f1, cf1, f1 - cf1, digest, len(labels), {"sample_size": sample_size})
    return decide(challenger, champion, policy, behaviour)


def live_policy(cfg: PipelineConfig) -> Policy:
    """The offline gate's policy with the live decision's test (gate.live_significance)."""
    return replace(policy_from_config(cfg.gate), significance=cfg.gate.live_significance)


def behaviour_of(reg: Registry, cfg: PipelineConfig, version: str) -> Report:
    """The version's behavioural report (behaviour.json of its run, as the pipeline registers it); for a
    version registered without one, the suite runs now and its report is recorded the same way."""
    from ray_jobs.behaviour import run_on_model

    run_id = reg.get_version(version).run_id
    raw = reg.load_dict(run_id, REPORT_FILE) if run_id else None
    if raw is not None:
        return Report.from_dict(raw)
    log.info("version %s has no behavioural report: running the suite", version)
    report = run_on_model(reg.model_dir(version), cfg.gate.eval_batch_size)
    if run_id:
        reg.log_dict(run_id, report.to_dict(), REPORT_FILE)
    return report


def promote(cfg: PipelineConfig, version: str, deploy_app: bool = True) -> Decision:
    """Promote the challenger in shadow or canary if the live evidence says so (the champion then
    becomes `previous`, the rollout ends). A decision taken on the full sample is recorded with the
    per-request evidence it used (an artifact of the version's run); before the sample is full it waits."""
    reg = Registry(cfg.registry)
    rollout = reg.rollout()
    if rollout is None or rollout.version != version:
        running = "none" if rollout is None else f"version {rollout.version} in {rollout.mode}"
        raise RegistryError(
            f"version {version} is not in shadow or canary (running: {running}); "
            "promote --force --reason ... promotes without live evidence"
        )
    size = rollout.sample_size or cfg.gate.live_min_labelled
    evidence = fetch_evidence(cfg, limit=size)
    served = (evidence.get("champion_version"), evidence.get("challenger_version"))
    if served != (rollout.champion, rollout.version):
        raise GateError(
            f"the app serves champion {served[0]} with challenger {served[1]}, not the rollout's "
            f"{rollout.champion} with {rollout.version}: redeploy (ray_jobs.deploy) and collect evidence again"
        )
    policy = live_policy(cfg)
    behaviour = behaviour_of(reg, cfg, version) if policy.behaviour_max_failure_rate is not None else None
    decision = live_decision(evidence, policy, size, behaviour)
    waiting = decision.n < size
    log.info("live %s", decision.summary())
    with reg.lock(timeout_s=cfg.gate.lock_timeout_s) as lease:
        # Read again under the lock: an abort, a new shadow or canary, or another promote may have landed
        # since the evidence was fetched, and the decision is only about the rollout it was fetched for.
        champ, now_running = reg.champion(), reg.rollout()
        if champ != rollout.champion:
            raise GateError(f"the champion moved to {champ} during the rollout; no alias written")
        if now_running != rollout:
            raise GateError(
                f"the rollout changed while its evidence was read (now: {now_running}); nothing written, "
                "run promote again"
            )
        verdict = "wait" if waiting else ("promote" if decision.promote else "block")
        tags = {
            "live.decision": verdict,
            "live.reason": decision.reason,
            "live.f1": f"{decision.challenger_f1:.6f}",
            "live.champion_f1": "" if decision.champion_f1 is None else f"{decision.champion_f1:.6f}",
            "live.n": decision.n,
            "live.mode": rollout.mode,
            "live.timestamp": time.time(),
        }
        if not waiting:  # the evidence first: a promotion nobody can audit does not happen
            tags["live.evidence"] = _record_evidence(reg, version, rollout, decision, evidence, size)
        reg.set_version_tags(version, tags)
        if decision.promote:
            with lease.fenced() as w:  # one transaction on a database store
                reg.set_aliases(version, champ, w)
                reg.clear_rollout(w)
        event = _event("live_gate", version=version, champion_before=champ, mode=rollout.mode, **decision.to_dict())
        reg.record_history(event)
    if decision.promote and deploy_app:
        _redeploy(cfg)
    return decision


def _record_evidence(reg: Registry, version: str, rollout: Rollout, decision: Decision, evidence: dict, n: int) -> str:
    """The per-request evidence of a live decision, as an artifact of the version's run (of a run made
    for it where the version was registered without one): its runs:/ URI."""
    run_id = reg.get_version(version).run_id or reg.start_run(f"live-decision-v{version}")
    name = f"live_decisions/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}.json"
    used = {k: evidence.get(k, [])[:n] for k in ("request_ids", "labels", "champion", "challenger", "labelled_at")}
    body = {"decision": decision.to_dict(), "rollout": rollout.model_dump(), "evidence": used}
    reg.log_dict(run_id, body, name)
    return f"runs:/{run_id}/{name}"

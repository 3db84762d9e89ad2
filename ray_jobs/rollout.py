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
gave, with both versions' predictions on the same requests) and applies the offline gate's rule to it
(ray_jobs.gate.decide: F1 >= champion F1 + gate.min_delta, McNemar or bootstrap where
gate.significance asks), after a minimum of gate.live_min_labelled labelled requests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

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
    A deploy that fails (the challenger does not load, say) takes the rollout back out of the registry."""
    reg = Registry(cfg.registry)
    with reg.lock(timeout_s=cfg.gate.lock_timeout_s) as lease:
        champ = reg.champion()
        if champ is None:
            raise RegistryError("there is no champion yet: a first model is promoted by the gate, not shadowed")
        if version == champ:
            raise RegistryError(f"version {version} is the champion already")
        reg.get_version(version)  # must exist
        rollout = Rollout(
            mode=mode, version=version, champion=champ, share=share if mode == "canary" else 0.0, mirror=mirror
        ).model_copy(update={"started_at": time.time()})
        with lease.fenced() as w:
            reg.set_rollout(rollout, w)
        reg.record_history(_event(mode, **rollout.model_dump()))
    log.info("%s: version %s beside champion %s (share %.3g, mirror %.3g)", mode, version, champ, share, mirror)
    if deploy_app:
        try:
            _redeploy(cfg)
        except Exception as err:
            reg.clear_rollout()
            reg.record_history(_event("abort", version=version, reason=f"the deploy failed: {err}"))
            raise SentimentError(f"{mode} of version {version} not deployed, rollout taken back: {err}") from err
    return rollout


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


def fetch_evidence(cfg: PipelineConfig, timeout_s: float = 60) -> dict:
    """The running app's labelled live requests that both versions scored (GET /challenger/evidence)."""
    import httpx

    from ray_jobs.deploy import endpoint_url

    url = f"{endpoint_url(cfg)}/challenger/evidence"
    token = cfg.serve.feedback.token()  # the same token the replicas hold (serve.feedback.token_env/_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as err:
        raise SentimentError(f"the app's live evidence is unreachable at {url}: {err}") from None
    if r.status_code != 200:
        raise SentimentError(f"{url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def live_decision(evidence: dict, policy: Policy, min_labelled: int) -> Decision:
    """The offline gate's rule on the labelled live requests both versions scored."""
    labels, chal, champ = evidence["labels"], evidence["challenger"], evidence["champion"]
    if not len(labels) == len(chal) == len(champ):
        raise GateError("live evidence of unequal lengths")
    digest = "live:" + hashlib.sha256(str(evidence.get("request_ids", labels)).encode()).hexdigest()[:16]
    challenger = evaluation_from(labels, chal, digest, f"v{evidence['challenger_version']}")
    champion = evaluation_from(labels, champ, digest, f"v{evidence['champion_version']}")
    if len(labels) < min_labelled:
        f1 = challenger.f1 if labels else 0.0
        cf1 = champion.f1 if labels else 0.0
        reason = f"{len(labels)} labelled live requests scored by both versions < gate.live_min_labelled {min_labelled}"
        return Decision(False, reason, f1, cf1, f1 - cf1, digest, len(labels), {"live_min_labelled": min_labelled})
    return decide(challenger, champion, policy)


def promote(cfg: PipelineConfig, version: str, deploy_app: bool = True) -> Decision:
    """Promote the challenger in shadow or canary if the live evidence says so (the champion then
    becomes `previous`, the rollout ends); either way the decision is recorded."""
    reg = Registry(cfg.registry)
    rollout = reg.rollout()
    if rollout is None or rollout.version != version:
        running = "none" if rollout is None else f"version {rollout.version} in {rollout.mode}"
        raise RegistryError(
            f"version {version} is not in shadow or canary (running: {running}); "
            "promote --force --reason ... promotes without live evidence"
        )
    evidence = fetch_evidence(cfg)
    served = (evidence.get("champion_version"), evidence.get("challenger_version"))
    if served != (rollout.champion, rollout.version):
        raise GateError(
            f"the app serves champion {served[0]} with challenger {served[1]}, not the rollout's "
            f"{rollout.champion} with {rollout.version}: redeploy (ray_jobs.deploy) and collect evidence again"
        )
    decision = live_decision(evidence, policy_from_config(cfg.gate), cfg.gate.live_min_labelled)
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
        reg.set_version_tags(
            version,
            {
                "live.decision": "promote" if decision.promote else "block",
                "live.reason": decision.reason,
                "live.f1": f"{decision.challenger_f1:.6f}",
                "live.champion_f1": "" if decision.champion_f1 is None else f"{decision.champion_f1:.6f}",
                "live.n": decision.n,
                "live.mode": rollout.mode,
                "live.timestamp": time.time(),
            },
        )
        if decision.promote:
            with lease.fenced() as w:  # one transaction on a database store
                reg.set_aliases(version, champ, w)
                reg.clear_rollout(w)
        event = _event("live_gate", version=version, champion_before=champ, mode=rollout.mode, **decision.to_dict())
        reg.record_history(event)
    if decision.promote and deploy_app:
        _redeploy(cfg)
    return decision

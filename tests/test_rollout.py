"""Shadow/canary pieces without a cluster: canary routing, the live evidence store, the live gate."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ray_jobs.gate import Policy
from ray_jobs.inference import classification_metrics
from ray_jobs.rollout import live_decision
from serve_app.evidence_store import LiveEvidence
from serve_app.rollout import Entry, is_mirrored, routes_to_challenger


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_canary_share_is_within_tolerance_over_thousands_of_keys_and_sticky(share):
    keys = [f"client-{i}" for i in range(5000)]
    routed = [routes_to_challenger(k, share) for k in keys]
    # Binomial standard error at n=5000 is at most 0.7 points: 4 standard errors of room.
    assert abs(sum(routed) / len(keys) - share) < 4 * np.sqrt(share * (1 - share) / len(keys))
    assert routed == [routes_to_challenger(k, share) for k in keys]  # one key, one version, every time
    # A larger share keeps every key the smaller one routed (raising a canary moves no client back).
    assert all(routes_to_challenger(k, min(1.0, share * 2)) for k, r in zip(keys, routed, strict=True) if r)


def test_mirroring_samples_its_fraction_independently_of_the_canary():
    ids = [f"{i:032x}" for i in range(5000)]
    mirrored = [is_mirrored(i, 0.25) for i in ids]
    assert abs(sum(mirrored) / len(ids) - 0.25) < 0.03
    assert all(is_mirrored(i, 1.0) for i in ids) and not any(is_mirrored(i, 0.0) for i in ids)
    canary = [routes_to_challenger(i, 0.25) for i in ids]
    assert sum(m and c for m, c in zip(mirrored, canary, strict=True)) / len(ids) == pytest.approx(0.0625, abs=0.02)


def _store(**feedback) -> LiveEvidence:
    return LiveEvidence({"grace_s": 0.2, **feedback})


def _entries(ids, slot, version, labels, p, answered):
    return [Entry(i, slot, version, answered, int(y), float(q), 0.01) for i, y, q in zip(ids, labels, p, strict=True)]


def test_live_f1_per_version_matches_the_labelled_requests():
    rng = np.random.default_rng(0)
    n = 300
    ids = [f"r{i}" for i in range(n)]
    truth = rng.integers(0, 2, n)
    champ = np.where(rng.random(n) < 0.9, truth, 1 - truth)  # ~90% right
    chal = np.where(rng.random(n) < 0.7, truth, 1 - truth)  # ~70% right
    store = _store()

    async def go():
        await store.record(_entries(ids, "champion", "1", champ, champ * 0.8 + 0.1, True))
        await store.record(_entries(ids[:200], "challenger", "2", chal[:200], chal[:200] * 0.6 + 0.2, False))
        for i in range(0, n, 2):  # every other request gets its true label
            assert await store.feedback(ids[i], int(truth[i])) == {
                "answered_by": "1",
                "versions": ["1", "2"] if i < 200 else ["1"],
            }
        assert await store.feedback("never-answered", 1) is None
        return await store.report("1", "2"), await store.evidence("1", "2")

    report, evidence = asyncio.run(go())
    labelled = np.arange(0, n, 2)
    both = labelled[labelled < 200]
    assert report["champion"]["live"]["labelled"] == len(labelled)
    expected = classification_metrics(truth[labelled], champ[labelled])["f1"]
    assert report["champion"]["live"]["f1"] == pytest.approx(expected)
    assert report["challenger"]["live"]["f1"] == pytest.approx(classification_metrics(truth[both], chal[both])["f1"])
    assert report["challenger"]["agreement"] == pytest.approx(float(np.mean(champ[:200] == chal[:200])))
    assert report["challenger"]["confidence_diff"] == pytest.approx(0.8 - 0.9)
    assert (report["champion"]["answered"], report["challenger"]["mirrored"]) == (n, 200)
    assert report["paired"]["labelled"] == len(both)
    assert report["paired"]["champion_f1"] == pytest.approx(classification_metrics(truth[both], champ[both])["f1"])
    assert evidence["labels"] == truth[both].tolist() and evidence["challenger"] == chal[both].tolist()


def test_the_store_is_bounded_and_forgets_old_predictions():
    store = _store(max_records=100, retention_s=0.5)

    async def go():
        await store.record(_entries([f"a{i}" for i in range(150)], "champion", "1", [1] * 150, [0.9] * 150, True))
        evicted_by_size = store.evicted
        first, last = await store.feedback("a0", 1), await store.feedback("a149", 1)
        await asyncio.sleep(0.6)
        expired = await store.feedback("a149", 0)
        return evicted_by_size, first, last, expired, len(store.records)

    evicted, first, last, expired, left = asyncio.run(go())
    assert evicted == 50 and first is None and last is not None
    assert expired is None  # past retention: no feedback, and it is gone
    assert left == 0


def test_feedback_that_arrives_before_its_record_is_kept():
    store = _store(grace_s=2.0)

    async def go():
        pending = asyncio.ensure_future(store.feedback("late", 1))
        await asyncio.sleep(0.2)
        await store.record(_entries(["late"], "champion", "1", [1], [0.9], True))
        return await pending

    assert asyncio.run(go()) == {"answered_by": "1", "versions": ["1"]}


def _evidence(truth, champ, chal):
    return {
        "champion_version": "1",
        "challenger_version": "2",
        "labels": list(map(int, truth)),
        "champion": list(map(int, champ)),
        "challenger": list(map(int, chal)),
    }


def test_live_promotion_decides_once_on_a_fixed_sample_and_a_tie_never_promotes():
    from ray_jobs.config import load_config
    from ray_jobs.rollout import live_policy

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 400)
    champ = np.where(rng.random(400) < 0.85, truth, 1 - truth)
    better = np.where(rng.random(400) < 0.97, truth, 1 - truth)
    worse = np.where(rng.random(400) < 0.6, truth, 1 - truth)
    policy = live_policy(load_config(None, []))
    assert policy.significance == "mcnemar"  # the live default

    few = live_decision(_evidence(truth[:50], champ[:50], better[:50]), policy, sample_size=200)
    assert not few.promote and few.n == 50 and "waiting" in few.reason and "200" in few.reason
    enough = live_decision(_evidence(truth, champ, better), policy, sample_size=200)
    assert enough.promote and enough.n == 200 and enough.p_value < 0.05  # the first 200 only
    assert not live_decision(_evidence(truth, champ, worse), policy, sample_size=200).promote
    # An exact copy of the champion: F1 equal, no discordant pair. The offline default (significance none,
    # min_delta 0) would promote it; the live default never does.
    copy = live_decision(_evidence(truth, champ, champ), policy, sample_size=200)
    assert not copy.promote and copy.delta == 0 and copy.p_value == 1.0
    assert live_decision(_evidence(truth, champ, champ), Policy(), sample_size=200).promote
    # A tiny edge is not evidence either.
    edge = champ.copy()
    edge[np.flatnonzero(edge[:200] != truth[:200])[:1]] = truth[np.flatnonzero(edge[:200] != truth[:200])[:1]]
    tiny = live_decision(_evidence(truth, champ, edge), policy, sample_size=200)
    assert not tiny.promote and tiny.delta > 0 and tiny.p_value >= 0.05
    # Looking again as labels arrive changes nothing: labels after the sample are not read, even ones that
    # would flip the decision (here: 200 more where the worse model is always right and the champion wrong).
    late = _evidence(
        np.r_[truth[:200], np.ones(200, int)],
        np.r_[champ[:200], np.zeros(200, int)],
        np.r_[worse[:200], np.ones(200, int)],
    )
    again = live_decision(late, policy, sample_size=200)
    assert (
        not again.promote
        and again.n == 200
        and again.test_digest
        == live_decision(_evidence(truth[:200], champ[:200], worse[:200]), policy, sample_size=200).test_digest
    )


def _registry_with_versions(tmp_path, *sets):
    """A sqlite MLflow registry with versions 1 (champion) and 2, each with a run of its own."""
    from ray_jobs.config import load_config
    from ray_jobs.registry import Registry

    cfg = load_config(None, [f"registry.root={tmp_path}/mlflow", "gate.live_min_labelled=100", *sets])
    reg = Registry(cfg.registry)
    reg.client.create_registered_model(reg.name)
    for i in range(2):
        reg.client.create_model_version(reg.name, source=str(tmp_path), run_id=reg.start_run(f"v{i + 1}"))
    reg.set_aliases("1", None)
    return cfg, reg


def _better_evidence(n=400, seed=2):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    ev = _evidence(truth, np.where(rng.random(n) < 0.8, truth, 1 - truth), truth)  # v2 always right
    return {**ev, "request_ids": [f"r{i}" for i in range(n)]}


def test_a_promotion_decides_only_for_the_rollout_it_read_under_the_lock(tmp_path, monkeypatch):
    """The live evidence is fetched before the gate lock is taken: if another driver aborts the shadow
    (and, in a second round, starts a canary) meanwhile, promote refuses and writes nothing; left alone,
    the same evidence promotes, and the per-request evidence it used is an artifact of the version's run.
    A real sqlite MLflow registry; the evidence (GET /challenger/evidence) is stubbed: no app runs here."""
    from ray_jobs import rollout
    from ray_jobs.errors import GateError, RegistryError

    cfg, reg = _registry_with_versions(tmp_path)
    evidence = _better_evidence()

    def another_driver_aborts(cfg_, limit=None):
        rollout.abort(cfg_, deploy_app=False)
        return evidence

    def another_driver_starts_a_canary(cfg_, limit=None):
        rollout.abort(cfg_, deploy_app=False)
        rollout.start(cfg_, "canary", "2", share=0.5, deploy_app=False)
        return evidence

    rollout.start(cfg, "shadow", "2", deploy_app=False)
    assert reg.rollout().sample_size == 100
    monkeypatch.setattr(rollout, "fetch_evidence", another_driver_aborts)
    with pytest.raises(GateError, match="the rollout changed"):
        rollout.promote(cfg, "2", deploy_app=False)
    assert reg.champion() == "1" and reg.rollout() is None  # the abort stands

    rollout.start(cfg, "shadow", "2", deploy_app=False)
    monkeypatch.setattr(rollout, "fetch_evidence", another_driver_starts_a_canary)
    with pytest.raises(GateError, match="the rollout changed"):
        rollout.promote(cfg, "2", deploy_app=False)
    assert reg.champion() == "1" and reg.rollout().mode == "canary"

    monkeypatch.setattr(rollout, "fetch_evidence", lambda cfg_, limit=None: evidence)
    assert rollout.promote(cfg, "2", deploy_app=False).promote
    assert reg.aliases() == {"champion": "2", "previous": "1"} and reg.rollout() is None
    tags = reg.get_version("2").tags
    assert tags["live.decision"] == "promote" and tags["live.n"] == "100"
    run_id, name = tags["live.evidence"].removeprefix("runs:/").split("/", 1)
    record = reg.load_dict(run_id, name)
    assert record["evidence"]["request_ids"] == evidence["request_ids"][:100]
    assert record["evidence"]["labels"] == evidence["labels"][:100] and record["decision"]["promote"]
    with pytest.raises(RegistryError, match="not in shadow or canary"):
        rollout.promote(cfg, "2", deploy_app=False)


def test_a_running_rollout_is_never_replaced_by_another_version(tmp_path):
    from ray_jobs import rollout
    from ray_jobs.errors import RegistryError

    cfg, reg = _registry_with_versions(tmp_path)
    reg.client.create_model_version(reg.name, source=str(tmp_path), run_id=reg.start_run("v3"))
    first = rollout.start(cfg, "shadow", "2", deploy_app=False)
    with pytest.raises(RegistryError, match="version 2 is in shadow beside champion 1"):
        rollout.start(cfg, "shadow", "3", deploy_app=False)
    assert reg.rollout() == first
    # The same version moves on (shadow -> canary): its start and sample size carry over.
    canary = rollout.start(cfg, "canary", "2", share=0.2, deploy_app=False)
    assert (canary.started_at, canary.sample_size) == (first.started_at, first.sample_size)


@pytest.mark.parametrize("failure_rate, promotes", [(0.5, False), (0.0, True)])
def test_live_promotion_honours_the_behaviour_policy(tmp_path, monkeypatch, failure_rate, promotes):
    """With gate.behaviour.max_failure_rate set, the challenger's registered behavioural report gates the
    live decision as it gates the offline one."""
    from ray_jobs import rollout
    from ray_jobs.behaviour import REPORT_FILE, Report, TestResult

    cfg, reg = _registry_with_versions(tmp_path, "gate.behaviour.max_failure_rate=0.2")
    failures = int(failure_rate * 10)
    report = Report("1", "d", [TestResult("negation", "MFT", "negation", 10, failures, [{"text": "not good"}])])
    reg.log_dict(reg.get_version("2").run_id, report.to_dict(), REPORT_FILE)
    rollout.start(cfg, "shadow", "2", deploy_app=False)
    monkeypatch.setattr(rollout, "fetch_evidence", lambda cfg_, limit=None: _better_evidence())
    decision = rollout.promote(cfg, "2", deploy_app=False)
    assert decision.promote is promotes and decision.behaviour["failure_rates"]["MFT"] == failure_rate
    assert reg.champion() == ("2" if promotes else "1")
    if not promotes:
        assert "behavioural failure rate MFT 50.0%" in decision.reason


def test_feedback_and_evidence_need_the_bearer_token_and_are_closed_without_one():
    from starlette.requests import Request

    from serve_app.http import ApiError, require_bearer

    def status(token, header):
        headers = [(b"authorization", header.encode())] if header is not None else []
        try:
            require_bearer(Request({"type": "http", "headers": headers}), token, "/feedback")
        except ApiError as err:
            return err.status, err.response().headers.get("www-authenticate")
        return 200, None

    assert status("s3cret", "Bearer s3cret") == (200, None)
    assert status("s3cret", "bearer  s3cret ") == (200, None)
    assert status("s3cret", None) == (401, "Bearer")
    assert status("s3cret", "Basic czNjcmV0") == (401, "Bearer")
    assert status("s3cret", "Bearer s3cre") == (403, None)
    assert status(None, "Bearer anything") == (403, None)  # no token configured: closed, not open

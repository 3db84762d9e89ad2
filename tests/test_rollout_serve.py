"""Shadow, canary, feedback and promotion on live evidence: the registry CLI driving a real Serve app
over real HTTP, with tiny models in a sqlite MLflow registry.

Versions: 1 the trained tiny model (champion), 2 random weights (a worse challenger that disagrees),
3 the trained weights registered again (a challenger as good as the champion)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest
from conftest import (
    FEEDBACK_AUTH,
    ROOT,
    TINY,
    http,
    labels_survive,
    model_process,
    request_stream,
    small_app,
    store_pid,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "/ro"
MIN_LABELLED = 30


def _feedback(url: str, request_id: str, label: str, headers: dict | None = None) -> httpx.Response:
    """POST /feedback, with the tests' feedback token unless other headers are given."""
    payload = {"request_id": request_id, "label": label}
    return http.post(f"{url}/feedback", json=payload, headers=FEEDBACK_AUTH if headers is None else headers)


@pytest.fixture(scope="module")
def ro(serve_port, ray_cluster, tmp_path_factory, trained_tiny, untrained_tiny, postgres):
    from ray import serve

    from ray_jobs.cli import deploy
    from ray_jobs.config import RegistryConfig
    from ray_jobs.data import load_splits
    from ray_jobs.registry import Registry

    root = tmp_path_factory.mktemp("rollout-mlflow")
    reg = Registry(RegistryConfig(root=str(root), model_name="ro-model"))
    for name, folder in (("champ", trained_tiny[2]), ("random", untrained_tiny), ("again", trained_tiny[2])):
        reg.register(reg.start_run(name), folder, {})
    reg.set_aliases("1", None)
    sets = [
        *TINY,
        f"registry.root={root}",
        "registry.model_name=ro-model",
        *small_app(serve_port, PREFIX, "ro"),
        f"gate.live_min_labelled={MIN_LABELLED}",
    ]
    if postgres[0]:  # the durable evidence log on PostgreSQL (tests/test_drift_serve.py: on the default SQLite)
        sets.append("serve.feedback.log.uri=" + postgres[0].replace("postgresql://", "postgresql+psycopg2://"))
    args = ["--config", str(ROOT / "tune_configs/quickstart.yaml"), *[x for kv in sets for x in ("--set", kv)]]
    assert deploy.main(args) == 0
    test = load_splits(trained_tiny[0].data).test
    yield {"args": args, "reg": reg, "url": f"http://127.0.0.1:{serve_port}{PREFIX}", "test": test}
    serve.delete("ro")


def _cli(ro, *cmd) -> int:
    from ray_jobs.cli import registry

    return registry.main([*ro["args"], *cmd])


def _in_shadow_of_v2(ro) -> None:
    """Shadow v2, unless a test before put it there already (each deploy costs the suite ~15 s)."""
    r = ro["reg"].rollout()
    if r is None or (r.mode, r.version, r.mirror) != ("shadow", "2", 1.0):
        assert _cli(ro, "shadow", "2") == 0


def _batch(url, texts, key=None) -> list[dict]:
    headers = {"X-Routing-Key": key} if key else {}
    out = []
    for i in range(0, len(texts), 16):
        r = http.post(f"{url}/batch_predict", json={"texts": texts[i : i + 16]}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


def _challenger(url, until=lambda body: True, timeout_s=60) -> dict:
    """/challenger once `until` holds (mirrored texts reach the store after their answers)."""
    deadline = time.time() + timeout_s
    while True:
        body = http.get(f"{url}/challenger", timeout=30).json()
        if until(body) or time.time() > deadline:
            return body
        time.sleep(0.3)


def _in_process(reg, version, texts) -> list[int]:
    from ray_jobs.inference import Predictor

    return [int(p["label"] == "positive") for p in Predictor(reg.model_dir(version), precision="fp32").predict(texts)]


def _history(reg) -> list[str]:
    import json

    tags = reg.client.get_registered_model(reg.name).tags
    return [json.loads(v)["event"] for k, v in sorted(tags.items()) if k.startswith("history.")]


def test_shadow_answers_exactly_as_the_champion_alone_and_counts_agreement(ro):
    url, reg = ro["url"], ro["reg"]
    texts = list(ro["test"].texts[:48])
    alone = _batch(url, texts)
    assert http.get(f"{url}/model").json()["challenger"] is None

    assert _cli(ro, "shadow", "2") == 0
    model = http.get(f"{url}/model").json()
    assert model["version"] == "1" and model["challenger"]["version"] == "2"
    assert model["challenger"]["mode"] == "shadow"
    before = _challenger(url)["challenger"]["mirrored"]
    shadowed = _batch(url, texts)
    assert [a["model_version"] for a in shadowed] == ["1"] * len(texts)
    assert [a["label"] for a in shadowed] == [a["label"] for a in alone]
    for a, b in zip(shadowed, alone, strict=True):
        assert a["probabilities"]["positive"] == pytest.approx(b["probabilities"]["positive"], abs=1e-5)
    assert len({a["request_id"] for a in shadowed + alone}) == 2 * len(texts)

    body = _challenger(url, lambda b: b["challenger"]["mirrored"] >= before + len(texts))
    assert body["rollout"]["mode"] == "shadow" and body["champion"]["version"] == "1"
    assert body["challenger"]["mirrored"] == before + len(texts) and body["challenger"]["answered"] == 0
    champ = [int(a["label"] == "positive") for a in shadowed]
    chal = _in_process(reg, "2", texts)
    # Every text the challenger scored was also answered by the champion: agreement over all of them.
    assert body["challenger"]["compared_with_champion"] == body["challenger"]["mirrored"]
    if before == 0:
        assert body["challenger"]["agreement"] == pytest.approx(np.mean(np.equal(champ, chal)))
    assert body["challenger"]["latency"]["mirrored"]["n"] >= len(texts)


def test_a_killed_challenger_process_costs_no_request(ro):
    url, reg = ro["url"], ro["reg"]
    _in_shadow_of_v2(ro)
    folder = reg.model_dir("2")
    first = model_process(folder)
    assert first is not None
    with request_stream(url, "the challenger dies while this is mirrored", "model_version") as (answers, failures):
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline and model_process(folder) in (None, first):
            time.sleep(0.3)
        n = len(answers)
        while len(answers) < n + 10 and time.time() < deadline:
            time.sleep(0.2)
    assert failures == []
    assert set(answers) == {"1"}
    assert model_process(folder) not in (None, first)
    mirrored = _challenger(url)["challenger"]["mirrored"]
    _batch(url, ["mirrored again by the new process"] * 4)
    body = _challenger(url, lambda b: b["challenger"]["mirrored"] >= mirrored + 4)
    assert body["challenger"]["mirrored"] >= mirrored + 4 and body["replica"]["challenger_state"] == "ok"


def test_feedback_gives_live_f1_per_version_and_the_live_gate_blocks_the_worse_one(ro, capsys, ray_cluster):
    from ray_jobs.inference import classification_metrics

    url, reg, test = ro["url"], ro["reg"], ro["test"]
    _in_shadow_of_v2(ro)
    texts, truth = list(test.texts[100:160]), np.asarray(test.labels[100:160])
    answers = _batch(url, texts)
    names = {0: "negative", 1: "positive"}
    # Without the token, or with a wrong one, a label is refused before anything is stored (the right
    # label then goes through below as the first one), and the evidence is not handed out.
    wrong_label = {"request_id": answers[0]["request_id"], "label": names[1 - int(truth[0])]}
    for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-token"}, 403), ({"Authorization": "x"}, 401)):
        assert _feedback(url, wrong_label["request_id"], wrong_label["label"], headers).status_code == status
        assert http.get(f"{url}/challenger/evidence", headers=headers).status_code == status
    for a, y in zip(answers, truth, strict=True):
        r = _feedback(url, a["request_id"], names[int(y)])
        assert r.status_code == 200, r.text
    assert _feedback(url, "not-an-id", "positive").status_code == 404
    bad = _feedback(url, answers[0]["request_id"], "great")
    assert bad.status_code == 422
    # A second, different label for one request is refused, never a silent rewrite; the same one again is fine.
    again = _feedback(url, wrong_label["request_id"], wrong_label["label"])
    assert again.status_code == 409 and "is labelled" in again.json()["error"], again.text
    same = {"request_id": answers[0]["request_id"], "label": names[int(truth[0])]}
    assert _feedback(url, same["request_id"], same["label"]).status_code == 200

    champ = np.asarray([int(a["label"] == "positive") for a in answers])
    chal = np.asarray(_in_process(reg, "2", texts))
    body = _challenger(url, lambda b: (b["paired"] or {}).get("labelled", 0) >= len(texts))
    assert body["paired"]["labelled"] == len(texts)
    assert body["paired"]["champion_f1"] == pytest.approx(classification_metrics(truth, champ)["f1"])
    assert body["paired"]["challenger_f1"] == pytest.approx(classification_metrics(truth, chal)["f1"])
    assert body["champion"]["live"]["f1"] == pytest.approx(classification_metrics(truth, champ)["f1"])
    assert body["challenger"]["live"]["labelled"] == len(texts)

    # Random weights lose on the same labelled requests: blocked (exit 3), nothing moves.
    assert body["paired"]["challenger_f1"] < body["paired"]["champion_f1"]
    assert _cli(ro, "promote", "2") == 3
    assert reg.champion() == "1" and reg.rollout().version == "2"
    assert reg.get_version("2").tags["live.decision"] == "block"
    assert http.get(f"{url}/model").json()["challenger"]["version"] == "2"
    capsys.readouterr()
    assert _cli(ro, "status") == 0
    assert "live: version 2 in shadow beside champion 1" in capsys.readouterr().out

    # Per version in Prometheus: the replicas' counts and the store's live metrics.
    port = ray_cluster._private.worker.global_worker.node.metrics_export_port
    wanted = (
        "sentiment_version_texts_total",
        "sentiment_live_f1",
        "sentiment_live_agreement",
        "sentiment_live_labelled",
        'slot="challenger"',
    )
    deadline, text = time.time() + 60, ""
    while time.time() < deadline and not all(w in text for w in wanted):
        time.sleep(2)
        text = http.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert [w for w in wanted if w not in text] == []


def test_canary_answers_a_sticky_share_per_routing_key(ro):
    from serve_app.rollout import routes_to_challenger

    url, reg = ro["url"], ro["reg"]
    _in_shadow_of_v2(ro)
    before = (_challenger(url)["paired"] or {}).get("labelled", 0)
    for a in _batch(url, ["labelled before the switch to canary"] * 4):
        feedback = {"request_id": a["request_id"], "label": "positive"}
        assert _feedback(url, feedback["request_id"], feedback["label"]).status_code == 200
    labelled = _challenger(url, lambda b: b["paired"]["labelled"] >= before + 4)["paired"]["labelled"]
    assert _cli(ro, "canary", "2", "--share", "0.3") == 0
    assert reg.rollout().mode == "canary" and reg.rollout().share == 0.3
    # The redeploy replaced the model replicas, not the evidence store: the labels are still there.
    assert labelled == before + 4 and _challenger(url)["paired"]["labelled"] == labelled
    seen: dict[str, set] = {}
    for round_ in range(2):
        for i in range(60):
            key = f"client-{i}"
            body = {"text": f"round {round_} review {i}"}
            r = http.post(f"{url}/predict", json=body, headers={"X-Routing-Key": key})
            assert r.status_code == 200, r.text
            seen.setdefault(key, set()).add(r.json()["model_version"])
    assert all(len(v) == 1 for v in seen.values()), seen  # one client, one version
    # Without a routing key each text is routed by its own request id: the share over 800 texts, within
    # 4 standard deviations (0.3 +- 0.065: far from 0, 1 or a share of 0.5).
    versions = [a["model_version"] for a in _batch(url, [f"unkeyed review {i}" for i in range(800)])]
    assert abs(versions.count("2") / len(versions) - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(versions))
    routed = {k for k, v in seen.items() if v == {"2"}}
    assert routed == {k for k in seen if routes_to_challenger(k, 0.3)}
    assert 0.1 < len(routed) / len(seen) < 0.5
    body = _challenger(url, lambda b: b["challenger"]["answered"] >= 2 * len(routed))
    assert body["rollout"]["mode"] == "canary" and body["challenger"]["answered"] >= 2 * len(routed)
    # The champion mirrors the canary's requests: live evidence on the same requests either way.
    assert body["champion"]["mirrored"] >= 2 * len(routed)


def test_promotion_from_shadow_needs_enough_labelled_requests_then_hot_swaps(ro):
    url, reg, test = ro["url"], ro["reg"], ro["test"]
    assert _cli(ro, "abort") == 0
    assert reg.rollout() is None and http.get(f"{url}/model").json()["challenger"] is None
    assert http.get(f"{url}/challenger/evidence", headers=FEEDBACK_AUTH).status_code == 404
    assert _cli(ro, "shadow", "3") == 0

    def label(texts, labels):
        for a, y in zip(_batch(url, texts), labels, strict=True):
            lab = "positive" if y else "negative"
            assert _feedback(url, a["request_id"], lab).status_code == 200

    def both_scored(n):
        return _challenger(url, lambda b: (b["paired"] or {}).get("labelled", 0) >= n)["paired"]["labelled"]

    label(test.texts[200:210], test.labels[200:210])
    assert both_scored(10) == 10
    assert _cli(ro, "promote", "3") == 3  # 10 < the rollout's sample size: it waits
    assert reg.champion() == "1" and reg.get_version("3").tags["live.decision"] == "wait"
    assert "sample size" in reg.get_version("3").tags["live.reason"]

    label(test.texts[210 : 210 + MIN_LABELLED], test.labels[210 : 210 + MIN_LABELLED])
    assert both_scored(10 + MIN_LABELLED) == 10 + MIN_LABELLED
    # Version 3 is the champion's weights registered again: a tie, which the default live test (McNemar)
    # never promotes, decided on the first MIN_LABELLED labels and recorded with them.
    assert _cli(ro, "promote", "3") == 3
    tags = reg.get_version("3").tags
    assert reg.champion() == "1" and tags["live.decision"] == "block" and "p=1" in tags["live.reason"]
    assert tags["live.n"] == str(MIN_LABELLED) and tags["live.evidence"].startswith("runs:/")
    run_id, name = tags["live.evidence"].removeprefix("runs:/").split("/", 1)
    assert len(reg.load_dict(run_id, name)["evidence"]["request_ids"]) == MIN_LABELLED
    # Where the policy asks for F1 alone (gate.live_significance: none), the same sample promotes it.
    f1_alone = ["--set", "gate.live_significance=none"]
    with request_stream(url, "promoted while this stream runs", "model_version") as (answers, failures):
        assert _cli(ro, *f1_alone, "promote", "3") == 0
        time.sleep(1.0)
    assert failures == [] and answers[-1] == "3"
    assert reg.aliases() == {"champion": "3", "previous": "1"} and reg.rollout() is None
    model = http.get(f"{url}/model").json()
    assert model["version"] == "3" and model["challenger"] is None
    assert reg.get_version("3").tags["live.decision"] == "promote"
    events = _history(reg)  # every step is in the registered model's history
    assert {"shadow", "canary", "abort", "live_gate"} <= set(events) and events[-1] == "live_gate"
    # Not in shadow any more: a live promotion is refused and says how to promote by hand.
    assert _cli(ro, "promote", "2") == 1


def test_labels_that_arrive_before_their_records_are_all_counted_under_load(ro):
    """A label may reach the evidence store before the replica's record of its prediction does; it then
    waits there (serve.feedback.grace_s). Fifty such labels, sent to the store before the records they
    wait for, under a 64-client load: the records must not queue behind them (a store taking Serve's
    default of 5 calls at a time made all fifty wait out their grace and answer unknown)."""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from serve_app.rollout import Entry

    url = ro["url"]
    store = serve.get_deployment_handle("ro-evidence", app_name="ro")
    stop = threading.Event()

    def load() -> int:
        sent = 0
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(f"{url}/predict", json={"text": f"background load {sent}"})
                sent += 1
        return sent

    ids = [f"early-{uuid.uuid4().hex}" for _ in range(50)]
    with ThreadPoolExecutor(64) as pool:
        loads = [pool.submit(load) for _ in range(64)]
        try:
            time.sleep(1.0)
            labels = [store.feedback.remote(i, 1) for i in ids]  # before any record of them
            time.sleep(0.2)
            store.record.remote([Entry(i, "champion", "1", True, 1, 0.9, 0.01) for i in ids]).result(timeout_s=30)
            found = [r.result(timeout_s=60) for r in labels]
        finally:
            stop.set()
        assert sum(f.result() for f in loads) > 64
    assert all(f is not None and f["versions"] == ["1"] for f in found), found


def test_a_killed_evidence_store_costs_no_request_and_loses_no_label(ro):
    """SIGKILL of the live evidence store while predictions flow: every prediction is answered, /challenger
    says 503 at worst while Serve replaces it, and the new store has every label from the durable log."""
    url = ro["url"]
    with request_stream(url, "the store dies while this is answered", "request_id") as (answers, failures):
        time.sleep(1.0)
        store = labels_survive(url, lambda: os.kill(store_pid("ro"), signal.SIGKILL))
        time.sleep(1.0)
    assert failures == [] and len(answers) > 10
    assert store["log"]["errors"] == 0


def test_a_deleted_and_redeployed_app_loses_no_label(ro):
    """The whole app goes (serve.delete: every deployment, the store included) and is deployed again from
    the same config: the labels come back from the durable log."""
    from ray import serve

    from ray_jobs.cli import deploy

    def delete_and_deploy() -> None:
        serve.delete("ro")
        assert deploy.main(ro["args"]) == 0

    store = labels_survive(ro["url"], delete_and_deploy)
    assert store["log"]["uri"].startswith(("postgresql", "sqlite"))

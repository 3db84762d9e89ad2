"""Drift monitoring in the Serve app over real HTTP: GET /drift before any traffic, a window of
in-distribution text that does not alarm, a shifted one that does, and the gauges in Prometheus."""

from __future__ import annotations

import time

import pytest
from conftest import http, labels_survive, live_actor_pid, request_stream, store_pid

pytestmark = pytest.mark.integration

PREFIX = "/drift-app"
WINDOW = 40


@pytest.fixture(scope="module")
def drift_app(serve_port, ray_cluster, tmp_path_factory, trained_tiny):
    """The trained tiny model registered with the reference profile the pipeline computes (on its
    held-out test split), served with small windows."""
    from ray import serve

    from ray_jobs.config import RegistryConfig
    from ray_jobs.data import load_splits
    from ray_jobs.drift import REFERENCE_FILE
    from ray_jobs.evaluate import evaluate_and_profile
    from ray_jobs.registry import Registry
    from serve_app.app import build_app

    cfg, _, model_dir, _ = trained_tiny
    test = load_splits(cfg.data).test
    _, reference = evaluate_and_profile(model_dir, test)
    root = tmp_path_factory.mktemp("drift-mlflow")
    reg = Registry(RegistryConfig(root=str(root), model_name="drift-model"))
    v = reg.register(reg.start_run("drift-test"), model_dir, {}, extra_files={REFERENCE_FILE: reference.to_bytes()})
    reg.set_aliases(v, None)
    args = {
        "serve.model_uri": "models:/drift-model@champion",
        "registry.root": str(root),
        "serve.precision": "fp32",
        "serve.num_cpus": 0.5,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.app_name": "driftapp",
        "serve.explain.enabled": False,
        "serve.drift.window_size": WINDOW,
        "serve.drift.send_every": 8,
        # Deterministic here (fixed texts, seeded permutations); a small alpha keeps the margin wide.
        "serve.drift.alpha": 0.001,
    }
    serve.run(build_app(args), name="driftapp", route_prefix=PREFIX)
    yield f"http://127.0.0.1:{serve_port}{PREFIX}", len(test), args
    serve.delete("driftapp")


@pytest.fixture
def drift_args(drift_app) -> dict:
    return drift_app[2]


def _send(url: str, texts: list[str]) -> None:
    for i in range(0, len(texts), 8):
        r = http.post(f"{url}/batch_predict", json={"texts": texts[i : i + 8]}, timeout=60)
        assert r.status_code == 200, r.text


def _windows(url: str, n: int, timeout_s: float = 60) -> dict:
    """/drift once `n` windows are complete (the last texts reach the monitor at the replica's next
    send or health check)."""
    deadline = time.time() + timeout_s
    while True:
        body = http.get(f"{url}/drift", timeout=30).json()
        if body.get("windows_completed", 0) >= n or time.time() > deadline:
            return body
        time.sleep(0.5)


def test_drift_windows_alarm_on_shifted_text_only_and_reach_prometheus(drift_app, ray_cluster):
    from ray_jobs.data import generate_reviews

    url, n_reference, _ = drift_app
    # No traffic yet: an empty window, no alarm, no error, and the served version's reference.
    r = http.get(f"{url}/drift", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1" and body["reference"]["n"] == n_reference
    assert body["current"]["n"] == 0 and body["windows"] == [] and body["alarm"] is False

    # In-distribution: reviews from the generator that made the training data, not seen in training.
    _send(url, generate_reviews(WINDOW, seed=4242).texts)
    body = _windows(url, 1)
    assert body["windows_completed"] == 1, body
    first = body["windows"][0]
    assert first["n"] == WINDOW and first["alarm"] is False and body["alarm"] is False, first
    assert set(first["tests"]) == {"label", "confidence", "length", "embedding"}

    # Shifted: one short negative sentence, over and over.
    _send(url, [f"Dreadful. ({i})" for i in range(WINDOW)])
    body = _windows(url, 2)
    last = body["windows"][0]
    assert last["index"] == 2 and last["alarm"] is True and body["alarm"] is True, last
    length = last["tests"]["length"]
    assert length["alarm"] and length["p_value"] < length["threshold"]

    port = ray_cluster._private.worker.global_worker.node.metrics_export_port
    wanted = ("sentiment_drift_alarm", 'test="length"', "sentiment_drift_p_value")
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = http.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        alarm = [line for line in text.splitlines() if line.startswith("ray_sentiment_drift_alarm{")]
        if all(w in text for w in wanted) and alarm and alarm[-1].split()[-1] == "1.0":
            break
        time.sleep(2)
    assert [w for w in wanted if w not in text] == []
    assert alarm and alarm[-1].split()[-1] == "1.0", alarm


def test_the_drift_alarm_fires_the_retrain_trigger_once(drift_app, drift_args, serve_port):
    """ray_jobs.retrain's drift trigger reads this app's /drift: the alarm the shifted window raised fires
    it, and once a retraining run has gathered data after the alarm began, the same alarm does not."""
    from ray_jobs.config import evidence_log_uri, load_config
    from ray_jobs.evidence_log import EvidenceLog
    from ray_jobs.registry import Registry
    from ray_jobs.retrain import RETRAIN_TAG, triggers

    assert http.get(f"{drift_app[0]}/drift", timeout=30).json()["alarm"] is True  # from the test above
    cfg = load_config(
        None,
        [
            f"registry.root={drift_args['registry.root']}",
            "registry.model_name=drift-model",
            f"serve.port={serve_port}",
            f"serve.route_prefix={PREFIX}",
            "serve.app_name=driftapp",
            "retrain.min_new_labels=null",
        ],
    )
    reg = Registry(cfg.registry)
    log = EvidenceLog(evidence_log_uri(cfg.serve, cfg.registry), cfg.serve.app_name)
    [reason] = triggers(cfg, reg, log)
    assert reason.startswith("drift alarm on version 1 since ")
    run = reg.start_run("retrain-after-the-alarm", {RETRAIN_TAG: "finished", "retrain.labels_until": f"{time.time()}"})
    assert triggers(cfg, reg, log) == []
    reg.end_run(run)


def test_a_redeploy_keeps_the_drift_windows(drift_app, drift_args):
    """Every rollout step redeploys the app: the model replicas are replaced, the monitor (a fixed
    version) is not, and its windows, history and alarm stay."""
    from ray import serve

    from serve_app.app import build_app

    url = drift_app[0]
    before = _windows(url, 1)
    assert before["windows_completed"] >= 1 and before["monitor_restarted"] is False
    serve.run(build_app({**drift_args, "serve.max_batch_size": 16}), name="driftapp", route_prefix=PREFIX)
    after = http.get(f"{url}/drift", timeout=30).json()
    assert after["monitor_started_at"] == before["monitor_started_at"]
    assert after["windows_completed"] == before["windows_completed"]
    assert after["windows"] == before["windows"] and after["alarm"] == before["alarm"]
    assert after["monitor_restarted"] is False


def test_a_killed_monitor_costs_no_request_and_comes_back_empty(drift_app):
    """SIGKILL of the monitor's process while predictions flow: every prediction is answered, /drift
    says 503 at worst while Serve replaces it, then answers from a fresh monitor that says it restarted."""
    import os
    import signal

    url = drift_app[0]
    monitor = live_actor_pid("ServeReplica:driftapp:driftapp-drift")
    with request_stream(url, "a fine film with a dull ending", "label") as (answers, failures):
        time.sleep(1.0)
        before = http.get(f"{url}/drift", timeout=30).json()["texts_seen"]
        os.kill(monitor, signal.SIGKILL)
        deadline, statuses, fresh = time.time() + 90, [], False
        while time.time() < deadline and not fresh:
            r = http.get(f"{url}/drift", timeout=30)
            statuses.append(r.status_code)
            # A new monitor counts from zero (the stream keeps feeding it, so catch it early).
            fresh = r.status_code == 200 and r.json()["texts_seen"] < before
            time.sleep(0.2)
        time.sleep(1.0)
    assert fresh, statuses
    assert failures == [] and len(answers) > 10
    assert set(statuses) <= {200, 503}, statuses
    # It says so: the served version was loaded before this monitor started.
    body = r.json()
    assert body["monitor_restarted"] is True and "were lost" in body["note"], body


def test_labels_survive_a_killed_evidence_store_on_the_default_sqlite_log(drift_app):
    """The app's evidence store writes to its default log (sqlite:///<registry.root>/evidence.db): SIGKILL
    it, and the store Serve starts in its place has every label. (tests/test_rollout_serve.py does the
    same on PostgreSQL, and with the whole app deleted and deployed again.)"""
    import os
    import signal

    url = drift_app[0]
    store = labels_survive(url, lambda: os.kill(store_pid("driftapp"), signal.SIGKILL))
    assert store["log"]["uri"].startswith("sqlite:///") and store["log"]["uri"].endswith("/evidence.db")

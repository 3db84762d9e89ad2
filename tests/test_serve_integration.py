"""The Serve app over real HTTP on 127.0.0.1, with a tiny model registered in a sqlite MLflow store."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest
from conftest import http

pytestmark = pytest.mark.integration

PREFIX = "/svc"


@pytest.fixture(scope="module")
def registered(ray_cluster, tmp_path_factory, trained_tiny):
    """The trained tiny model registered as version 1 and made champion."""
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    root = tmp_path_factory.mktemp("serve-mlflow")
    reg = Registry(RegistryConfig(root=str(root), model_name="svc-model"))
    run_id = reg.start_run("serve-test")
    v = reg.register(run_id, trained_tiny[2], {"test_f1": "0.95", "data_digest.test": "abc"})
    reg.set_aliases(v, None)
    return reg, str(root), trained_tiny[2]


@pytest.fixture(scope="module")
def app_url(serve_port, registered):
    from ray import serve

    from serve_app.app import build_app

    _, root, _ = registered
    args = {
        "serve.model_uri": "models:/svc-model@champion",
        "registry.root": root,
        "serve.precision": "fp32",
        "serve.num_cpus": 0.5,
        "serve.max_batch_size": 16,
        "serve.batch_wait_timeout_s": 0.02,
        "serve.max_text_chars": 2000,
        "serve.max_batch_items": 8,
        "serve.max_body_bytes": 4096,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.app_name": "svc",
        "serve.request_timeout_s": 60,
        # The first /explain starts the explainer's replica (min_replicas 0): room for that.
        "serve.explain.timeout_s": 60,
        "serve.explain.num_cpus": 0.5,
        "serve.explain.precision": "fp32",  # compared with an fp32 explanation in-process
        "serve.explain.max_n_steps": 512,
        "serve.explain.max_queued_requests": 2,
    }
    serve.run(build_app(args), name="svc", route_prefix=PREFIX)
    yield f"http://127.0.0.1:{serve_port}{PREFIX}"
    serve.delete("svc")


def test_health_model_docs(app_url):
    assert http.get(f"{app_url}/health").json() == {"status": "ok", "model_version": "1"}
    info = http.get(f"{app_url}/model").json()
    assert info["name"] == "svc-model" and info["version"] == "1" and info["alias"] == "champion"
    assert info["test_f1"] == pytest.approx(0.95) and info["data_digest"] == "abc" and info["loaded_at"] > 0
    # serve.runtime's default, eager PyTorch, at the app's serve.precision, on the CPU (serve.num_gpus 0).
    assert info["runtime"] == {
        "runtime": "torch",
        "quantization": "none",
        "precision": "fp32",
        "device": "cpu",
        "fallback": None,
    }
    assert http.get(f"{app_url}/docs").status_code == 200
    spec = http.get(f"{app_url}/openapi.json").json()
    assert {"/predict", "/batch_predict", "/health", "/model"} <= set(spec["paths"])


def test_predict_and_batch_predict_match_the_model(app_url, registered):
    from ray_jobs.inference import Predictor

    texts = ["The plot was wonderful and the acting was superb.", "A boring, lifeless mess.", "not bad at all"]
    expected = Predictor(registered[2], precision="fp32").predict(texts)
    r = http.post(f"{app_url}/predict", json={"text": texts[0]})
    assert r.status_code == 200
    body = r.json()
    assert body["label"] == expected[0]["label"] and body["score"] == pytest.approx(expected[0]["score"], abs=1e-4)
    assert body["model_version"] == "1" and set(body["probabilities"]) == {"positive", "negative"}
    r = http.post(f"{app_url}/batch_predict", json={"texts": texts})
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [round(g["score"], 4) for g in got] == [round(e["score"], 4) for e in expected]


def test_200_concurrent_distinct_requests_each_get_their_own_answer(app_url, registered):
    from ray_jobs.data import generate_reviews
    from ray_jobs.inference import Predictor

    texts = [f"{t} (review {i})" for i, t in enumerate(generate_reviews(200, seed=77).texts)]
    expected = Predictor(registered[2], precision="fp32").predict(texts)

    def call(t):
        with httpx.Client(timeout=60) as c:
            return c.post(f"{app_url}/predict", json={"text": t})

    with cf.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(call, texts))
    assert [r.status_code for r in responses] == [200] * 200
    for r, e in zip(responses, expected, strict=True):
        assert r.json()["label"] == e["label"]
        assert r.json()["score"] == pytest.approx(e["score"], abs=1e-4)
    # at least some of them were served in real batches
    assert len({r.json()["label"] for r in responses}) == 2


BAD_INPUTS = [
    ("empty text", "/predict", {"json": {"text": ""}}, 422),
    ("whitespace text", "/predict", {"json": {"text": "  \n\t "}}, 422),
    ("text too long", "/predict", {"json": {"text": "a" * 2001}}, 422),
    ("text is a number", "/predict", {"json": {"text": 5}}, 422),
    ("text is null", "/predict", {"json": {"text": None}}, 422),
    ("text is a list", "/predict", {"json": {"text": ["a"]}}, 422),
    ("missing text", "/predict", {"json": {}}, 422),
    ("extra field", "/predict", {"json": {"text": "ok", "debug": True}}, 422),
    ("body is a list", "/predict", {"json": ["a"]}, 422),
    (
        "malformed JSON",
        "/predict",
        {"content": b'{"text": "unterminated', "headers": {"content-type": "application/json"}},
        400,
    ),
    (
        "JSON nested past the recursion limit",
        "/predict",
        {"content": b"[" * 2000 + b"]" * 2000, "headers": {"content-type": "application/json"}},
        400,
    ),
    (
        "wrong content type",
        "/predict",
        {"content": b"text=hello", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
    ),
    ("no content type", "/predict", {"content": b'{"text": "hi"}'}, 415),
    (
        "invalid UTF-8",
        "/predict",
        {"content": b'{"text": "\xff\xfe bad"}', "headers": {"content-type": "application/json"}},
        400,
    ),
    (
        "lone surrogate",
        "/predict",
        {"content": b'{"text": "\\ud800 x"}', "headers": {"content-type": "application/json"}},
        422,
    ),
    ("body over the cap", "/predict", {"json": {"text": "a" * 5000}}, 413),
    (
        "chunked body over the cap",
        "/predict",
        {
            "content": iter([b'{"text": "', b"a" * 3000, b"a" * 3000, b'"}']),
            "headers": {"content-type": "application/json"},
        },
        413,
    ),
    ("empty batch", "/batch_predict", {"json": {"texts": []}}, 422),
    ("batch too large", "/batch_predict", {"json": {"texts": ["ok"] * 9}}, 422),
    ("batch with an empty text", "/batch_predict", {"json": {"texts": ["ok", " "]}}, 422),
    ("batch with a non-string", "/batch_predict", {"json": {"texts": ["ok", 3]}}, 422),
    ("texts not a list", "/batch_predict", {"json": {"texts": "ok"}}, 422),
    ("explain: empty text", "/explain", {"json": {"text": ""}}, 422),
    ("explain: zero steps", "/explain", {"json": {"text": "ok", "n_steps": 0}}, 422),
    ("explain: steps over the cap", "/explain", {"json": {"text": "ok", "n_steps": 513}}, 422),
    ("explain: steps not a number", "/explain", {"json": {"text": "ok", "n_steps": "many"}}, 422),
    ("explain: extra field", "/explain", {"json": {"text": "ok", "target": 1}}, 422),
    ("explain: text too long", "/explain", {"json": {"text": "a" * 2001}}, 422),
    ("GET on explain", "/explain", {"method": "GET"}, 405),
    ("GET on predict", "/predict", {"method": "GET"}, 405),
    ("unknown path", "/nope", {"method": "GET"}, 404),
]


@pytest.mark.parametrize("name,path,kwargs,status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(app_url, name, path, kwargs, status):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    r = httpx.request(method, f"{app_url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    if status in (400, 413, 415, 422):
        assert isinstance(r.json()["error"], str) and r.json()["error"]


@pytest.mark.parametrize("text", ["nul \x00 inside", "emoji 😀🎬 great film", "עברית مرحبا right-to-left", "x" * 2000])
def test_unusual_but_valid_text_is_answered(app_url, text):
    r = http.post(f"{app_url}/predict", json={"text": text})
    assert r.status_code == 200 and r.json()["label"] in ("positive", "negative")


def test_explain_answers_with_the_word_scores_of_the_served_model(app_url, registered):
    """The first /explain also starts the explainer's replica (min_replicas 0)."""
    from ray_jobs.explain import Explainer

    text = "The plot was terrible, but the acting was wonderful."
    r = http.post(f"{app_url}/explain", json={"text": text, "n_steps": 16}, timeout=90)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Explainer(registered[2]).explain(text, n_steps=16)
    assert body["model_version"] == "1" and body["label"] == expected["label"] and body["n_steps"] == 16
    assert [(w["word"], w["start"], w["end"]) for w in body["words"]] == [
        (w["word"], w["start"], w["end"]) for w in expected["words"]
    ]
    assert all(text[w["start"] : w["end"]] == w["word"] for w in body["words"])
    assert [w["score"] for w in body["words"]] == pytest.approx([w["score"] for w in expected["words"]], abs=1e-3)
    assert body["method"] == "integrated_gradients" and body["convergence_delta"] >= 0 and not body["truncated"]
    assert http.post(f"{app_url}/predict", json={"text": text}).json()["label"] == body["label"]
    assert "/explain" in http.get(f"{app_url}/openapi.json").json()["paths"]


def test_a_busy_explainer_holds_up_no_prediction_and_turns_its_overflow_away(app_url):
    """Ten slow explanations at once against one explainer replica that takes one at a time and queues
    two: the rest get 503 with Retry-After at once, and /predict answers all along."""
    text = " ".join(["the acting was wonderful and the plot was dull."] * 6)  # the model's 64 tokens
    http.post(f"{app_url}/explain", json={"text": "warm up", "n_steps": 1}, timeout=90).raise_for_status()

    # The ten leave together: each client is built first (building one costs ~20 ms of CPU, more on a loaded
    # machine), so the sends spread by scheduling only, not by set-up.
    burst = 10
    together = threading.Barrier(burst)

    def explain():
        with httpx.Client(timeout=90) as c:
            together.wait(timeout=60)
            sent = time.monotonic()
            r = c.post(f"{app_url}/explain", json={"text": text, "n_steps": 512})
            return r, sent, time.monotonic()

    predicted: list[tuple[int, float]] = []
    with cf.ThreadPoolExecutor(burst) as pool:
        explains = [pool.submit(explain) for _ in range(burst)]
        with httpx.Client(timeout=30) as c:
            while not all(f.done() for f in explains):
                r = c.post(f"{app_url}/predict", json={"text": "a wonderful film"})
                predicted.append((r.status_code, time.monotonic()))
    done = [f.result() for f in explains]
    codes = sorted(r.status_code for r, _, _ in done)
    # 1 running + 2 queued answer. Serve's router counts its queue approximately, both ways: under a loaded
    # suite it was seen to turn the third away (still counting the running one as queued) and, in two full
    # suites on 2 cores, to admit a fourth (4 of 6 answered, none of them ended before the last was sent;
    # the count is the router's, not this app's). So the bound is 2 to 4: an unbounded queue (all ten
    # answered) or none (one answered) still fails. On a loaded machine an explanation can also end before
    # the last of the ten is sent: its slot is free again, so each such one allows one more answer.
    last_sent = max(sent for _, sent, _ in done)
    freed = sum(r.status_code == 200 and end < last_sent for r, _, end in done)
    assert set(codes) == {200, 503} and 2 <= codes.count(200) <= 4 + freed, (codes, freed)
    busy = next(r for r, _, _ in done if r.status_code == 503)
    assert busy.headers["retry-after"] and "explainer busy" in busy.json()["error"]
    last_explained = max(end for r, _, end in done if r.status_code == 200)
    assert [code for code, _ in predicted] == [200] * len(predicted)
    assert sum(t < last_explained for _, t in predicted) >= 5  # answered while explanations were computed


def test_overload_gets_fast_503_then_recovers(serve_port, registered):
    from ray import serve

    from serve_app.app import build_app

    _, root, _ = registered
    # One slot, a queue of one, and a long batch wait: a burst must overflow.
    args = {
        "serve.model_uri": "models:/svc-model@champion",
        "registry.root": root,
        "serve.num_cpus": 0.5,
        "serve.max_batch_size": 1,
        "serve.max_ongoing_requests": 1,
        "serve.max_queued_requests": 1,
        "serve.batch_wait_timeout_s": 0.0,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.app_name": "tight",
    }
    serve.run(build_app(args), name="tight", route_prefix="/tight")
    url = f"http://127.0.0.1:{serve_port}/tight/predict"
    try:
        long_text = "the plot was dull and the acting was poor " * 40

        def call(_):
            with httpx.Client(timeout=60) as c:
                start = time.perf_counter()
                r = c.post(url, json={"text": long_text})
                return r.status_code, time.perf_counter() - start

        with cf.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(call, range(120)))
        codes = [c for c, _ in results]
        assert codes.count(503) > 0 and codes.count(200) > 0 and set(codes) <= {200, 503}
        assert max(t for c, t in results if c == 503) < 5.0  # rejected fast, not after piling up
        time.sleep(0.5)
        assert http.post(url, json={"text": "fine again"}, timeout=30).status_code == 200
    finally:
        serve.delete("tight")


@pytest.mark.slow
def test_a_killed_model_process_costs_no_request(serve_port, trained_tiny, tmp_path):
    """Default proxy, one replica: SIGKILL on the model process under a stream of requests. The replica
    starts a new model process and re-runs the lost batches: no request fails, /model counts the restart."""
    import os
    import shutil
    import signal

    from conftest import model_process, request_stream
    from ray import serve

    from serve_app.app import build_app

    model_dir = str(shutil.copytree(trained_tiny[2], tmp_path / "model-to-kill"))  # a folder no other app serves
    serve.run(
        build_app(
            {
                "serve.model_uri": model_dir,
                "serve.num_cpus": 0.5,
                "serve.autoscaling.min_replicas": 1,
                "serve.autoscaling.max_replicas": 1,
                "serve.app_name": "kill",
            }
        ),
        name="kill",
        route_prefix="/kill",
    )
    url = f"http://127.0.0.1:{serve_port}/kill"
    try:
        first = model_process(model_dir)
        assert first is not None
        with request_stream(url, "still there?", "label") as (answers, failures):
            time.sleep(1.0)
            os.kill(first, signal.SIGKILL)
            deadline = time.time() + 120
            while time.time() < deadline and http.get(f"{url}/model", timeout=30).json()["model_restarts"] < 1:
                time.sleep(0.5)
            n = len(answers)
            while len(answers) < n + 5 and time.time() < deadline:  # answered by the new process
                time.sleep(0.2)
        assert failures == []
        assert model_process(model_dir) not in (None, first)
        assert http.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        assert http.get(f"{url}/model", timeout=30).json()["model_restarts"] == 1
    finally:
        serve.delete("kill")


def test_a_deploy_of_a_model_that_cannot_load_is_refused_and_the_app_keeps_serving(
    app_url, serve_port, registered, tmp_path, caplog
):
    """`ray_jobs.deploy` trial-loads the model before Serve changes anything: a corrupt model is refused
    with a clear error (exit 1), and the running app answers with its model, its health unchanged."""
    import shutil

    from conftest import ROOT, TINY

    from ray_jobs.cli import deploy

    broken = shutil.copytree(registered[2], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    before = http.get(f"{app_url}/health").json()
    sets = [
        *TINY,
        f"serve.model_uri={broken}",
        "serve.app_name=svc",
        f"serve.route_prefix={PREFIX}",
        f"serve.port={serve_port}",
        f"registry.root={tmp_path}/mlflow",
    ]
    assert (
        deploy.main(
            ["--config", str(ROOT / "tune_configs/quickstart.yaml"), *[x for kv in sets for x in ("--set", kv)]]
        )
        == 1
    )
    assert "deploy refused" in caplog.text and str(broken) in caplog.text
    assert http.get(f"{app_url}/health").json() == before == {"status": "ok", "model_version": "1"}
    r = http.post(f"{app_url}/predict", json={"text": "still the old model"})
    assert r.status_code == 200 and r.json()["model_version"] == "1"


def test_a_gpu_replica_reserves_the_gpu_and_without_cuda_fails_at_start_saying_so(serve_port, trained_tiny):
    """serve.num_gpus: the model replica asks Ray for a share of a GPU, is scheduled on the cluster's GPU
    (Ray assigns it: CUDA_VISIBLE_DEVICES='0' in the replica), and its model process, finding no CUDA on
    this machine, fails the deployment at start-up with that said, instead of serving from the CPU."""
    from ray import serve

    from serve_app.app import build_app

    args = {
        "serve.model_uri": trained_tiny[2],
        "serve.num_gpus": 0.5,
        "serve.num_cpus": 0.5,
        "serve.trial_load": False,  # the deploying process would check on the CPU; the replica is the point here
        "serve.explain.enabled": False,
        "serve.drift.enabled": False,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.app_name": "gpu",
    }
    try:
        with pytest.raises(RuntimeError, match="Deploying application gpu failed"):
            serve.run(build_app(args), name="gpu", route_prefix="/gpu")
        deployment = serve.status().applications["gpu"].deployments["gpu-model"]
        assert deployment.status == "DEPLOY_FAILED"
        message = deployment.message
        assert "sees no CUDA device" in message and "CUDA_VISIBLE_DEVICES='0'" in message, message[-2000:]
    finally:
        serve.delete("gpu")


def test_explain_without_room_for_an_explainer_answers_503_instead_of_waiting_out_its_deadline(
    serve_port, trained_tiny
):
    """Every free CPU held (here by a placement group; in the field by model replicas the autoscaler
    added): /explain finds no explainer replica and no room to start one, and answers 503 with
    Retry-After after serve.explain.start_wait_s instead of a 504 at its 60 s deadline. Once CPUs are
    free again, the same request starts an explainer and is answered."""
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from serve_app.app import build_app

    args = {
        "serve.model_uri": trained_tiny[2],
        "serve.num_cpus": 0.25,
        "serve.trial_load": False,
        "serve.drift.enabled": False,
        "serve.feedback.enabled": False,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.request_timeout_s": 60,
        "serve.explain.num_cpus": 0.5,
        "serve.explain.timeout_s": 60,
        "serve.app_name": "roomless",
    }
    serve.run(build_app(args), name="roomless", route_prefix="/roomless")
    url = f"http://127.0.0.1:{serve_port}/roomless/explain"
    body = {"text": "A moving, beautifully acted film.", "n_steps": 8}
    try:
        pg = placement_group([{"CPU": ray.available_resources().get("CPU", 0.0)}])
        ray.get(pg.ready(), timeout=30)
        try:
            start = time.monotonic()
            refused = http.post(url, json=body, timeout=90)
            took = time.monotonic() - start
        finally:
            remove_placement_group(pg)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "no explainer replica runs and the cluster has no room" in refused.json()["error"]
        assert took < 30, took  # the 2 s wait and two calls to Ray, not the 60 s deadline
        # Ray reports the freed CPUs a moment after the group goes (a request in that moment is refused
        # again, with Retry-After); ask once the room shows, as a client honouring Retry-After would.
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0.0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.2)
        answered = http.post(url, json=body, timeout=90)
        assert answered.status_code == 200 and answered.json()["n_steps"] == 8, answered.text
    finally:
        serve.delete("roomless")


def test_metrics_reach_prometheus(app_url, ray_cluster):
    """Application metrics are exported on Ray's Prometheus endpoint of this node."""
    for _ in range(5):
        http.post(f"{app_url}/predict", json={"text": "metrics please"})
    port = ray_cluster._private.worker.global_worker.node.metrics_export_port
    deadline = time.time() + 60
    text = ""
    # Each metric reaches the endpoint on its own export cycle: wait for all that are asserted.
    wanted = (
        "sentiment_requests_total",
        'endpoint="predict"',
        "sentiment_batch_size",
        "sentiment_model_version",
        "sentiment_predictions_total",
    )
    while time.time() < deadline:
        text = http.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert [w for w in wanted if w not in text] == []

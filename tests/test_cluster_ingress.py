"""Serving on Ray clusters of this test's own, in the two ingress modes that need one: `direct` (a cluster
that `ray_jobs.deploy` starts in a subprocess) and `haproxy` (a `ray start` cluster, faults injected).
Modules named test_cluster_* run before any test of their process starts the shared cluster
(tests/conftest.py), one after another in one process where the suite runs in two."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import http

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_direct_ingress_mode_serves_on_the_proxy_and_the_replica_port(tmp_path, untrained_tiny, no_session_cluster):
    """`ray.serve_ingress=direct` reaches a cluster that `ray_jobs.deploy` starts itself (a second,
    private Ray cluster in a subprocess): the app answers through Serve's proxy on serve.port and
    directly on the replica's own port, with the same prediction."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY, free_port, terminate

    from ray_jobs.deploy import direct_ingress_port

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import deploy_command

    port = free_port()
    sets = [
        *TINY,
        "ray.num_cpus=2",
        "ray.address=local",
        "ray.serve_ingress=direct",
        f"serve.port={port}",
        f"serve.model_uri={untrained_tiny}",
        "serve.num_cpus=0.5",
        "serve.app_name=direct",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1",
        f"registry.root={tmp_path}/mlflow",
    ]
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")  # a cluster of its own, not the tests' shared one
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_SERVE_")}
    proc = subprocess.Popen(
        deploy_command(sets, "--block"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = ""
        for line in proc.stdout:  # deploy prints the endpoint once /model answers
            if line.startswith("http://"):
                url = line.strip()
                break
        assert url == f"http://127.0.0.1:{port}", f"deploy exited with {proc.poll()} before printing its endpoint"
        direct = direct_ingress_port()  # the replica's own port (Serve allocates from 30000 up)
        text = {"text": "A moving, beautifully acted film."}
        via_proxy = http.post(f"{url}/predict", json=text, timeout=30)
        via_replica = http.post(f"http://127.0.0.1:{direct}/predict", json=text, timeout=30)
        assert via_proxy.status_code == via_replica.status_code == 200
        assert via_proxy.json()["label"] == via_replica.json()["label"]
        assert via_proxy.json()["score"] == pytest.approx(via_replica.json()["score"], abs=1e-5)
        assert http.post(f"http://127.0.0.1:{direct}/predict", json={"text": " "}).status_code == 422
    finally:
        terminate(proc)


@pytest.mark.slow
def test_haproxy_ingress_survives_faults_with_zero_failed_requests(
    tmp_path, leaning_tiny, untrained_tiny, no_session_cluster
):
    """The production shape: a `ray start` cluster in `haproxy` mode (with the retry policy of
    ray_jobs.runtime.serve_ingress_env), two replicas, a stream of requests through HAProxy on
    serve.port while, one after another: a replica actor is SIGKILLed and the other one too while the
    first one's replacement still loads its model (HAProxy is then left with no live replica in its
    list), the model is hot-swapped, and a corrupt model is deployed. No request fails; the corrupt
    deploy is refused and the app keeps serving the swapped-in model. (A model process killed or wedged
    is replaced inside its replica whatever the ingress: test_a_killed_model_process_costs_no_request,
    tests/test_model_worker.py, and chaos.py's model faults in haproxy mode.)"""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import ROOT, TINY, free_port, request_stream

    from ray_jobs.inference import Predictor

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import (
        auth_token,
        cluster_env,
        deploy_command,
        descendants,
        find,
        model_processes,
        running_replicas,
        start_head,
        stop_head,
    )

    port, dashboard = free_port(), free_port()
    env = cluster_env("haproxy", dashboard)

    def deploy(model_dir: str) -> subprocess.CompletedProcess:
        sets = [
            *TINY,
            f"ray.address=127.0.0.1:{gcs}",
            "ray.serve_ingress=haproxy",
            f"serve.port={port}",
            f"serve.model_uri={model_dir}",
            "serve.num_cpus=0.5",
            "serve.app_name=hs",
            "serve.autoscaling.min_replicas=2",
            "serve.autoscaling.max_replicas=2",
            f"registry.root={tmp_path}/mlflow",
        ]
        return subprocess.run(
            deploy_command(sets),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def full_strength(old: set[int] = frozenset(), timeout_s: float = 120) -> None:
        """Two replicas with a model process each, none of them among `old`, both RUNNING (Serve routes
        to them), and /health ok."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            below = descendants(head.pid)
            models = model_processes(head.pid, below, folders=(leaning_tiny, untrained_tiny))
            procs = set(find(head.pid, "ServeReplica:hs:hs-model", below)) | set(models)
            if (
                len(procs) == 4
                and not procs & old
                and running_replicas(f"http://127.0.0.1:{dashboard}", token, "hs") == 2
            ):
                try:
                    if http.get(f"{url}/health", timeout=5).json()["status"] == "ok":
                        return
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.5)
        pytest.fail("not back to two healthy replicas")

    url = f"http://127.0.0.1:{port}"
    text = "a dull and lifeless film, but the ending was wonderful"
    old, new = (Predictor(m, precision="auto").predict([text])[0] for m in (leaning_tiny, untrained_tiny))
    assert abs(old["score"] - new["score"]) > 0.1  # the swap shows in every answer
    # The cluster's processes are this test's to stop, leaving the tests' own cluster alone.
    head, gcs, temp_dir = start_head(env, num_cpus=3, dashboard_port=dashboard)
    token = auth_token(env)
    try:
        assert deploy(leaning_tiny).returncode == 0
        full_strength()

        with request_stream(url, text, "score") as (answers, failures):
            time.sleep(1.0)
            first, second = find(head.pid, "ServeReplica:hs:hs-model")
            victims = {first, second}
            os.kill(first, signal.SIGKILL)
            deadline = time.time() + 60
            while not set(find(head.pid, "ServeReplica:hs:hs-model")) - victims and time.time() < deadline:
                time.sleep(0.1)  # until the replacement's process is up: it then loads its model
            os.kill(second, signal.SIGKILL)
            full_strength(old=victims)
            n = len(answers)
            while len(answers) < n + 5:
                time.sleep(0.2)
        assert failures == [], failures[:5]

        with request_stream(url, text, "score") as (answers, failures):
            assert (
                deploy(untrained_tiny).returncode == 0
            )  # returns once the app answers (the swap may still be under way)
            deadline = time.time() + 60
            while http.get(f"{url}/model", timeout=10).json()["model_uri"] != untrained_tiny and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)
        assert failures == []
        assert answers[0] == pytest.approx(old["score"], abs=1e-3) and answers[-1] == pytest.approx(
            new["score"], abs=1e-3
        )

        broken = shutil.copytree(untrained_tiny, tmp_path / "broken")
        (broken / "model.safetensors").write_bytes(b"\0" * 64)
        with request_stream(url, text, "score") as (answers, failures):
            refused = deploy(str(broken))
        assert refused.returncode == 1 and "deploy refused" in refused.stderr
        assert failures == [] and answers
        assert http.get(f"{url}/model", timeout=10).json()["model_uri"] == untrained_tiny
        assert http.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    finally:
        stop_head(head, temp_dir, graceful=False)  # done with it: no need to wait for a clean shutdown

"""Autoscaling behind the default ingress (Serve's proxy): a load that starts brings a second replica, a
load that stops takes it away again, and no request fails on the way up or down (issue 31). Real Serve,
real HTTP, the tiny trained model."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import small_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "/scale"


def _running(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[f"{app}-model"].replica_states
    return states.get("RUNNING", 0)


def _wait_for(app: str, n: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if _running(app) == n:
            return True
        time.sleep(0.5)
    return False


def test_one_to_two_to_one_replica_loses_no_request(serve_port, ray_cluster, trained_tiny):
    from ray import serve

    from serve_app.app import build_app

    app = "scale"
    args = {
        kv.split("=", 1)[0]: kv.split("=", 1)[1]
        for kv in small_app(serve_port, PREFIX, app)
        if not kv.startswith(("serve.port", "serve.route_prefix"))
    }
    args.update(
        {
            "serve.model_uri": str(trained_tiny[2]),
            "serve.autoscaling.min_replicas": 1,
            "serve.autoscaling.max_replicas": 2,
            "serve.autoscaling.target_ongoing_requests": 2,
            "serve.autoscaling.upscale_delay_s": 1,
            "serve.autoscaling.downscale_delay_s": 4,
            "serve.feedback.enabled": False,
        }
    )
    serve.run(build_app(args), name=app, route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    try:
        assert _running(app) == 1
        answered: list[int] = []
        failures: list = []
        heavy, light = threading.Event(), threading.Event()  # 8 clients while `heavy`, 1 while `light`

        def client(k: int) -> None:
            with httpx.Client(timeout=60) as c:
                while light.is_set() and (k == 0 or heavy.is_set()):
                    try:
                        r = c.post(f"{url}/predict", json={"text": f"client {k}: a wonderful film"})
                        (answered if r.status_code == 200 else failures).append(r.status_code)
                    except httpx.HTTPError as err:
                        failures.append(repr(err))

        heavy.set()
        light.set()
        clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in clients:
            t.start()
        try:
            up = _wait_for(app, 2, 90)  # the load starts: a second replica
            heavy.clear()  # the load stops; one client goes on through the downscale
            down = _wait_for(app, 1, 120)
            n = len(answered)
            while len(answered) < n + 10:
                time.sleep(0.1)
        finally:
            heavy.clear()
            light.clear()
            for t in clients:
                t.join()
        assert up and down, (up, down, _running(app))
        assert failures == [] and len(answered) > 50
    finally:
        serve.delete(app)

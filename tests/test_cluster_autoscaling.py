"""Autoscaling behind the default ingress (`ray.serve_ingress: auto`, HAProxy on Linux): a load that starts
brings a second replica, a load that stops takes it away again, and no request fails on the way up or down,
though each change reloads HAProxy under kept-alive connections (issue 31). A real `ray start` cluster
started with `python -m ray_jobs ingress-env`'s variables, real HTTP, the untrained tiny model (what is
measured is serving, not answers)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TINY, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on (from /proc: no `ss` needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                # /proc writes addresses as 32-bit words in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
                host = ".".join(map(str, words)) if width == 8 else words.hex()
                found.add((host, int(port, 16)))
    return found


def test_one_to_two_to_one_replica_loses_no_request(tmp_path, untrained_tiny, no_session_cluster):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import (
        auth_token,
        cluster_env,
        deploy_command,
        descendants,
        find,
        running_replicas,
        start_head,
        stop_head,
    )

    port, dashboard = free_port(), free_port()
    env = cluster_env("auto", dashboard)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # what the default stands for on this (Linux) install
    head, gcs, temp_dir = start_head(env, num_cpus=3, dashboard_port=dashboard)
    token = auth_token(env)
    app = "scale"
    sets = [
        *TINY,
        f"ray.address=127.0.0.1:{gcs}",  # ray.serve_ingress stays at its default
        f"serve.port={port}",
        f"serve.model_uri={untrained_tiny}",
        f"serve.app_name={app}",
        "serve.num_cpus=0.5",
        "serve.precision=fp32",
        "serve.explain.enabled=false",
        "serve.drift.enabled=false",
        "serve.feedback.enabled=false",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=2",
        "serve.autoscaling.upscale_delay_s=1",
        "serve.autoscaling.downscale_delay_s=4",
        f"registry.root={tmp_path}/mlflow",
    ]

    def wait_for(n: int, timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if running_replicas(f"http://127.0.0.1:{dashboard}", token, app) == n:
                return True
            time.sleep(0.5)
        return False

    try:
        deployed = subprocess.run(
            deploy_command(sets),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert wait_for(1, 60)
        # HAProxy listens on serve.host (127.0.0.1) only, its stats and metrics ports included.
        (haproxy,) = find(head.pid, "haproxy -", descendants(head.pid))
        listening = _listening(haproxy)
        assert (("127.0.0.1", port) in listening) and {host for host, _ in listening} == {"127.0.0.1"}, listening

        url = f"http://127.0.0.1:{port}"
        answered: list[int] = []
        failures: list = []
        heavy, light = threading.Event(), threading.Event()  # 8 clients while `heavy`, 1 while `light`

        def client(k: int) -> None:
            with httpx.Client(timeout=60) as c:  # keep-alive: one connection across HAProxy's reloads
                while light.is_set() and (k == 0 or heavy.is_set()):
                    try:
                        r = c.post(f"{url}/predict", json={"text": f"client {k}: a wonderful film"})
                        (answered if r.status_code == 200 else failures).append(r.status_code)
                    except httpx.HTTPError as err:
                        failures.append(repr(err))

        # A client that is idle through both reloads, on a connection the first HAProxy process accepted.
        idle = httpx.Client(timeout=60)
        assert idle.post(f"{url}/predict", json={"text": "before"}).status_code == 200
        heavy.set()
        light.set()
        clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in clients:
            t.start()
        try:
            up = wait_for(2, 90)  # the load starts: a second replica
            heavy.clear()  # the load stops; one client goes on through the downscale
            down = wait_for(1, 120)
            n = len(answered)
            while len(answered) < n + 10:
                time.sleep(0.1)
        finally:
            heavy.clear()
            light.clear()
            for t in clients:
                t.join()
        after = idle.post(f"{url}/predict", json={"text": "after"})
        idle.close()
        assert up and down, (up, down)
        assert failures == [] and len(answered) > 50, failures[:5]
        assert after.status_code == 200
    finally:
        stop_head(head, temp_dir, graceful=False)

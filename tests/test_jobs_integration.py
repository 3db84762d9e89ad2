"""`ray job submit` against a `ray start` cluster with token auth: the Jobs API refuses requests without
the token, a job's status follows the pipeline's exit code, and a search whose driver was killed resumes
where it stopped (finished trials kept, the unfinished one continued from its checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TINY, free_port, terminate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def job_cluster():
    """A private head (3 CPUs, dashboard on 127.0.0.1) with RAY_AUTH_MODE=token; yields (env, Jobs API URL)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import cluster_env, start_head, stop_head

    env = cluster_env("proxy")
    dash = free_port()
    head, _, temp_dir = start_head(env, num_cpus=3, dashboard_port=dash)
    url = f"http://127.0.0.1:{dash}"
    token = subprocess.run(
        ["ray", "get-auth-token"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        for _ in range(90):
            try:
                if httpx.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the dashboard did not come up")
        yield env, url, token
    finally:
        stop_head(head, temp_dir, graceful=False)  # done with it: no need to wait for a clean shutdown


def _sets(tmp: Path, *extra: str) -> list[str]:
    # Absolute paths: a job runs in a copy of the working directory that Ray unpacks somewhere else.
    paths = [f"train.storage_path={tmp}/ray", f"tune.storage_path={tmp}/tune", f"registry.root={tmp}/mlflow"]
    return [x for kv in [*TINY, *paths, *extra] for x in ("--set", kv)]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 that proxies artifacts (clients never see its folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--serve-artifacts"]
    cmd += ["--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{uri}/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up")
        yield uri, root
    finally:
        terminate(server)
        log.close()


def _submit(
    env: dict, url: str, args: list[str], submission_id: str, wait: bool = True, deploy: bool = False
) -> subprocess.CompletedProcess:
    cmd = ["ray", "job", "submit", f"--address={url}", f"--submission-id={submission_id}", "--working-dir=."]
    cmd += [] if wait else ["--no-wait"]
    entry = [sys.executable, "-m", "ray_jobs.pipeline", "--config", "tune_configs/quickstart.yaml"]
    entry += [] if deploy else ["--no-deploy"]
    return subprocess.run([*cmd, "--", *entry, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _job(cluster: tuple, submission_id: str) -> dict:
    """The job's status and message, from the Jobs API (with the token)."""
    _, url, token = cluster
    r = httpx.get(f"{url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_the_jobs_api_refuses_requests_without_the_token(job_cluster):
    _, url, token = job_cluster
    assert httpx.get(f"{url}/api/jobs/", timeout=10).status_code in (401, 403)
    assert httpx.get(f"{url}/api/jobs/", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (
        401,
        403,
    )
    assert httpx.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200


def test_a_jobs_status_follows_the_pipelines_exit_code(job_cluster, tmp_path):
    """A non-zero exit is a FAILED job whose message names the code (3 for a blocked gate, 2 here: a
    config error), and the job's log carries what the pipeline printed."""
    env, url, _ = job_cluster
    r = _submit(env, url, _sets(tmp_path, "train.epochs=0"), "bad-config-1")
    job = _job(job_cluster, "bad-config-1")
    assert job["status"] == "FAILED" and "code 2" in job["message"], (job, r.stdout[-3000:])
    assert "train.epochs" in r.stdout  # the config error, in the job's log


def _driver_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "ray_jobs.pipeline" in cmdline and marker in cmdline and "job submit" not in cmdline:
                pids.append(int(proc.name))
    return pids


def _checkpoints(train_root: Path) -> dict[str, list[Path]]:
    """Trial run name -> its checkpoint folders (Ray Train keeps them under storage_path/<run name>/)."""
    runs = [run for run in train_root.glob("*") if run.is_dir()]
    return {run.name: sorted(c for c in run.glob("checkpoint_*") if c.is_dir()) for run in runs}


def test_a_search_whose_driver_was_killed_resumes_where_it_stopped(job_cluster, mlflow_server, tmp_path):
    """Also: the registry is a real MLflow tracking server with artifact proxying, and the Serve replica
    downloads the model through it (nothing of the model on a path the driver and replica share)."""
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    env, url, _ = job_cluster
    tracking_uri, server_root = mlflow_server
    serve_port = free_port()
    sets = _sets(
        tmp_path,
        "train.epochs=2",
        "data.synthetic.n_samples=1600",
        "gate.floor=0.5",  # this test is about resuming, not about how good two short epochs get
        "tune.scheduler=none",
        "train.num_to_keep=4",
        f"registry.tracking_uri={tracking_uri}",
        f"serve.port={serve_port}",
        "serve.num_cpus=0.5",
        "serve.app_name=resumed",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1",
        "serve.request_timeout_s=5",  # the replica drains for this + 5 s when the cluster stops
    )
    assert _submit(env, url, sets, "search-1", wait=False).returncode == 0
    train_root = tmp_path / "ray"
    # Kill the driver once the first trial has finished and the second one has checkpointed an epoch.
    deadline = time.time() + 400
    while time.time() < deadline:
        runs = _checkpoints(train_root)
        # The second trial's first checkpoint registered by Ray Train (its snapshot written), so that
        # the kill lands in the middle of that trial with something to resume from.
        if len(runs) == 2 and all(runs.values()):
            if all((train_root / run / "checkpoint_manager_snapshot.json").is_file() for run in runs):
                break
        assert _job(job_cluster, "search-1")["status"] in ("PENDING", "RUNNING"), _job(job_cluster, "search-1")
        time.sleep(0.5)
    else:
        pytest.fail(f"the search did not reach its second trial: {_checkpoints(train_root)}")
    pids = _driver_pids(str(tmp_path))
    assert pids, "no pipeline driver found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    before = _checkpoints(train_root)
    for _ in range(60):
        if _job(job_cluster, "search-1")["status"] == "FAILED":
            break
        time.sleep(1)
    assert _job(job_cluster, "search-1")["status"] == "FAILED"
    # Killed before registering: no version, no alias.
    reg = Registry(RegistryConfig(tracking_uri=tracking_uri))
    assert reg.versions() == [] and reg.champion() is None

    [experiment] = [p for p in (tmp_path / "tune").iterdir() if p.is_dir()]
    r = _submit(env, url, [*sets, "--resume-tune", str(experiment)], "search-2", deploy=True)
    assert _job(job_cluster, "search-2")["status"] == "SUCCEEDED", r.stdout[-4000:]
    assert "gate           PROMOTED" in r.stdout and '"model_version":"1"' in r.stdout
    # The replica serves version 1, fetched through the server: the model lives only in its artifact store.
    info = httpx.get(f"http://127.0.0.1:{serve_port}/model", timeout=10).json()
    assert info["version"] == "1" and info["model_uri"] == "models:/sentiment-distilbert@champion"
    assert list((server_root / "artifacts").rglob("model.safetensors")) and not (tmp_path / "mlflow").exists()
    assert reg.champion() == "1"

    after = _checkpoints(train_root)
    assert set(after) == set(before), "a resumed search must reuse each trial's Train run, not start new ones"
    finished, unfinished = sorted(before, key=lambda run: len(before[run]), reverse=True)
    assert after[finished] == before[finished], "the finished trial was run again"
    last = json.loads((after[unfinished][-1] / "sentiment_meta.json").read_text())["metrics"]
    saved_steps = {json.loads((c / "sentiment_meta.json").read_text())["metrics"]["step"] for c in before[unfinished]}
    assert last["epoch"] == 2
    # The unfinished trial continued from a checkpoint it had written before the kill, not from step 0.
    assert last["resumed_from_step"] in saved_steps and last["resumed_from_step"] > 0, (last, saved_steps)

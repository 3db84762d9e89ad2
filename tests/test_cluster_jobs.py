"""`ray job submit` against a multi-node `ray start` cluster with token auth, on this machine: a head with
no CPUs (it runs the job drivers), a training node offering the `trainer` resource and a serving node
offering `serve` (and a second driver slot), each node with a Ray temp dir and a working folder of its own,
so each unpacks a job's code somewhere else. The registry is a real `mlflow server` with artifact proxying
(its own registry in PostgreSQL where this machine has it), checkpoints go through a folder standing in
for shared storage. Tested: the Jobs API refuses requests without the token; a job's status follows the
pipeline's exit code; a search whose driver was killed, or whose job was stopped, resumes where it
stopped; two pipelines gating at once from different nodes end with the better model as champion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TINY, free_port, http, repeated_reviews, terminate, write_parts

# The whole module runs on clusters of its own (and after the tests that use the shared one).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("no_session_cluster")]

# role -> (CPUs, custom resources). The resources pin work to nodes: drivers via `ray job submit
# --entrypoint-resources`, Train workers via train.resources_per_worker, replicas via serve.resources.
NODES = {
    "head": (0, {"driver_a": 1}),
    "train": (2, {"trainer": 2}),
    "serve": (1, {"serve": 1, "driver_b": 1}),
}
ON_NODES = [
    "train.resources_per_worker={trainer: 1}",
    "serve.resources={serve: 1}",
    "serve.proxy_location=HeadOnly",  # one HTTP proxy: every node of this cluster shares 127.0.0.1
]


@dataclass
class JobCluster:
    env: dict[str, str]
    url: str
    token: str
    node_ids: dict[str, str]  # role -> Ray node id
    temp_dirs: list[str]  # each node's Ray temp dir
    gcs: int  # the head's GCS port

    def job(self, submission_id: str) -> dict:
        """The job's status, message and driver node, from the Jobs API (with the token)."""
        r = http.get(f"{self.url}/api/jobs/{submission_id}", headers=self._auth(), timeout=10)
        r.raise_for_status()
        return r.json()

    def wait(self, submission_id: str, timeout_s: float = 600) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            job = self.job(submission_id)
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return job
            time.sleep(1)
        pytest.fail(f"job {submission_id} still {self.job(submission_id)['status']} after {timeout_s:.0f} s")

    def logs(self, submission_id: str) -> str:
        """The driver's log, read from its node's Ray temp dir: the Jobs API serves logs of drivers on
        worker nodes through their agents' HTTP ports, which nodes sharing one machine do not get."""
        found = [f for d in self.temp_dirs for f in Path(d).glob(f"session_*/logs/job-driver-{submission_id}.log")]
        return "\n".join(f.read_text(errors="replace") for f in found)

    def actors_by_node(self, class_name: str) -> dict[str, str]:
        """actor id -> node role of every actor of `class_name` (alive or dead) that was placed on a node,
        from Ray's state API. An actor killed while still pending (its driver was killed first) ran on
        no node: the state API lists it without one, and it is left out."""
        out = subprocess.run(
            ["ray", "list", "actors", f"--address={self.url}", f"--filter=class_name={class_name}"]
            + ["--format=json", "--detail", "--limit=1000"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        roles = {node: role for role, node in self.node_ids.items()}
        return {a["actor_id"]: roles.get(a["node_id"], a["node_id"]) for a in json.loads(out) if a.get("node_id")}

    def release_leaked_placement_groups(self, job_id: str, wait_s: float = 20) -> list[str]:
        """Placement groups that the ended job `job_id` (Ray's job id) still holds after `wait_s`, removed.
        Ray Train (2.60) can leak its worker group's placement group when the driver is stopped or killed
        at an unlucky moment (seen in one run of three: two such groups, CREATED, of jobs that had ended,
        no actor in them); a resumed search then waits for their resources until Ray Train's worker-group
        start-up times out, and hangs. The product does not clean this up yet (docs/limitations.md); this
        keeps the test about what it tests, resuming, and says when it had to."""
        deadline = time.time() + wait_s
        while True:
            listed = subprocess.run(
                ["ray", "list", "placement-groups", f"--address={self.url}", "--format=json", "--detail"]
                + ["--limit=1000"],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            leaked = [
                pg["placement_group_id"]
                for pg in json.loads(listed)
                if pg.get("creator_job_id") == job_id and pg.get("state") in ("CREATED", "PENDING")
            ]
            if not leaked or time.time() > deadline:
                break
            time.sleep(1)
        if leaked:
            code = (
                "import ray, sys\n"
                "from ray._raylet import PlacementGroupID\n"
                "from ray.util.placement_group import PlacementGroup, remove_placement_group\n"
                f"ray.init(address='127.0.0.1:{self.gcs}', log_to_driver=False)\n"
                "for pg in sys.argv[1:]:\n"
                "    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))\n"
            )
            subprocess.run([sys.executable, "-c", code, *leaked], env=self.env, capture_output=True, check=True)
            print(f"removed placement groups that ended job {job_id} leaked: {leaked}")
        return leaked

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import auth_token, cluster_env, start_head, start_worker, stop_head

    dash = free_port()
    env = cluster_env("proxy", dash)
    # `ray job stop`: SIGTERM, then SIGKILL after this long (Ray's default, 3 s, once cut the driver's
    # clean-up short while the other test process loaded the machine), as cluster.yaml's head has it.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = "30"
    work = tmp_path_factory.mktemp("nodes")
    for role in NODES:
        (work / role).mkdir()
    cpus, resources = NODES["head"]
    head, gcs, head_temp = start_head(env, cpus, dashboard_port=dash, resources=resources, cwd=str(work / "head"))
    nodes = [(head, head_temp)]
    try:
        with ThreadPoolExecutor(2) as pool:  # the two nodes start side by side
            started = [
                pool.submit(start_worker, env, gcs, *NODES[role], cwd=str(work / role)) for role in ("train", "serve")
            ]
            errors = [f.exception() for f in started]
            nodes += [f.result() for f in started if f.exception() is None]  # stopped below, even on an error
            if any(errors):
                raise next(e for e in errors if e)
        url = f"http://127.0.0.1:{dash}"
        token = auth_token(env)
        for _ in range(90):
            try:
                if http.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the dashboard did not come up")
        listed = subprocess.run(
            ["ray", "list", "nodes", f"--address={url}", "--format=json", "--detail"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        node_ids = {}
        for node in json.loads(listed):
            total = node.get("resources_total", {})
            role = next(r for r, (_, res) in NODES.items() if set(res) <= set(total))
            node_ids[role] = node["node_id"]
        assert set(node_ids) == set(NODES), listed[:2000]
        yield JobCluster(env, url, token, node_ids, [temp_dir for _, temp_dir in nodes], gcs)
    finally:
        for proc, temp_dir in reversed(nodes):
            stop_head(proc, temp_dir, graceful=False)  # done with it: no need to wait for a clean shutdown


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, postgres):
    """A real `mlflow server` on 127.0.0.1 that proxies artifacts (clients never see its folder), its
    registry in PostgreSQL where there is one, else sqlite. Yields (URI, artifact root, backend URI)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3; name the driver installed here.
    backend = (
        postgres[0].replace("postgresql://", "postgresql+psycopg2://") if postgres[0] else f"sqlite:///{root}/mlflow.db"
    )
    port = free_port()
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--serve-artifacts"]
    cmd += ["--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if http.get(f"{uri}/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up")
        yield uri, root, backend
    finally:
        terminate(server)
        log.close()


def _sets(tmp: Path, *extra: str) -> list[str]:
    # Absolute paths: a job runs in a copy of the working directory that each node unpacks elsewhere.
    paths = [f"train.storage_path={tmp}/ray", f"tune.storage_path={tmp}/tune", f"registry.root={tmp}/mlflow"]
    return [x for kv in [*TINY, *paths, *ON_NODES, *extra] for x in ("--set", kv)]


def _submit(
    cluster: JobCluster,
    args: list[str],
    submission_id: str,
    wait: bool = True,
    deploy: bool = False,
    driver: str = "driver_a",
) -> subprocess.CompletedProcess:
    cmd = ["ray", "job", "submit", f"--address={cluster.url}", f"--submission-id={submission_id}", "--working-dir=."]
    cmd += [f"--entrypoint-resources={json.dumps({driver: 1})}", *([] if wait else ["--no-wait"])]
    entry = [sys.executable, "-m", "ray_jobs", "pipeline", "--config", "tune_configs/quickstart.yaml"]
    entry += [] if deploy else ["--no-deploy"]
    for _ in range(12):
        done = subprocess.run(
            [*cmd, "--", *entry, *args], cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600
        )
        # The Jobs API waits 10 s for the head's agent to register: a cluster that started on a busy
        # machine (the suite in two processes) can take longer. Nothing was submitted then: try again.
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


def test_the_jobs_api_refuses_requests_without_the_token(job_cluster):
    url, token = job_cluster.url, job_cluster.token
    assert http.get(f"{url}/api/jobs/", timeout=10).status_code in (401, 403)
    assert http.get(f"{url}/api/jobs/", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (
        401,
        403,
    )
    assert http.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200


def test_a_content_split_is_the_same_on_three_nodes_as_in_one_process(job_cluster, tmp_path):
    """data.split=content built by Ray Data tasks on a cluster of three nodes, twice: all of the first
    build's tasks on one node, all of the second's on another. Both give the sizes and digests of the
    same files split in one process (tests/test_ingest.py checks a one-node cluster's row by row). It runs
    second in the module, while both nodes' CPUs are free: pinned tasks wait for their node's CPUs."""
    from ray_jobs.config import DataConfig
    from ray_jobs.data import load_splits

    folder = tmp_path / "parts"
    write_parts(repeated_reviews(3000, 100, seed=5), folder, parts=12)
    script = f"""
import json
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray_jobs.config import DataConfig
from ray_jobs.ingest import stream_splits
ray.init(address="127.0.0.1:{job_cluster.gcs}", log_to_driver=False)
cfg = DataConfig(source="file", path={str(folder)!r}, split="content", text_column="review", label_column="y")
ctx = ray.data.DataContext.get_current()
runs = []
for node in {[job_cluster.node_ids["train"], job_cluster.node_ids["serve"]]!r}:
    ctx.scheduling_strategy = ctx.scheduling_strategy_large_args = NodeAffinitySchedulingStrategy(node, soft=False)
    runs.append(stream_splits(cfg))
result = {{"digests": [r.digests() for r in runs], "sizes": [r.sizes() for r in runs]}}
open({str(tmp_path / "out.json")!r}, "w").write(json.dumps(result))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], env=job_cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    local = load_splits(
        DataConfig(source="file", path=str(folder), split="content", text_column="review", label_column="y")
    )
    assert got["digests"] == [local.digests(), local.digests()]
    assert got["sizes"] == [local.sizes(), local.sizes()]


def test_a_jobs_status_follows_the_pipelines_exit_code(job_cluster, tmp_path):
    """A non-zero exit is a FAILED job whose message names the code (3 for a blocked gate, 2 here: a
    config error), and the job's log carries what the pipeline printed."""
    r = _submit(job_cluster, _sets(tmp_path, "train.epochs=0"), "bad-config-1")
    job = job_cluster.job("bad-config-1")
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
            if "ray_jobs pipeline" in cmdline and marker in cmdline and "job submit" not in cmdline:
                pids.append(int(proc.name))
    return pids


def _checkpoints(train_root: Path) -> dict[str, list[Path]]:
    """Trial run name -> its checkpoint folders (Ray Train keeps them under storage_path/<run name>/)."""
    runs = [run for run in train_root.glob("*") if run.is_dir()]
    return {run.name: sorted(c for c in run.glob("checkpoint_*") if c.is_dir()) for run in runs}


def _wait_for_checkpoints(cluster: JobCluster, submission_id: str, train_root: Path, trials: int) -> None:
    """Until `trials` Train runs each have a checkpoint that Ray Train registered (its snapshot written),
    so that an interruption lands in the middle of the last one with something to resume from."""
    deadline = time.time() + 400
    while time.time() < deadline:
        runs = _checkpoints(train_root)
        if len(runs) == trials and all(runs.values()):
            if all((train_root / run / "checkpoint_manager_snapshot.json").is_file() for run in runs):
                return
        assert cluster.job(submission_id)["status"] in ("PENDING", "RUNNING"), cluster.job(submission_id)
        time.sleep(0.5)
    pytest.fail(f"the search did not checkpoint {trials} trials: {_checkpoints(train_root)}")


def _resumed_from(before: dict[str, list[Path]], after: dict[str, list[Path]], run: str, epochs: int) -> None:
    """The interrupted trial ran to the end, continuing from a checkpoint written before the interruption."""
    last = json.loads((after[run][-1] / "sentiment_meta.json").read_text())["metrics"]
    saved_steps = {json.loads((c / "sentiment_meta.json").read_text())["metrics"]["step"] for c in before[run]}
    assert last["epoch"] == epochs
    assert last["resumed_from_step"] in saved_steps and last["resumed_from_step"] > 0, (last, saved_steps)


def test_a_search_stopped_then_killed_resumes_where_it_stopped_each_time(job_cluster, mlflow_server, tmp_path):
    """One search of two trials, interrupted twice: `ray job stop` (SIGTERM, then SIGKILL) in the middle of
    the first trial, then SIGKILL of the resumed driver in the middle of the second. Each resubmission
    with --resume-tune keeps what finished and continues the rest from its last checkpoint; nothing is
    registered or promoted before the end. Also: the registry is a real MLflow tracking server with
    artifact proxying, the Serve replica downloads the model through it (nothing of the model on a path
    the driver and replica share), and the driver, the Train workers and the replica run on their nodes."""
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    tracking_uri, server_root, _ = mlflow_server
    serve_port = free_port()
    sets = _sets(
        tmp_path,
        # Each interruption lands after a trial's first checkpoint and well before its last: with 4 epochs
        # of 1,600 reviews, a `ray job stop` on a machine busy with another test process once came after
        # the trial's last one.
        "train.epochs=8",
        "data.synthetic.n_samples=1200",
        "gate.floor=0.5",  # this test is about resuming, not about how good short training gets
        "tune.scheduler=none",
        "train.num_to_keep=8",
        f"registry.tracking_uri={tracking_uri}",
        f"serve.port={serve_port}",
        "serve.num_cpus=0.5",
        "serve.app_name=resumed",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1",
        "serve.request_timeout_s=5",  # the replica drains for this + 5 s when the cluster stops
    )
    reg = Registry(RegistryConfig(tracking_uri=tracking_uri))
    train_root = tmp_path / "ray"

    # 1. Stopped with `ray job stop` once the first trial has checkpointed an epoch.
    assert _submit(job_cluster, sets, "search-1", wait=False).returncode == 0
    _wait_for_checkpoints(job_cluster, "search-1", train_root, trials=1)
    subprocess.run(
        ["ray", "job", "stop", f"--address={job_cluster.url}", "search-1"],
        env=job_cluster.env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert job_cluster.wait("search-1", timeout_s=60)["status"] == "STOPPED"
    # Listed once the job has stopped: during the driver's grace after SIGTERM the trial can still write
    # a checkpoint (on a busy machine it did), and the resumed run rightly starts from that one.
    stopped = _checkpoints(train_root)
    [run] = reg.client.search_runs([reg.experiment_id()])
    assert run.info.status == "KILLED", run.info.status  # the SIGTERM reached the driver's cleanup
    assert reg.versions() == [] and reg.champion() is None
    [experiment] = [p for p in (tmp_path / "tune").iterdir() if p.is_dir()]

    # 2. Resumed; its driver is SIGKILLed once the second trial has checkpointed an epoch.
    job_cluster.release_leaked_placement_groups(job_cluster.job("search-1")["job_id"])
    assert _submit(job_cluster, [*sets, "--resume-tune", str(experiment)], "search-2", wait=False).returncode == 0
    _wait_for_checkpoints(job_cluster, "search-2", train_root, trials=2)
    pids = _driver_pids(str(tmp_path))
    assert pids, "no pipeline driver found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert job_cluster.wait("search-2", timeout_s=60)["status"] == "FAILED"
    killed = _checkpoints(train_root)  # once the job has failed, as above
    assert reg.versions() == [] and reg.champion() is None  # killed before registering: no version, no alias
    [first] = stopped
    assert len(killed) == 2, "a resumed search must reuse each trial's Train run, not start new ones"
    [second] = set(killed) - {first}
    _resumed_from(stopped, killed, first, epochs=8)

    # 3. Resumed again: runs to the end, promoted, deployed.
    job_cluster.release_leaked_placement_groups(job_cluster.job("search-2")["job_id"])
    r = _submit(job_cluster, [*sets, "--resume-tune", str(experiment)], "search-3", deploy=True)
    job = job_cluster.job("search-3")
    assert job["status"] == "SUCCEEDED", r.stdout[-4000:]
    assert "gate           PROMOTED" in r.stdout and '"model_version":"1"' in r.stdout
    # The replica serves version 1, fetched through the server: the model lives only in its artifact store.
    info = http.get(f"http://127.0.0.1:{serve_port}/model", timeout=10).json()
    assert info["version"] == "1" and info["model_uri"] == "models:/sentiment-distilbert@champion"
    assert list((server_root / "artifacts").rglob("model.safetensors"))
    # No embedded store beside the driver: no MLflow database, no registered model files (registry.root
    # holds only the evidence log's SQLite file: this config names no database for it).
    assert not list(tmp_path.rglob("mlflow.db")) and not list((tmp_path / "mlflow").rglob("model.safetensors"))
    assert reg.champion() == "1"
    # Each piece ran where the resources put it: driver on the head, training and serving on their nodes.
    assert job["driver_node_id"] == job_cluster.node_ids["head"]
    assert set(job_cluster.actors_by_node("RayTrainWorker").values()) == {"train"}
    assert set(job_cluster.actors_by_node("ServeReplica:resumed:resumed-model").values()) == {"serve"}

    after = _checkpoints(train_root)
    assert set(after) == {first, second}
    assert after[first] == killed[first], "the finished trial was run again"
    _resumed_from(killed, after, second, epochs=8)


def test_two_pipelines_gating_at_once_from_different_nodes_end_with_the_better_model(
    job_cluster, mlflow_server, tmp_path
):
    """Drivers on the head and on the serving node share one tracking server (and its registry): the gate
    lock lives in that registry (in its database, which the drivers reach through registry.lock_db_uri),
    so the decisions are taken one after the other whatever the order, the better model ends as champion
    and the history records both decisions."""
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    tracking_uri = mlflow_server[0]
    common = [
        "train.epochs=2",
        "data.synthetic.n_samples=1600",
        "tune.num_samples=1",
        "gate.floor=0.0",  # whichever decides first may become champion: the second must then win or lose on F1
        f"registry.tracking_uri={tracking_uri}",
        # The server's own database, which these drivers reach: the gate lock is then exact (fenced writes).
        f"registry.lock_db_uri={mlflow_server[2]}",
        "registry.model_name=raced",
    ]
    runs = {"good": ("driver_a", "train.lr=1e-3"), "bad": ("driver_b", "train.lr=0")}
    for name, (driver, lr) in runs.items():
        args = _sets(tmp_path / name, *common, lr)
        assert _submit(job_cluster, args, f"race-{name}", wait=False, driver=driver).returncode == 0
    jobs = {name: job_cluster.wait(f"race-{name}") for name in runs}
    for name, job in jobs.items():
        # SUCCEEDED: promoted; FAILED with exit code 3: blocked by the gate. Anything else is a failure.
        assert job["status"] == "SUCCEEDED" or "code 3" in job["message"], (job, job_cluster.logs(f"race-{name}"))
    assert jobs["good"]["driver_node_id"] != jobs["bad"]["driver_node_id"]

    reg = Registry(RegistryConfig(tracking_uri=tracking_uri, model_name="raced"))
    versions = {v.tags["pipeline_run"]: v for v in reg.versions()}
    assert len(versions) == 2 and all(v.tags["gate.decision"] in ("promote", "block") for v in versions.values())
    best = max(versions.values(), key=lambda v: float(v.tags["test_f1"]))
    worst = min(versions.values(), key=lambda v: float(v.tags["test_f1"]))
    assert float(best.tags["test_f1"]) > float(worst.tags["test_f1"])
    assert reg.champion() == best.version
    tags = reg.client.get_registered_model("raced").tags
    history = [json.loads(v) for k, v in tags.items() if k.startswith("history.")]
    assert sorted(e["version"] for e in history if e["event"] == "gate") == sorted(v.version for v in versions.values())
    # The lock was released: its lease is free.
    lock = reg.client.get_registered_model("raced.gate-lock")
    assert lock.tags == {"lease": ""} and not lock.latest_versions


def test_the_tracking_server_keeps_its_registry_in_postgresql(postgres, mlflow_server):
    """The tests above ran against this server; where PostgreSQL is installed its registry lives there."""
    uri, why_not = postgres
    if uri is None:
        pytest.skip(f"tracking server tested on sqlite only: {why_not}")
    import psycopg2

    assert mlflow_server[2].startswith("postgresql+psycopg2://")
    with psycopg2.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM registered_models ORDER BY name")
        names = [row[0] for row in cur.fetchall()]
    assert "raced" in names and "sentiment-distilbert" in names, names

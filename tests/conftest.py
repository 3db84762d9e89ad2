"""Shared fixtures: tiny configs, one local Ray cluster per session, trained tiny models."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEEDBACK_TOKEN = "test-feedback-token"  # not a secret: the token of the tests' own local apps
FEEDBACK_AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}

# Tiny DistilBERT with a tokenizer trained on the synthetic corpus: seconds per epoch on 2 cores.
TINY = [
    "model.source=tiny",
    "model.max_length=64",
    "data.synthetic.n_samples=4000",
    "train.epochs=6",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.warmup_ratio=0.05",
    "train.precision=fp32",
    "train.log_every_steps=1000",
    "tune.num_samples=2",
    "tune.max_concurrent_trials=1",
    "tune.search_space={}",
    "gate.floor=0.8",
    "ray.num_cpus=4",
]


def tiny_config(tmp: Path, *extra: str):
    from ray_jobs.config import load_config

    paths = [f"train.storage_path={tmp}/ray", f"tune.storage_path={tmp}/tune", f"registry.root={tmp}/mlflow"]
    return load_config(ROOT / "tune_configs" / "quickstart.yaml", [*TINY, *paths, *extra])


def small_app(port: int, prefix: str, app: str) -> list[str]:
    """--set values of a one-replica app of the tiny model at `prefix`: fp32, half a core, no explainer, no
    drift monitor (the tests that are about them turn them on)."""
    return [
        f"serve.port={port}",
        f"serve.route_prefix={prefix}",
        f"serve.app_name={app}",
        "serve.precision=fp32",
        "serve.num_cpus=0.5",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1",
        "serve.explain.enabled=false",
        "serve.drift.enabled=false",
    ]


class _SharedHttp:
    """`httpx.get`/`httpx.post` on one client shared by all tests (thread-safe). httpx's module functions
    build a client per call, and each client loads the system's CA certificates: about 20 ms of CPU, which
    loops of hundreds of requests took from the servers under test on 2 cores. No keep-alive: every request
    opens its own connection, as `httpx.get` does, so a test that kills a server never reuses a pooled
    connection to it."""

    def __init__(self) -> None:
        self._client = None
        self._lock = threading.Lock()

    def _shared(self):
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
            return self._client

    def get(self, url: str, **kwargs):
        return self._shared().get(url, **{"timeout": 5.0, **kwargs})  # httpx.get's default timeout

    def post(self, url: str, **kwargs):
        return self._shared().post(url, **{"timeout": 5.0, **kwargs})


http = _SharedHttp()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def request_stream(url: str, text: str, field: str):
    """POST `{url}/predict` one request after another in a thread while the block runs (a hot swap, say).
    Yields (answers, failures): `field` of each 200 answer, in order; the status or error of anything else."""
    import httpx

    answers: list = []
    failures: list = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/predict", json={"text": text})
                    (answers if r.status_code == 200 else failures).append(
                        r.json()[field] if r.status_code == 200 else r.status_code
                    )
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                time.sleep(0.02)

    t = threading.Thread(target=stream)
    t.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        t.join()


def labels_survive(url: str, restart, n: int = 20) -> dict:
    """Answer and label `n` requests, run `restart()` (a killed evidence store, a redeployed app), and
    check that the new store has every label: each is counted, a different label for one of them is
    still refused (409), the same one accepted. Returns the new store's /challenger `store` section."""

    texts = [f"a review labelled before the restart, number {i}" for i in range(n)]
    answers = []
    for i in range(0, n, 16):
        r = http.post(f"{url}/batch_predict", json={"texts": texts[i : i + 16]}, timeout=60)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    labels = {a["request_id"]: ("positive" if i % 3 else "negative") for i, a in enumerate(answers)}
    for rid, label in labels.items():
        r = http.post(f"{url}/feedback", json={"request_id": rid, "label": label}, headers=FEEDBACK_AUTH)
        assert r.status_code == 200, r.text
    before = http.get(f"{url}/challenger", timeout=30).json()["store"]
    assert before["log"] is not None and before["labelled"] >= n
    restart()
    deadline, after = time.time() + 120, None
    while time.time() < deadline:
        r = http.get(f"{url}/challenger", timeout=30)
        if r.status_code == 200 and r.json()["store"]["started_at"] != before["started_at"]:
            after = r.json()["store"]
            break
        time.sleep(0.3)
    assert after is not None, "no new evidence store came up"
    assert after["labelled"] >= before["labelled"] and after["log"]["loaded"] >= n, after
    flip = {"positive": "negative", "negative": "positive"}
    for rid, label in labels.items():
        r = http.post(f"{url}/feedback", json={"request_id": rid, "label": flip[label]}, headers=FEEDBACK_AUTH)
        assert r.status_code == 409, r.text
    rid, label = next(iter(labels.items()))
    assert (
        http.post(f"{url}/feedback", json={"request_id": rid, "label": label}, headers=FEEDBACK_AUTH).status_code == 200
    )
    return after


def live_actor_pid(class_name: str) -> int:
    """The process of the one live actor of `class_name` on this process's Ray cluster. The address is
    explicit: without one, Ray's state API asks the cluster started last on the machine, which is another
    test process's where the suite runs in two (pytest-xdist)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    found = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]) if a.class_name == class_name]
    assert len(found) == 1, found
    return found[0].pid


def store_pid(app: str) -> int:
    """The process of an app's live evidence store replica."""
    return live_actor_pid(f"ServeReplica:{app}:{app}-evidence")


def model_process(model_dir: str) -> int | None:
    """The pid of the model process serving `model_dir` (its command line names the folder; a forked
    one's is a title of words, serve_app.fork_server)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").split()
        except OSError:
            continue
        if b"serve_app.model_worker" in argv and model_dir.encode() in argv:
            return int(pid)
    return None


def terminate(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than `timeout_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state and job clients look first


def _stop_session_cluster() -> None:
    import ray

    if ray.is_initialized():  # serve.shutdown() would otherwise start a cluster to find Serve in
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop(API_SERVER_ENV, None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for all integration tests (4 logical CPUs on 2 cores: Serve's
    proxy/controller and Train's controller need slots beside the workers). It advertises one GPU, as
    `ray start --num-gpus 1` would on a machine without CUDA: GPU replicas are scheduled, then must fail
    clearly (test_serve_integration); nothing else asks for it."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train's controller polls its workers every 2 s: a finished fit waits up to that long to be
    # seen, and the suite runs about twenty fits. Polling every 0.5 s costs nothing on a tiny model.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The feedback token (serve.feedback.token_env): the replicas inherit it from here, and so does
    # `registry promote` in this process. The tests send it as FEEDBACK_AUTH.
    os.environ.setdefault("SENTIMENT_FEEDBACK_TOKEN", FEEDBACK_TOKEN)
    # This cluster's own state API, for every process of it (they inherit this environment): Ray's state
    # API finds "the" local cluster by itself, which is the one started last on the machine where
    # several run (the suite in two processes, a test's `ray start` cluster). Ray Train's
    # PlacementGroupCleaner asks it whether its controller lives: asking another cluster, it was told
    # no, and worker groups' placement groups leaked until no task could be scheduled.
    dashboard = free_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard}"
    # address="local": a cluster of its own, never one that `ray start` left on this machine.
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=1,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        log_to_driver=False,
        _metrics_export_port=free_port(),
    )
    yield ray
    _stop_session_cluster()


@pytest.fixture(scope="session")
def no_session_cluster() -> None:
    """For the tests that start Ray clusters of their own (`ray start`, several nodes), which live in
    modules named test_cluster_*: they run first, before any test of their process has started the
    shared cluster, and need nothing of it (untrained models, not trained_tiny). Should one run after it
    anyway (an explicit order), the shared cluster is shut down first, as its idle processes slow a
    second cluster by about 1.6x on 2 cores; once stopped it stays stopped."""
    _stop_session_cluster()


OWN_CLUSTERS = "test_cluster_"  # the modules whose tests start Ray clusters of their own


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _own_clusters(nodeid: str) -> bool:
    return os.path.basename(_module(nodeid)).startswith(OWN_CLUSTERS)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering
def pytest_collection_modifyitems(items) -> None:
    wrong = [
        item.nodeid
        for item in items
        if ("no_session_cluster" in getattr(item, "fixturenames", ())) != _own_clusters(item.nodeid)
    ]
    if wrong:
        raise pytest.UsageError(f"only and all tests in {OWN_CLUSTERS}* modules use no_session_cluster: {wrong}")
    # Stable sort, collection order otherwise: the test_cluster_* modules first, then the modules with
    # integration tests, then the rest. With -n 2 (`pytest_xdist_make_scheduler`) one process starts on
    # the first group while the other takes the integration modules, and the quick tests fill the end.
    integration = {_module(item.nodeid) for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: (not _own_clusters(item.nodeid), _module(item.nodeid) not in integration))


def pytest_configure(config) -> None:
    """With -n N, before any test process starts: the Ray token all clusters of the run share
    (~/.ray/auth_token), made here once if there is none. Otherwise the first `ray start` (which makes it)
    and the first `ray.init()` of another process (which makes one too) could each write their own."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: only called with -n
def pytest_xdist_make_scheduler(config, log):
    """With -n N: each module's tests in one process, in order (they share its fixtures: a deployed app,
    a PostgreSQL server), and all test_cluster_* modules in one process, one after another (each of their
    tests starts clusters on this machine; two at once would halve the machine for both). The groups go
    out in collection order (see above), not largest first."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return OWN_CLUSTERS if _own_clusters(nodeid) else _module(nodeid)

    config.option.loadscopereorder = False
    return ModuleGroups(config, log)


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL server on 127.0.0.1 (one per test module): yields (URI of its database
    `mlflow`, None), or (None, why not) where this machine has no PostgreSQL or no driver for it.
    `.ci/run` installs PostgreSQL where it can."""
    bindir = _pg_bindir()
    if bindir is None:
        yield None, "PostgreSQL (initdb, pg_ctl) is not installed"
        return
    try:
        import psycopg2  # noqa: F401 - MLflow's server needs it for postgresql:// URIs
    except ImportError:
        yield None, "psycopg2 is not installed (pip install -e '.[test]')"
        return
    as_postgres: list[str] = []
    data = tempfile.mkdtemp(prefix="pg-", dir="/tmp")
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            yield None, "running as root and there is no postgres user to run PostgreSQL as"
            return
        os.chown(data, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = [*as_postgres, f"{bindir}/pg_ctl", "-D", data]
    try:
        try:
            subprocess.run(
                [*as_postgres, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                capture_output=True,
                check=True,
            )
            opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
            subprocess.run(
                [*run, "-l", f"{data}/server.log", "-w", "-o", opts, "start"], capture_output=True, check=True
            )
            subprocess.run(
                [*as_postgres, f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                capture_output=True,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError) as err:
            why = getattr(err, "stderr", b"") or b""
            yield None, f"PostgreSQL did not start: {err} {why.decode(errors='replace')[-300:]}"
            return
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow", None
    finally:
        subprocess.run([*run, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy, started once per session on 127.0.0.1 (its options cannot change later)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def trained_tiny(ray_cluster, session_tmp):
    """A tiny model trained with Ray Train (2 workers, DDP), shared by several tests:
    (config, ray Result, best checkpoint path, best metrics)."""
    from ray_jobs.data import load_splits
    from ray_jobs.train import best_checkpoint, fit, prepare_data, system_settings

    cfg = tiny_config(session_tmp / "trained", "train.num_workers=2")
    splits = load_splits(cfg.data)
    data = prepare_data(cfg, splits)
    result = fit(cfg, system_settings(cfg, data, {"data_digests": splits.digests()}))
    path, metrics = best_checkpoint(result, cfg.train.select_by)
    return cfg, result, path, metrics


@pytest.fixture(scope="session")
def untrained_tiny(session_tmp) -> str:
    """A tiny model folder with random weights (a deliberately bad model)."""
    from ray_jobs.model import build_model, save_model

    cfg = tiny_config(session_tmp / "untrained")
    model, tok = build_model(cfg.model, seed=1)
    return str(save_model(model, tok, session_tmp / "untrained-model", {"max_length": 64, "truncation": "head_tail"}))


@pytest.fixture(scope="session")
def leaning_tiny(session_tmp) -> str:
    """A second tiny model with random weights, its classifier's bias set to lean one way: every answer's
    score differs from untrained_tiny's, so a swap from one to the other shows in each answer. (Neither
    needs Ray: the tests with clusters of their own use these, before any shared cluster runs.)"""
    import torch

    from ray_jobs.model import build_model, save_model

    model, tok = build_model(tiny_config(session_tmp / "leaning").model, seed=2)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-1.5, 1.5]))
    return str(save_model(model, tok, session_tmp / "leaning-model", {"max_length": 64, "truncation": "head_tail"}))


@pytest.fixture
def replica_context(monkeypatch):
    """For SentimentModel instances outside Serve (their @serve.batch method awaited directly): the
    replica context that @serve.batch reads max_ongoing_requests from, and a fresh batch queue. Serve
    keeps one queue per decorated method, bound to the event loop that first used it (a replica has
    one instance and one loop); each test here runs its own loop."""
    from types import SimpleNamespace

    from ray import serve

    from serve_app.app import SentimentModel

    fake = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: fake)
    lazy_queue = SentimentModel._predict_batch.set_max_batch_size.__self__
    lazy_queue._queue = None
    yield
    lazy_queue._queue = None


def repeated_reviews(n: int = 1500, repeats: int = 60, seed: int = 0):
    """Synthetic reviews, `repeats` of them twice (real corpora repeat texts)."""
    from ray_jobs.data import Split, generate_reviews

    ex = generate_reviews(n, seed=seed)
    return Split(ex.texts + ex.texts[:repeats], ex.labels + ex.labels[:repeats])


def write_parts(split, folder, parts: int, kind: str = "parquet") -> None:
    """`split` in `parts` files of one kind (columns review, y), rows dealt round-robin (each file a mix
    of the whole)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        frame = pd.DataFrame({"review": split.texts[k::parts], "y": split.labels[k::parts]})
        path = folder / f"part-{k:03d}.{kind}"
        if kind == "parquet":
            frame.to_parquet(path)
        elif kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_json(path, orient="records", lines=True)

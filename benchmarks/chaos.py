"""Faults under load: what clients see when parts of the serving system die, on loopback.

A closed-loop HTTP load (N clients on kept-alive connections, each sending its next /predict when the
last is answered) runs against the Serve app in a `ray start` cluster of its own, while one fault is
injected per round:

    model-kill       SIGKILL the model process of one replica (serve_app.model_worker)
    model-stop       SIGSTOP it: alive but wedged, never answering
    replica-kill     SIGKILL one replica actor (ServeReplica)
    controller-kill  SIGKILL Serve's controller
    proxy-kill       SIGKILL Serve's proxy actor (in haproxy mode it runs HAProxy)
    hot-swap         deploy another model (ray_jobs.deploy) while the load runs
    bad-swap         deploy a model whose weights are corrupt (the deploy must be refused)
    downscale        deploy with one replica fewer
    poison           ten requests, one every 0.5 s, whose text makes the model raise (the model processes run
                     with serve_app.model_worker.POISON_ENV set to a marker the load's texts never hold):
                     each must get its own 422; the load's requests, batched with them, must not fail
    deadly           three requests, one every 5 s, whose text kills the model process (SIGKILL, as a native
                     crash would: model_worker.POISON_KILL_ENV): each must get its own 422 once its batch has
                     been run one text at a time, the load's requests must not fail, no replica may fail

    python benchmarks/chaos.py                                  # both ingress modes, every fault
    python benchmarks/chaos.py --modes haproxy --faults replica-kill --seconds 20

Per fault it prints requests sent, failures by status (or `conn` for a broken connection), p99 from the
fault until recovery, and seconds to full recovery: until every replica runs with a model process, Serve
reports it RUNNING (routes to it) and /health says ok again, and no request is slow or failing. Each
mode gets its own cluster (the ingress mode is read when Ray starts) with `--replicas` replicas of a
384-wide 6-layer DistilBERT at 128 tokens (random head: answers are not the point). Requests are bounded
in count and time; everything goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import _exchange, load_texts  # noqa: E402  (the same bare HTTP client as the load benchmark)

ROOT = Path(__file__).resolve().parents[1]
APP = "chaos"
FAULTS = [
    "model-kill",
    "model-stop",
    "replica-kill",
    "controller-kill",
    "proxy-kill",
    "hot-swap",
    "bad-swap",
    "downscale",
    "poison",
    "deadly",
]
POISON = "CHAOS-POISON-MARKER"
DEADLY = "CHAOS-DEADLY-MARKER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ processes
def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every process below `root` (this cluster's, not another on the machine)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = {}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    out[child] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                out[child] = ""
            frontier.append(child)
    return out


def find(root: int, needle: str, procs: dict[int, str] | None = None) -> list[int]:
    """Pids below `root` whose command line holds `needle` (from `procs`, one scan, when given)."""
    return sorted(pid for pid, cmd in (procs if procs is not None else descendants(root)).items() if needle in cmd)


def replicas(root: int, procs: dict[int, str] | None = None) -> list[int]:
    return find(root, f"ServeReplica:{APP}:{APP}-model", procs)  # not the explainer's or the drift monitor's


def model_processes(root: int, procs: dict[int, str] | None = None, folders: tuple[str, ...] = ()) -> list[int]:
    """Machine-wide, not below `root`: a model process forked by serve_app.fork_server is the server's
    child, and the server is init's. This benchmark runs one cluster at a time; where other clusters may
    run (the tests, in two processes), `folders` keeps those serving one of these model folders."""
    everything = descendants(1)
    found = find(1, "serve_app.model_worker", everything)
    return [pid for pid in found if not folders or any(f" {folder}" in everything[pid] for folder in folders)]


# ------------------------------------------------------------------------------------ load
class Load:
    """Closed-loop clients in a thread of their own; every request is recorded as (start, end, status)
    where status is the HTTP code, or "conn" for a connection that broke without an answer."""

    def __init__(self, port: int, texts: list[str], clients: int, max_requests: int):
        self.port, self.clients, self.max_requests = port, clients, max_requests
        bodies = [json.dumps({"text": t}).encode() for t in texts]
        self.requests = [
            (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(b)}\r\n\r\n"
            ).encode()
            + b
            for b in bodies
        ]
        self.records: list[tuple[float, float, int | str]] = []
        self.in_flight: dict[int, float] = {}  # client -> start of its unanswered request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    async def _run(self) -> None:
        async def client(k: int) -> None:
            i, conn = k, None
            while not self._stop.is_set() and len(self.records) < self.max_requests:
                t0 = self.in_flight[k] = time.monotonic()
                try:
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", self.port)
                    status, close = await asyncio.wait_for(_exchange(*conn, self.requests[i % len(self.requests)]), 120)
                    if close:
                        conn[1].close()
                        conn = None
                except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    status = "conn"
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    await asyncio.sleep(0.05)  # a refused connection answers at once: no busy loop
                self.records.append((t0, time.monotonic(), status))
                del self.in_flight[k]
                i += self.clients
            if conn is not None:
                conn[1].close()

        await asyncio.gather(*(client(k) for k in range(self.clients)))


# ------------------------------------------------------------------------------------ the cluster
def cluster_env(mode: str, dashboard_port: int | None = None) -> dict[str, str]:
    """The environment of a private cluster in ingress `mode` (and of every command that talks to it).
    With the `dashboard_port` it will have: its processes' state API is this cluster's, not the one
    Ray's discovery picks, which is the last one started on the machine where several run."""
    from ray_jobs.runtime import serve_ingress_env

    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")  # another cluster's (the tests' shared one)
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("RAY_SERVE_", "RAY_AUTH_"))}
    if dashboard_port is not None:
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # HAProxy's stats and metrics listeners default to fixed ports (8404, 9101) that a second cluster on
    # the machine, or an HAProxy a killed run left behind, holds: its start then fails. Ports of its own.
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    env.update(serve_ingress_env(mode))
    # Token auth on, and said so: with RAY_AUTH_MODE unset, `ray start` turns it on by itself once any
    # `ray.init()` has left ~/.ray/auth_token, while the `ray status` CLI then cannot authenticate.
    env["RAY_AUTH_MODE"] = "token"
    from serve_app.model_worker import POISON_ENV, POISON_KILL_ENV

    env[POISON_ENV] = POISON  # the model processes raise on texts holding it (the poison fault only sends them)
    env[POISON_KILL_ENV] = DEADLY  # and die on texts holding this one (the deadly fault)
    return env


def _ray_start(
    env: dict[str, str],
    gcs: int,
    args: list[str],
    num_cpus: int,
    resources: dict[str, float] | None,
    cwd: str | None,
    prefix: str,
    extra_args: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`ray start --block ARGS` in a temp dir of its own (short: Ray puts sockets under it); returns once the
    cluster at `gcs` answers `ray status` and lists `resources`: (process, temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    # Ports of their own for the node's agent (the Jobs API submits through the head's) and the head's Ray
    # Client server: their defaults (52365, 10001) belong to whichever cluster on the machine took them
    # first (the tests run clusters side by side).
    ports = [f"--dashboard-agent-listen-port={free_port()}"]
    ports += [f"--ray-client-server-port={free_port()}"] if "--head" in args else []
    node = subprocess.Popen(
        [
            "ray",
            "start",
            "--block",
            *args,
            *ports,
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *([f"--resources={json.dumps(resources)}"] if resources else []),
            *(extra_args or []),
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        status = subprocess.run(
            ["ray", "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True, text=True
        )
        if status.returncode == 0 and all(f" {name}" in status.stdout for name in resources or {}):
            return node, temp_dir
        time.sleep(1)
    stop_head(node, temp_dir)
    raise RuntimeError(f"the Ray node ({' '.join(args)}, {resources}) did not come up within 120 s")


def start_head(
    env: dict[str, str],
    num_cpus: int,
    dashboard_port: int | None = None,
    resources: dict[str, float] | None = None,
    cwd: str | None = None,
    extra_args: list[str] | None = None,
) -> tuple[subprocess.Popen, int, str]:
    """A `ray start --head --block` cluster that is this process's to stop (`stop_head`), in a temp dir of
    its own, so that no later `ray.init()` on this machine joins it.
    With `dashboard_port`, the dashboard and its Jobs API listen there on 127.0.0.1.
    Returns once the head accepts clients: (process, GCS port, temp dir)."""
    # The token the head and its clients share (~/.ray/auth_token; kept if one exists, as ray.init does).
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    gcs = free_port()
    dashboard = (
        ["--include-dashboard=false"]
        if dashboard_port is None
        else ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    )
    head, temp_dir = _ray_start(
        env, gcs, ["--head", f"--port={gcs}", *dashboard], num_cpus, resources, cwd, "ray-chaos-", extra_args
    )
    return head, gcs, temp_dir


def auth_token(env: dict[str, str]) -> str:
    """The token of the clusters `start_head` starts (the one `ray get-auth-token` prints)."""
    return subprocess.run(["ray", "get-auth-token"], env=env, capture_output=True, text=True, check=True).stdout.strip()


def running_replicas(dashboard: str, token: str, app: str) -> int:
    """Model replicas of `app` (deployment `<app>-model`; not the explainer's or the drift monitor's)
    that Serve reports RUNNING (Serve's REST API on the dashboard at `dashboard`): the ones it routes
    to. A replica whose process is up can stay STARTING for seconds while it loads its model; a second
    fault in that window hits a one-replica app. 0 while the API does not answer."""
    import httpx

    try:
        r = httpx.get(f"{dashboard}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        deployments = r.json()["applications"][app]["deployments"] if r.status_code == 200 else {}
        replicas = deployments.get(f"{app}-model", {}).get("replicas", [])
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return 0
    return sum(rep["state"] == "RUNNING" for rep in replicas)


def start_worker(
    env: dict[str, str],
    gcs: int,
    num_cpus: int,
    resources: dict[str, float],
    cwd: str,
    extra_args: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Another Ray node on this machine joining the head at `gcs`, with its own temp dir (so each node
    unpacks a job's working_dir into a folder of its own) and its own working folder `cwd`. Returns once
    the cluster lists its resources: (process, temp dir); `stop_head` stops it."""
    return _ray_start(env, gcs, [f"--address=127.0.0.1:{gcs}"], num_cpus, resources, cwd, "ray-node-", extra_args)


def stop_head(head: subprocess.Popen, temp_dir: str, graceful: bool = True) -> None:
    """Stop the cluster `start_head` started: SIGTERM, a clean shutdown (killed if it takes longer than a
    minute); or, with graceful=False (tests that are done with it), SIGKILL to every process of it."""
    if graceful:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
    else:
        for pid in [*descendants(head.pid), head.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def deploy_command(sets: list[str], *extra: str) -> list[str]:
    """`python -m ray_jobs deploy` on the quickstart config with `--set` for each of `sets`."""
    config = str(ROOT / "tune_configs/quickstart.yaml")
    return [
        sys.executable,
        "-m",
        "ray_jobs",
        "deploy",
        "--config",
        config,
        *[x for kv in sets for x in ("--set", kv)],
        *extra,
    ]


class Cluster:
    def __init__(self, mode: str, tmp: Path, args):
        self.mode, self.tmp, self.args = mode, tmp, args
        self.port = free_port()
        dashboard_port = free_port()
        self.env = cluster_env(mode, dashboard_port)
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.head, self.gcs, self.temp_dir = start_head(self.env, args.cluster_cpus, dashboard_port=dashboard_port)
        self.token = auth_token(self.env)

    def deploy(self, model_dir: str, replicas: int) -> subprocess.CompletedProcess:
        sets = [
            f"ray.address=127.0.0.1:{self.gcs}",
            f"ray.serve_ingress={self.mode}",
            f"serve.port={self.port}",
            f"serve.model_uri={model_dir}",
            f"serve.num_cpus={self.args.replica_cpus}",
            f"serve.app_name={APP}",
            f"serve.autoscaling.min_replicas={replicas}",
            f"serve.autoscaling.max_replicas={replicas}",
            f"registry.root={self.tmp}/mlflow",
        ]
        return subprocess.run(
            deploy_command(sets),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def healthy(self, replicas_wanted: int) -> bool:
        """Full strength: every replica runs with a model process, Serve routes to all of them (RUNNING),
        and /health is ok."""
        import httpx

        procs = descendants(self.head.pid)  # one scan of /proc per poll: it runs beside the load
        if (
            len(replicas(self.head.pid, procs)) != replicas_wanted
            or len(model_processes(self.head.pid, procs)) != replicas_wanted
            or running_replicas(self.dashboard, self.token, APP) != replicas_wanted
        ):
            return False
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
            return r.status_code == 200 and r.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    def wait_healthy(self, replicas_wanted: int, timeout_s: float = 180) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.healthy(replicas_wanted):
                return time.monotonic() - start
            time.sleep(0.5)
        raise RuntimeError(f"not back to {replicas_wanted} healthy replicas within {timeout_s:.0f}s")

    def stop(self) -> None:
        stop_head(self.head, self.temp_dir)


# ------------------------------------------------------------------------------------ one fault
def inject(fault: str, cluster: Cluster, models: dict[str, str], state: dict) -> str:
    """Do the fault now; returns what was done (for the table)."""
    root = cluster.head.pid
    if fault in ("model-kill", "model-stop"):
        pid = model_processes(root)[0]
        os.kill(pid, signal.SIGKILL if fault == "model-kill" else signal.SIGSTOP)
        return f"pid {pid}"
    if fault in ("replica-kill", "controller-kill", "proxy-kill"):
        needle = {
            "replica-kill": f"ServeReplica:{APP}:",
            "controller-kill": "ServeController",
            "proxy-kill": "ProxyActor",
        }[fault]
        pids = find(root, needle)
        if not pids:
            raise RuntimeError(f"no process matching {needle}")
        os.kill(pids[0], signal.SIGKILL)
        return f"pid {pids[0]}"
    if fault in ("poison", "deadly"):
        marker, n, every_s = (POISON, 10, 0.5) if fault == "poison" else (DEADLY, 3, 5.0)
        state["poison"] = threading.Thread(
            target=lambda: state.update(poison_statuses=send_poison(cluster.port, marker, n, every_s))
        )
        state["poison"].start()
        return f"{n} requests holding {marker}"
    if fault in ("hot-swap", "bad-swap", "downscale"):
        target = {
            "hot-swap": models["other"] if state["model"] == models["main"] else models["main"],
            "bad-swap": models["broken"],
            "downscale": state["model"],
        }[fault]
        wanted = state["replicas"] - 1 if fault == "downscale" else state["replicas"]
        state["deploy"] = threading.Thread(target=lambda: state.update(result=cluster.deploy(target, wanted)))
        state["deploy"].start()
        if fault == "hot-swap":
            state["model"] = target
        if fault == "downscale":
            state["replicas"] = wanted
        return f"deploy {Path(target).name} x{wanted}"
    raise ValueError(fault)


def send_poison(port: int, marker: str, n: int, every_s: float) -> list[int]:
    """The poison and deadly faults' requests: their HTTP statuses (each should be 422), one every every_s."""
    import httpx

    statuses = []
    for i in range(n):
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"text": f"{marker} number {i}"}, timeout=120)
        statuses.append(r.status_code)
        time.sleep(every_s)
    return statuses


def _p99(latencies: list[float]) -> float:
    lat = sorted(latencies)
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")


def timeline(records: list[tuple[float, float, int | str]], t_fault: float, bin_s: float = 0.5) -> dict:
    """The requests by the half second they ended in, from the fault: how many succeeded and failed, and
    the p99 latency of those that succeeded (what benchmarks/figures.py draws)."""
    bins: dict[int, list] = {}
    for start, end, status in records:
        counts = bins.setdefault(int((end - t_fault) // bin_s), [0, 0, []])  # ok, failed, latencies
        if status == 200:
            counts[0] += 1
            counts[2].append(end - start)
        else:
            counts[1] += 1
    keys = sorted(bins)
    return {
        "bin_s": bin_s,
        "t": [k * bin_s for k in keys],
        "ok": [bins[k][0] for k in keys],
        "failed": [bins[k][1] for k in keys],
        "p99_ms": [_p99(bins[k][2]) if bins[k][2] else None for k in keys],  # None: nothing answered
    }


def run_fault(fault: str, cluster: Cluster, models: dict[str, str], texts: list[str], state: dict, args) -> dict:
    """Load, the fault after `lead` seconds, and load on until the system is back: full strength (every
    replica with its model process and RUNNING, /health ok, the model the last deploy asked for) and every
    request answered at normal speed (no failure and nothing slower than 3x the p99 before the fault) for 5 s.
    Recovery time is the later of the two, from the fault."""
    import httpx

    lead = min(5.0, args.seconds / 4)
    with Load(cluster.port, texts, args.clients, args.max_requests) as load:
        time.sleep(lead)
        t_fault = time.monotonic()
        slow_s = max(0.5, 3 * _p99([e - s for s, e, st in load.records if st == 200]) / 1000)
        what = inject(fault, cluster, models, state)
        if "deploy" in state:
            state.pop("deploy").join()
            done = state.pop("result")
            if done.returncode:  # the deploy's own error line, not Ray's log lines around it
                lines = done.stderr.strip().splitlines() or [""]
                refused = next((ln for ln in reversed(lines) if "deploy failed" in ln), lines[-1])
                what += f" -> exit {done.returncode} ({refused[:200]})"
            else:
                what += " -> exit 0"
        if "poison" in state:
            state.pop("poison").join()
            statuses = state.pop("poison_statuses")
            what += f" -> {sum(st == 422 for st in statuses)} of {len(statuses)} answered 422 ({statuses})"
        strength = None
        while True:
            now = time.monotonic()
            if strength is None and cluster.healthy(state["replicas"]):
                if (
                    httpx.get(f"http://127.0.0.1:{cluster.port}/model", timeout=5).json().get("model_uri")
                    == state["model"]
                ):
                    strength = now
            bad = [e for s, e, st in list(load.records) if e >= t_fault and (st != 200 or e - s > slow_s)]
            # A request still unanswered past slow_s (a wedged model holds it) is not calm either.
            stuck = any(now - start > slow_s for start in list(load.in_flight.values()))
            calm_since = now if stuck else max(bad, default=t_fault)
            if strength is not None and now - calm_since >= 5 and now - t_fault >= args.seconds - lead:
                break
            if now - t_fault > args.seconds + 180:
                break
            time.sleep(0.25)
    records = load.records
    recovered = None if strength is None else max(strength, calm_since)
    failed: dict[str, int] = {}
    for _, _, status in records:
        if status != 200:
            failed[str(status)] = failed.get(str(status), 0) + 1
    end = recovered or records[-1][1]
    return {
        "fault": fault,
        "what": what,
        "sent": len(records),
        "failed": sum(failed.values()),
        "by_status": failed,
        "p99_before_ms": _p99([e - s for s, e, st in records if e < t_fault and st == 200]),
        "p99_fault_ms": _p99([e - s for s, e, st in records if e >= t_fault and s <= end and st == 200]),
        "recovery_s": None if recovered is None else recovered - t_fault,
        "timeline": timeline(records, t_fault),
    }


def run_mode(mode: str, models: dict[str, str], texts: list[str], tmp: Path, args) -> list[dict]:
    print(f"\n=== ingress mode: {mode} ({args.replicas} replicas, {args.clients} clients) ===", flush=True)
    if args.ray_stop:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
    cluster = Cluster(mode, tmp / mode, args)
    rows = []
    try:
        done = cluster.deploy(models["main"], args.replicas)
        if done.returncode != 0:
            raise RuntimeError(f"first deploy failed: {done.stderr[-2000:]}")
        state = {"model": models["main"], "replicas": args.replicas}
        cluster.wait_healthy(args.replicas)
        for fault in args.faults:
            if fault == "downscale" and state["replicas"] < 2:
                continue
            row = run_fault(fault, cluster, models, texts, state, args)
            row["mode"] = mode
            rows.append(row)
            recovery = "never" if row["recovery_s"] is None else f"{row['recovery_s']:.1f} s"
            print(
                f"{mode:>8} {fault:>16}: sent {row['sent']:5d}  failed {row['failed']:4d} {row['by_status'] or ''}  "
                f"p99 {row['p99_before_ms']:.0f} ms before, {row['p99_fault_ms']:.0f} ms fault-to-recovery  "
                f"recovered in {recovery}  ({row['what']})",
                flush=True,
            )
            if row["recovery_s"] is None:
                print("  not recovered: the remaining faults of this mode are skipped", flush=True)
                break
            cluster.wait_healthy(state["replicas"])
            time.sleep(2)
    finally:
        cluster.stop()
    return rows


def build_models(tmp: Path, max_length: int) -> dict[str, str]:
    from ray_jobs.config import ModelConfig
    from ray_jobs.model import build_model, save_model

    meta = {"max_length": max_length, "truncation": "head_tail"}
    out = {}
    for name, seed in (("main", 0), ("other", 1)):
        model, tok = build_model(ModelConfig(source="bert", name="minilm"), seed=seed)
        out[name] = str(save_model(model, tok, tmp / f"model-{name}", meta))
    broken = Path(shutil.copytree(out["main"], tmp / "model-broken"))
    (broken / "model.safetensors").write_bytes(b"\0" * 1024)  # corrupt weights: the load fails
    out["broken"] = str(broken)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["proxy", "haproxy"], choices=["proxy", "haproxy"])
    ap.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="load per fault (the fault comes after a quarter of it, at most 5 s)",
    )
    ap.add_argument("--max-requests", type=int, default=200_000, help="per fault")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--cluster-cpus", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--ray-stop", action="store_true", help="run `ray stop --force` first (stops every Ray cluster on this machine)"
    )
    ap.add_argument("--out", help="also write the rows as JSON to this file")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    models = build_models(tmp, args.max_length)
    texts = load_texts(argparse.Namespace(data=None))
    print(
        f"model: 384-wide 6-layer DistilBERT, max_length {args.max_length}; {os.cpu_count()} CPUs; "
        f"{args.clients} closed-loop clients, {args.seconds:.0f} s per fault",
        flush=True,
    )
    rows = []
    for mode in args.modes:
        rows += run_mode(mode, models, texts, tmp, args)
    print(
        "\n| mode | fault | sent | failed | failed by status | p99 before (ms) | p99 fault→recovery (ms) | "
        "recovery (s) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        rec = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        print(
            f"| {r['mode']} | {r['fault']} | {r['sent']} | {r['failed']} | "
            f"{json.dumps(r['by_status']) if r['by_status'] else '-'} | "
            f"{r['p99_before_ms']:.0f} | {r['p99_fault_ms']:.0f} | {rec} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"machine": f"{os.cpu_count()} CPUs", "args": vars(args), "rows": rows}, indent=1)
        )
        from figures import render  # benchmarks/figures.py: the fault timelines, for the docs

        print(f"figure: {render(args.out)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

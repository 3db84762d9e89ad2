"""Serving load test on loopback: a closed-loop HTTP load generator (bounded in requests and time)
sweeps concurrency against, in one run and on the same model:
  0. the Ray Serve app as configured by default (serve-default: `ray.serve_ingress: auto`, which is HAProxy
     where Ray's HAProxy is installed, as on Linux; drift monitoring and the evidence store with its log on),
  1. the Ray Serve app with dynamic batching, behind Serve's Python proxy (Ray's own default),
  2. the same app with Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: the
     replica serves HTTP itself, "direct ingress"; the client talks to the replica's port),
  3. the same app behind Serve's HAProxy ingress (`ray.serve_ingress: haproxy`: the project's retry policy
     and sentiment-haproxy, ray_jobs/runtime.py; port as in 1),
  4. the app with batching off (max batch 1, default proxy),
  5. a plain one-process FastAPI server running the model per request (the seed's design),
next to the in-process batched forward of the same model (the upper bound, no HTTP).

    python benchmarks/serve_load.py                                   # synthetic reviews, 128-token model
    python benchmarks/serve_load.py --levels 1 8 32 64 128 --seconds 10
    python benchmarks/serve_load.py --data ../shared/data/sst2/dev.parquet   # real sentences
    python benchmarks/serve_load.py --only serve-default serve-batched fastapi-per-request --rounds 3 --levels 64
        # the default ingress against Serve's proxy and the per-request server (issue 31)
    python benchmarks/serve_load.py --only serve-batched serve-batched-no-drift --rounds 2 --levels 64 \
        --model <folder with drift_reference.npz>      # the cost of drift monitoring (benchmarks/drift.py)
    python benchmarks/serve_load.py --only shadow-off shadow-on shadow-25 --rounds 2 --levels 1 8 64
        # a challenger in shadow (ray_jobs.rollout): every request mirrored, a quarter, none
    python benchmarks/serve_load.py --only serve-batched-haproxy serve-batched-haproxy-log-off --rounds 3 \
        --levels 64      # the durable prediction log's cost, and every answered prediction written

Every model server gets 1 core (1 torch thread) of the machine's 2; the load generator, the proxy
and Ray's own processes share the other. Each Serve variant runs in its own Ray cluster (the
Serve modes are environment variables read when Ray starts) with the app's default
max_ongoing_requests for the batched app (4 x max batch size), the same for every variant. Mean batch
sizes and the replica's forward seconds are exact counts read through a handle: "model busy" (forward
seconds over wall time) and "forward speed" (texts per forward second over the bound) split a gap to
the bound into an idle model and a slowed one. The upper bound is measured right before and right
after every load level (these shared machines drift by +-30% within minutes); each level is reported
as a share of the mean of its two readings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SERVE_PORT = 18080

PLAIN_SERVER = """
import sys, torch
from fastapi import FastAPI
from pydantic import BaseModel
sys.path.insert(0, {root!r})
from ray_jobs.inference import Predictor
torch.set_num_threads(1)
p = Predictor({model!r}, num_threads=1, precision={precision!r})
app = FastAPI()
class Req(BaseModel):
    text: str
@app.post("/predict")
def predict(r: Req):
    return p.predict([r.text])[0]
@app.get("/health")
def health():
    return {{"status": "ok"}}
"""


class Variant(NamedTuple):
    # ray.serve_ingress: its environment (runtime.serve_ingress_env) goes to the variant's Ray cluster, as
    # Serve reads its ingress mode when Ray starts.
    ingress: str
    max_batch: int | None  # None: --max-batch-size
    access: str  # where the client sends its requests: serve.port, or the replica's own port (direct ingress)
    drift: bool = True  # drift monitoring on
    # None: a model folder, no registry. Else the registry-driven app, with a challenger in shadow that
    # scores this share of requests (0: none). The challenger is the same weights registered again.
    shadow: float | None = None
    feedback: bool = True  # the live evidence store (request ids, /feedback, /challenger)
    log: bool = True  # the store writes every prediction to its durable log (serve.feedback.log, SQLite here)
    # The model's runtime (serve.runtime / quantization; precision None: --precision). The ONNX variants
    # serve the model folder's export whatever its accuracy guard says: the table reports its accuracy.
    runtime: str = "torch"
    quantization: str = "none"
    precision: str | None = None

    @property
    def choice(self):
        from ray_jobs.onnx_runtime import RuntimeChoice

        return RuntimeChoice(self.runtime, self.quantization, max_f1_drop=1.0, min_label_agreement=0.0)


SERVE_VARIANTS = {
    "serve-default": Variant("auto", None, "serve.port"),  # the defaults: what a user gets (issue 31)
    "serve-batched": Variant("proxy", None, "serve.port"),
    "serve-batched-no-drift": Variant("proxy", None, "serve.port", drift=False),
    "serve-batched-direct": Variant("direct", None, "replica"),
    "serve-batched-haproxy": Variant("haproxy", None, "serve.port"),
    "serve-unbatched": Variant("proxy", 1, "serve.port"),
    # The durable prediction log off (issue 33): against serve-batched / serve-batched-haproxy of the same round.
    "serve-batched-log-off": Variant("proxy", None, "serve.port", log=False),
    "serve-batched-haproxy-log-off": Variant("haproxy", None, "serve.port", log=False),
    # A challenger in shadow: the champion alone, mirroring every request, a quarter of them, and the
    # champion alone without the live evidence store (no drift monitoring in any: its cost is above).
    "shadow-off": Variant("proxy", None, "serve.port", drift=False, shadow=0.0),
    "shadow-on": Variant("proxy", None, "serve.port", drift=False, shadow=1.0),
    "shadow-25": Variant("proxy", None, "serve.port", drift=False, shadow=0.25),
    "shadow-off-haproxy": Variant("haproxy", None, "serve.port", drift=False, shadow=0.0),
    "shadow-on-haproxy": Variant("haproxy", None, "serve.port", drift=False, shadow=1.0),
    "shadow-25-haproxy": Variant("haproxy", None, "serve.port", drift=False, shadow=0.25),
    "no-feedback-haproxy": Variant("haproxy", None, "serve.port", drift=False, shadow=0.0, feedback=False),
    # The model's runtime, behind HAProxy without drift monitoring (ray_jobs.onnx_runtime; the folder
    # needs its exports first: python -m ray_jobs onnx --model <folder> --quantization none|int8).
    "runtime-eager-fp32": Variant("haproxy", None, "serve.port", drift=False, precision="fp32"),
    "runtime-eager-bf16": Variant("haproxy", None, "serve.port", drift=False, precision="bf16"),
    "runtime-onnx-fp32": Variant("haproxy", None, "serve.port", drift=False, runtime="onnx"),
    "runtime-onnx-int8": Variant("haproxy", None, "serve.port", drift=False, runtime="onnx", quantization="int8"),
}
RUNTIME_VARIANTS = [n for n in SERVE_VARIANTS if n.startswith("runtime-")]
# Run by default: the shadow and runtime variants answer questions of their own (--only shadow-off ...).
DEFAULT_VARIANTS = [n for n, v in SERVE_VARIANTS.items() if v.shadow is None and n not in RUNTIME_VARIANTS and v.log]
LOG_PAIRS = {"serve-batched-log-off": "serve-batched", "serve-batched-haproxy-log-off": "serve-batched-haproxy"}


# ------------------------------------------------------------------------------------ load generator
async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one HTTP/1.1 request on a kept-alive connection; read the whole answer. (status, server closes)"""
    writer.write(request)
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed by the server")
    status = int(line.split(b" ", 2)[1])
    length, chunked, close = 0, False, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.partition(b":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif key == b"connection" and value == b"close":
            close = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


async def closed_loop(
    host: str, port: int, path: str, texts: list[str], concurrency: int, seconds: float, max_requests: int
) -> dict:
    """`concurrency` clients on their own kept-alive connections, each sending its next request when the
    last one is answered. A bare asyncio HTTP/1.1 client: a full HTTP library would spend more of the
    shared cores than the servers it measures."""
    bodies = [json.dumps({"text": t}).encode() for t in texts]
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    latencies: list[float] = []
    errors = sent = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal errors, sent
        i, conn = k, None
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                    conn[1].get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                status, close = await asyncio.wait_for(_exchange(*conn, requests[i % len(requests)]), 60)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                if close:
                    conn[1].close()
                    conn = None
            except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            i += concurrency
        if conn is not None:
            conn[1].close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "req_s": len(latencies) / elapsed,
        "p50": pct(0.5),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "errors": errors,
        "n": len(latencies),
        "client_cpu": cpu / elapsed,
        "elapsed": elapsed,
    }


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each process on this machine, by name (Linux /proc; {} elsewhere).
    Taken around a load level, it shows where the cores went: the model process, the replica's HTTP
    and RPC handling, Serve's proxy, the load generator."""
    out: dict[str, float] = {}
    if not os.path.isdir("/proc"):
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"serve_app.model_worker" in a for a in argv):  # a forked one's is one title (fork_server)
            name = "model process"
        elif int(pid) == os.getpid():
            name = "load generator"
        else:
            arg0 = argv[0].decode(errors="replace")
            # Ray names its workers "ray::ServeReplica:<app>:<deployment>", "ray::ProxyActor", ...
            name = (
                "ray::" + arg0[5:].split(":")[0].split(" ")[0]
                if arg0.startswith("ray::")
                else arg0.split(" ")[0].split("/")[-1]
            )
            name = name or stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_shares(before: dict[str, float], after: dict[str, float], seconds: float, top: int = 6) -> dict[str, float]:
    """Cores used per process name between two `cpu_seconds()` readings, the busiest first."""
    used = {k: (v - before.get(k, 0.0)) / seconds for k, v in after.items()}
    return dict(sorted(((k, round(v, 2)) for k, v in used.items() if v >= 0.01), key=lambda kv: -kv[1])[:top])


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_load(host: str, port: int, path: str, texts: list[str], level: int, args) -> dict:
    return run_async(closed_loop(host, port, path, texts, level, args.seconds, args.max_requests))


def show(name: str, level: int, r: dict) -> None:
    print(
        f"{name:>22} c={level:<4} {r['req_s']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f}  p99 "
        f"{r['p99']:7.1f}  "
        f"errors {r['errors']}  mean batch {r['mean_batch']:.1f}  client CPU {r['client_cpu']:.0%}  "
        f"= {r['of_bound']:.0%} of the upper bound ({r['upper_bound']:.0f} req/s around it)"
        + (
            f"; model busy {r['model_busy']:.0%}, forward at {r['forward_of_bound']:.0%} of the bound's speed"
            if "model_busy" in r
            else ""
        )
        + (
            "\n" + " " * 31 + "cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items())
            if r.get("cpu")
            else ""
        ),
        flush=True,
    )


def wait_http(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s")


# ------------------------------------------------------------------------------------ one Serve variant
def serve_variant_main(args) -> int:
    """Child process: one Ray cluster, one Serve app, the concurrency sweep; JSON to args.child_out."""
    import ray
    from ray import serve

    from ray_jobs.deploy import direct_ingress_port
    from serve_app.app import build_app

    name = args.child
    variant = SERVE_VARIANTS[name]
    mbs, access, drift, shadow, feedback = (
        variant.max_batch,
        variant.access,
        variant.drift,
        variant.shadow,
        variant.feedback,
    )
    mbs = mbs or args.max_batch_size
    precision = variant.precision or args.precision
    texts = json.loads(Path(args.child_texts).read_text())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    served = {"serve.model_uri": args.child_model}
    if shadow is not None:
        served = shadow_registry(args.child_model, Path(args.child_out).parent / f"{name}-mlflow", shadow)
    serve.run(
        build_app(
            {
                **served,
                "serve.precision": precision,
                "serve.runtime": variant.runtime,
                "serve.quantization": variant.quantization,
                "serve.max_f1_drop": variant.choice.max_f1_drop,
                "serve.min_label_agreement": variant.choice.min_label_agreement,
                "serve.num_cpus": 1,
                "serve.max_batch_size": mbs,
                "serve.batch_wait_timeout_s": args.batch_wait_ms / 1000 if mbs > 1 else 0.0,
                "serve.max_ongoing_requests": args.max_ongoing_requests or 4 * args.max_batch_size,
                "serve.max_queued_requests": -1,
                "serve.autoscaling.min_replicas": 1,
                "serve.autoscaling.max_replicas": 1,
                "serve.app_name": name,
                "serve.drift.enabled": drift,
                "serve.feedback.enabled": feedback,
                "serve.feedback.log.enabled": variant.log,
                "serve.feedback.log.uri": f"sqlite:///{Path(args.child_out).parent}/{name}-evidence.db",
                "serve.drift.window_size": args.drift_window,
            }
        ),
        name=name,
        route_prefix=f"/{name}",
    )
    port = direct_ingress_port(f"/{name}") if access == "replica" else SERVE_PORT
    wait_http(f"http://127.0.0.1:{port}/{name}/health")
    runtime = json.loads(urlopen(f"http://127.0.0.1:{port}/{name}/model", timeout=30).read())["runtime"]
    if runtime["runtime"] != variant.runtime or runtime["fallback"]:
        raise RuntimeError(f"{name}: the replica serves {runtime}, not {variant.runtime}")
    handle = serve.get_deployment_handle(f"{name}-model", app_name=name)
    out = {}

    # One event loop for the whole sweep: in throughput-optimized mode a handle's router lives in
    # the loop that first uses it.
    bound = UpperBound(args.child_model, texts, precision, args.max_batch_size, variant.choice)
    seen = [0, 0]  # texts mirrored and skipped so far
    logged = [0, 0]  # predictions the durable log has written and dropped so far

    def log_counts() -> dict | None:
        """The store's durable-log counters once nothing waits to be written (the load has stopped)."""
        deadline = time.time() + 60
        while True:
            store = json.loads(urlopen(f"http://127.0.0.1:{port}/{name}/challenger", timeout=30).read())["store"]
            if store["log"] is None or store["log"]["pending"] == 0 or time.time() > deadline:
                return store["log"]
            time.sleep(0.5)

    async def sweep() -> None:
        for level in args.levels:
            before = await handle.batch_stats.remote()
            b0 = bound.measure()  # the replica is idle while the bound is measured
            cpu0 = cpu_seconds()
            r = await closed_loop("127.0.0.1", port, f"/{name}/predict", texts, level, args.seconds, args.max_requests)
            r["cpu"] = cpu_shares(cpu0, cpu_seconds(), r["elapsed"])
            b1 = bound.measure()
            after = await handle.batch_stats.remote()
            items, forward_s = after["items"] - before["items"], after["forward_s"] - before["forward_s"]
            r["mean_batch"] = items / max(1, after["batches"] - before["batches"])
            against_bound(r, b0, b1)
            # The gap to the bound, split in two: the share of the time the model computed at all, and
            # how fast it computed then (texts per forward-second against the bound, which also batches).
            r["model_busy"] = forward_s / r["elapsed"]
            r["forward_of_bound"] = items / max(forward_s, 1e-9) / r["upper_bound"]
            if shadow and feedback:  # how much of the traffic the challenger scored, and how much it had to skip
                live = json.loads(urlopen(f"http://127.0.0.1:{port}/{name}/challenger", timeout=30).read())
                mirrored = live["challenger"]["mirrored"] if live["challenger"] else 0
                r["mirrored"], r["mirror_skipped"] = mirrored - seen[0], live["replica"]["mirror_skipped"] - seen[1]
                seen[:] = [mirrored, live["replica"]["mirror_skipped"]]
            if feedback and variant.log:  # every answered prediction written: counted, not assumed
                counts = await asyncio.to_thread(log_counts)
                r["log_written"], r["log_dropped"] = counts["written"] - logged[0], counts["dropped"] - logged[1]
                logged[:] = [counts["written"], counts["dropped"]]
            out[level] = r
            show(name, level, r)

    run_async(sweep())
    Path(args.child_out).write_text(json.dumps(out))
    ray.shutdown()  # the parent stops the cluster (`ray stop`); Serve goes with it
    return 0


def shadow_registry(model_dir: str, root: Path, mirror: float) -> dict:
    """A registry holding `model_dir` as champion (v1) and, where `mirror` > 0, again as a challenger
    in shadow (v2) that scores `mirror` of the requests: the app arguments that serve it."""
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry, Rollout

    reg = Registry(RegistryConfig(root=str(root), model_name="bench"))
    for run in ("champion", "challenger"):
        reg.register(reg.start_run(run), model_dir, {})
    reg.set_aliases("1", None)
    if mirror > 0:
        reg.set_rollout(Rollout(mode="shadow", version="2", champion="1", mirror=mirror))
    return {"serve.model_uri": "models:/bench@champion", "registry.root": str(root), "registry.model_name": "bench"}


def run_serve_variant(name: str, model_dir: str, texts_file: Path, tmp: Path, args) -> dict[int, dict] | None:
    from ray_jobs.runtime import serve_ingress_env

    env = serve_ingress_env(SERVE_VARIANTS[name].ingress)
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--child-model",
        model_dir,
        "--child-texts",
        str(texts_file),
        "--child-out",
        str(out),
        "--levels",
        *map(str, args.levels),
        "--seconds",
        str(args.seconds),
        "--max-requests",
        str(args.max_requests),
        "--precision",
        args.precision,
        "--max-batch-size",
        str(args.max_batch_size),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--drift-window",
        str(args.drift_window),
        *(["--max-ongoing-requests", str(args.max_ongoing_requests)] if args.max_ongoing_requests else []),
    ]
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    proc = subprocess.run(cmd, env={**clean, **env}, timeout=1800)
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    if proc.returncode != 0 or not out.exists():
        print(f"{name}: failed (exit {proc.returncode}); left out of the table", flush=True)
        return None
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


# ------------------------------------------------------------------------------------ baselines
class UpperBound:
    """The in-process batched forward of the same model, 1 thread, no HTTP: the ceiling for any server.
    These shared machines drift by +-30% within minutes, so it is measured right before and right after
    each load level, and each level is compared with the mean of its two readings."""

    def __init__(self, model_dir: str, texts: list[str], precision: str, batch: int, choice=None):
        import torch

        from ray_jobs.onnx_runtime import EAGER, load_predictor

        torch.set_num_threads(1)
        self.p, runtime = load_predictor(
            model_dir, choice or EAGER, num_threads=1, precision=precision, batch_size=batch
        )
        if runtime["fallback"]:
            raise RuntimeError(f"the upper bound would run eager PyTorch: {runtime['fallback']}")
        self.texts, self.batch = texts, batch
        self.p.predict(texts[:batch])

    def measure(self, seconds: float = 5.0) -> float:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            start = n % len(self.texts)
            self.p.predict(self.texts[start : start + self.batch] or self.texts[: self.batch])
            n += self.batch
        return n / (time.perf_counter() - t0)


def against_bound(r: dict, before: float, after: float) -> dict:
    """A level's result as a share of the upper bound read right before and right after it."""
    r["upper_bound"] = (before + after) / 2
    r["of_bound"] = r["req_s"] / r["upper_bound"]
    return r


def bracketed(bound: UpperBound, load) -> dict:
    before = bound.measure()
    r = load()
    return against_bound(r, before, bound.measure())


def fastapi_per_request(model_dir: str, texts: list[str], tmp: Path, args, bound: UpperBound) -> dict[int, dict]:
    server = tmp / "plain_server.py"
    server.write_text(PLAIN_SERVER.format(root=str(ROOT), model=model_dir, precision=args.precision))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "plain_server:app",
            "--host",
            "127.0.0.1",
            "--port",
            "18081",
            "--log-level",
            "warning",
        ],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(tmp)},
    )
    out = {}
    try:
        wait_http("http://127.0.0.1:18081/health")
        for level in args.levels:
            r = bracketed(bound, lambda level=level: run_load("127.0.0.1", 18081, "/predict", texts, level, args))
            r["mean_batch"] = 1.0
            out[level] = r
            show("fastapi-per-request", level, r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


# ------------------------------------------------------------------------------------ runtimes
def int8_matmul_ceiling(n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """GOP/s of one n x n uint8 x int8 MatMulInteger in ONNX Runtime, 1 thread: the kernel int8 runs on."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [
            helper.make_tensor(
                "b", TensorProto.INT8, [n, n], np.random.randint(-127, 127, (n, n), np.int8).tobytes(), raw=True
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    a = np.random.randint(0, 255, (n, n), np.uint8)
    session.run(None, {"a": a})
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            session.run(None, {"a": a})
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def runtime_rows(results: dict) -> dict[str, dict]:
    """Per runtime variant at 64 clients, medians over rounds: req/s, p99, the in-process bound, and
    req/s as a ratio to eager bf16 in the same round (the machines drift between rounds)."""
    rounds: dict[str, dict[str, dict]] = {}  # round -> variant -> its 64-client result
    for key, per in results.items():
        name, _, round_ = key.partition(" ")
        if name in RUNTIME_VARIANTS and (64 in per or "64" in per):
            rounds.setdefault(round_, {})[name] = per.get(64, per.get("64"))
    rows = {}
    for name in RUNTIME_VARIANTS:
        at64 = [r[name] for r in rounds.values() if name in r]
        if not at64:
            continue
        ratios = [
            r[name]["req_s"] / r["runtime-eager-bf16"]["req_s"]
            for r in rounds.values()
            if name in r and "runtime-eager-bf16" in r
        ]
        rows[name] = {
            "req_s": statistics.median(x["req_s"] for x in at64),
            "vs_eager_bf16": statistics.median(ratios) if ratios else None,
            "p99": statistics.median(x["p99"] for x in at64),
            "bound": statistics.median(x["upper_bound"] for x in at64),
            "rounds": len(at64),
        }
    return rows


def runtime_measurements(model_dir: str, texts: list[str], args) -> dict:
    """What the runtime table sets the served rates beside, measured after the load runs: a 1-thread
    peak per data type (n=2048 matmul), the forward GFLOP per text as the bound pads it, and each
    variant's test F1 and label agreement with eager bf16 on --f1-config's test split."""
    import torch

    from benchmarks.train_profile import forward_flops, matmul_ceiling
    from ray_jobs.inference import Predictor, classification_metrics
    from ray_jobs.model import load_model
    from ray_jobs.onnx_runtime import load_predictor

    torch.set_num_threads(1)
    peaks = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    peaks["int8"] = int8_matmul_ceiling()
    model, _, _ = load_model(model_dir)
    # The bound scores consecutive batches of --max-batch-size texts, each padded to its longest.
    seqs = Predictor(model_dir, precision="fp32").encode(texts[:2000])
    batches = [seqs[i : i + args.max_batch_size] for i in range(0, len(seqs), args.max_batch_size)]
    padded = [(len(b) * max(map(len, b)), max(map(len, b))) for b in batches]
    out = {"peaks_gflops": peaks, "gflop_per_text": forward_flops(model.config, padded) / len(seqs) / 1e9}
    if args.f1_config:
        from ray_jobs.config import load_config
        from ray_jobs.data import load_splits

        split = load_splits(load_config(args.f1_config, args.f1_set).data).test
        torch.set_num_threads(os.cpu_count() or 1)
        accuracy, eager_labels = {}, None
        for name in ["runtime-eager-bf16", *RUNTIME_VARIANTS]:  # eager bf16 first: the others agree with it or not
            variant = SERVE_VARIANTS[name]
            precision = variant.precision or args.precision
            predictor, _ = load_predictor(model_dir, variant.choice, precision=precision, batch_size=64)
            labels = predictor.predict_proba(split.texts).argmax(axis=1)
            eager_labels = labels if eager_labels is None else eager_labels
            accuracy[name] = {
                "test_f1": classification_metrics(split.labels, labels)["f1"],
                "agreement_with_eager_bf16": float((labels == eager_labels).mean()),
                "n": len(split),
            }
        out["accuracy"] = accuracy
    return out


def runtime_table(rows: dict[str, dict], measured: dict) -> str:
    peaks, gflop, accuracy = measured["peaks_gflops"], measured["gflop_per_text"], measured.get("accuracy", {})
    lines = [
        f"peaks, 1 thread, n=2048 matmul (GFLOP/s): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f}, int8 (ONNX "
        f"Runtime MatMulInteger) {peaks['int8']:.0f}; {gflop:.1f} GFLOP per text (forward, padded as the bound pads)",
        "| runtime | req/s at 64 | vs eager bf16 (same round) | p99 ms | bound texts/s | bound GFLOP/s | "
        "of its peak | test F1 | labels as eager bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for name, row in rows.items():
        variant = SERVE_VARIANTS[name]
        dtype = "int8" if variant.quantization == "int8" else "fp32" if variant.runtime == "onnx" else variant.precision
        gflops = row["bound"] * gflop
        acc = accuracy.get(name, {})
        lines.append(
            f"| {name.removeprefix('runtime-')} | {row['req_s']:.1f} | {row['vs_eager_bf16'] or nan:.2f}x | "
            f"{row['p99']:.0f} | {row['bound']:.1f} | {gflops:.0f} | {gflops / peaks[dtype]:.0%} ({dtype}) | "
            f"{acc.get('test_f1', nan):.4f} | {acc.get('agreement_with_eager_bf16', nan):.2%} |"
        )
    return "\n".join(lines)


def load_texts(args) -> list[str]:
    if args.data:
        from ray_jobs.data import load_file

        texts = load_file(args.data, text_column=args.text_column).texts
    else:
        from ray_jobs.data import generate_reviews

        texts = generate_reviews(4000, seed=11).texts
    # Distinct texts: no cache anywhere can answer a repeat.
    return [f"{t} (#{i})" for i, t in enumerate(texts)]


def spread(results: dict[str, dict[int, dict]]) -> None:
    """Each variant's share of the bound over its rounds, per level: min / median / max (a single round
    moves by +-10 points on a 2-core machine, so one number says little)."""
    by: dict[tuple[str, int], list[float]] = {}
    for key, per in results.items():
        variant = key.partition(" ")[0]
        for level, r in per.items():
            by.setdefault((variant, level), []).append(r["of_bound"])
    per_request = results.get("fastapi-per-request", {})
    for (variant, level), shares in by.items():
        if len(shares) > 1:
            s = sorted(shares)
            print(
                f"{level} clients, {variant}: {s[len(s) // 2]:.0%} of the bound, median of {len(s)} rounds "
                f"(min {s[0]:.0%}, max {s[-1]:.0%})"
            )
            if level in per_request and variant != "fastapi-per-request":
                x = sorted(
                    per[level]["req_s"] / per_request[level]["req_s"]
                    for key, per in results.items()
                    if key.partition(" ")[0] == variant and level in per
                )
                print(f"  {x[len(x) // 2]:.2f}x the per-request server (median; min {x[0]:.2f}x, max {x[-1]:.2f}x)")


def log_cost(results: dict[str, dict[int, dict]]) -> None:
    """The durable log's cost: each variant with the log against the same variant without it, per round
    (same run, alternating), and whether every answered request was written."""
    for off_name, on_name in LOG_PAIRS.items():
        ratios: dict[int, list[float]] = {}
        for key, per in results.items():
            variant, _, round_ = key.partition(" ")
            on = results.get(f"{on_name} {round_}".strip()) if variant == off_name else None
            for level, r in (on or {}).items():
                base = per.get(level)
                if base:
                    ratios.setdefault(level, []).append(r["req_s"] / base["req_s"])
                    print(
                        f"{level} clients, {on_name} {round_}: {r['req_s']:.1f} req/s with the log vs "
                        f"{base['req_s']:.1f} without ({r['req_s'] / base['req_s']:.3f}x); answered {r['n']}, "
                        f"written {r.get('log_written', '-')}, dropped {r.get('log_dropped', '-')}"
                    )
        for level, rs in sorted(ratios.items()):
            rs = sorted(rs)
            print(
                f"{level} clients, {on_name} with the log / without: median {rs[len(rs) // 2]:.3f}x "
                f"(min {rs[0]:.3f}, max {rs[-1]:.3f}, {len(rs)} rounds)"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--max-requests", type=int, default=5000, help="per concurrency level")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="per replica, the same for every Serve variant "
        "(default: the app's default for the batched one, 4 x max batch size)",
    )
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--model", help="serve this model folder (default: the untrained backbone at --max-length)")
    ap.add_argument("--drift-window", type=int, default=500, help="serve.drift.window_size where monitoring is on")
    ap.add_argument("--rounds", type=int, default=1, help="run the Serve variants this many times, alternating")
    ap.add_argument("--data", help="texts to send (a labelled .parquet/.csv/.jsonl); default: synthetic reviews")
    ap.add_argument("--text-column", default="text")
    ap.add_argument(
        "--only", nargs="+", choices=[*SERVE_VARIANTS, "fastapi-per-request"], help="run these servers only"
    )
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--f1-config", help="runtime variants: score each on this config's test split (its F1)")
    ap.add_argument("--f1-set", nargs="*", default=[], help="KEY=VALUE overrides of --f1-config (data.path=...)")
    ap.add_argument("--table-from", help="print the runtime table of a saved --out file and exit")
    for hidden in ("--child", "--child-model", "--child-texts", "--child-out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return serve_variant_main(args)
    if args.table_from:  # the runtime table of a saved run (its --out file), nothing measured
        saved = json.loads(Path(args.table_from).read_text())
        print(runtime_table(runtime_rows(saved["results"]), saved["runtimes"]))
        return 0

    from ray_jobs.config import ModelConfig
    from ray_jobs.model import build_model, save_model

    tmp = Path(tempfile.mkdtemp())
    if args.model:
        model_dir = str(Path(args.model).resolve())
    else:
        model, tok = build_model(ModelConfig(source="bert", name="minilm"))
        meta = {"max_length": args.max_length, "truncation": "head_tail"}
        model_dir = str(save_model(model, tok, tmp / "model", meta))
    texts = load_texts(args)
    texts_file = tmp / "texts.json"
    texts_file.write_text(json.dumps(texts))
    print(
        f"model: {args.model or f'384-wide 6-layer DistilBERT, max_length {args.max_length}'}, "
        f"precision {args.precision}; "
        f"{len(texts)} distinct texts from {args.data or 'the synthetic generator'}; each server 1 core of "
        f"{os.cpu_count()}",
        flush=True,
    )

    wanted = args.only or [*DEFAULT_VARIANTS, "fastapi-per-request"]
    results: dict[str, dict[int, dict]] = {}
    for round_ in range(1, args.rounds + 1):
        for name in SERVE_VARIANTS:
            if name in wanted:
                r = run_serve_variant(name, model_dir, texts_file, tmp, args)
                if r:
                    results[name if args.rounds == 1 else f"{name} #{round_}"] = r
    if "fastapi-per-request" in wanted:
        bound = UpperBound(model_dir, texts, args.precision, args.max_batch_size)
        results["fastapi-per-request"] = fastapi_per_request(model_dir, texts, tmp, args, bound)
    print()
    print(
        "| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | upper bound around it | "
        "of bound |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, per in results.items():
        for level, r in per.items():
            print(
                f"| {name} | {level} | {r['req_s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
                f"{r['errors']} | "
                f"{r['mean_batch']:.1f} | {r['upper_bound']:.0f} | {r['of_bound']:.0%} |"
            )
    base = results.get("fastapi-per-request", {}).get(64)
    for name in ("serve-default", "serve-batched", "serve-batched-direct", "serve-batched-haproxy"):
        b = results.get(name, {}).get(64)
        if b:
            vs = (
                f"{b['req_s'] / base['req_s']:.2f}x the per-request server "
                f"({b['of_bound'] / base['of_bound']:.2f}x in share of the bound), "
                if base
                else ""
            )
            print(
                f"at 64 clients, {name}: {vs}{b['of_bound']:.0%} of the in-process upper bound, p99 {b['p99']:.0f} ms"
            )
    for name, per in results.items():  # each shadow variant against the champion alone of its round
        variant, _, round_ = name.partition(" ")
        # The per-request server is no Serve variant: it has no shadow to compare (it crashed here, issue 31).
        if variant not in SERVE_VARIANTS or SERVE_VARIANTS[variant].shadow is None or variant.startswith("shadow-off"):
            continue
        off = results.get(f"shadow-off{'-haproxy' if variant.endswith('-haproxy') else ''} {round_}".strip(), {})
        for level, r in per.items():
            base = off.get(level)
            if base:
                print(
                    f"{level} clients, {name}: {r['of_bound'] / base['of_bound']:.2f}x the champion-alone share of "
                    f"the bound ({r['req_s']:.1f} vs {base['req_s']:.1f} req/s), p50 {r['p50']:.0f} vs "
                    f"{base['p50']:.0f} ms, p99 {r['p99']:.0f} vs {base['p99']:.0f} ms, errors {r['errors']}; "
                    f"mirrored {r.get('mirrored', '-')}, skipped {r.get('mirror_skipped', '-')}"
                )
    spread(results)
    log_cost(results)
    runtimes = None
    if any(k.split(" ")[0] in RUNTIME_VARIANTS for k in results):
        runtimes = runtime_measurements(model_dir, texts, args)
        print("\n" + runtime_table(runtime_rows(results), runtimes))
    if args.out:
        out = {"machine": f"{os.cpu_count()} CPUs", "results": results, "runtimes": runtimes}
        Path(args.out).write_text(json.dumps(out, indent=1))
        from figures import render  # benchmarks/figures.py: req/s, p99 and share of the bound per variant

        print(f"figure: {render(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

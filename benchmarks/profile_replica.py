"""Where the serving processes spend their CPU under load (issue 31): the default app (drift monitoring and the
live evidence store with its durable log on) under a closed-loop load, with py-spy sampling the replica actor,
Serve's HTTP proxy and the Serve controller at once, in the ingress mode of --ingress (default `auto`, the
project's default: HAProxy where it is installed; `proxy`: Serve's Python proxy). Prints, per process, its
cores used (HAProxy's too: a C program py-spy cannot sample) and the functions its samples were in (self
time) and the project's and libraries' shares (inclusive), and writes them as JSON.

    pip install py-spy      # not a dependency of the project
    python benchmarks/profile_replica.py --ingress proxy --clients 64 --seconds 20 \
        --out benchmarks/results/profile_replica_proxy.json
    python benchmarks/profile_replica.py --clients 64 --seconds 20 --out benchmarks/results/profile_replica_auto.json

py-spy samples only threads that are running (not idle), 100 times a second, without pausing the process
(--nonblocking), so a process's samples are its CPU time. Run it on an otherwise idle machine: the absolute
numbers move with contention; the shares within a process much less.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import SERVE_PORT, closed_loop, cpu_seconds, cpu_shares, wait_http  # noqa: E402

# Inclusive shares: a sample counts for every group one of its frames belongs to (py-spy names frames
# `function (path/relative/to/site-packages.py:line)`).
GROUPS = {
    "serve_app (the project's replica code)": "(serve_app/",
    "ray_jobs (the project's library)": "(ray_jobs/",
    "ray serve": "(ray/serve/",
    "an actor call (ActorHandle._actor_method_call)": "ActorHandle._actor_method_call",
    "ray metrics (Metric._record)": "(ray/util/metrics.py",
    "starlette / fastapi": ("(starlette/", "(fastapi/"),
    "uvicorn / h11 (HTTP parsing)": ("(uvicorn/", "(h11/", "(httptools/"),
    "pydantic": "(pydantic",
    "json": "(json/",
}


def actor_pids(app: str) -> dict[str, int]:
    """The processes by their titles (Ray names a worker `ray::<actor class>`; no dashboard needed)."""
    import os

    wanted = {f"ray::ServeReplica:{app}:{app}-model": "replica", "ray::ProxyActor": "proxy"}
    wanted["ray::ServeController"] = "controller"
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        for prefix, name in wanted.items():
            if title.startswith(prefix):
                out[name] = int(pid)
    return out


def summarize(raw: Path, top: int) -> dict:
    """py-spy's raw (collapsed) output: 'frame;frame;... count' lines, root first."""
    total = 0
    leaf: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    callers: collections.Counter = collections.Counter()  # the project's frame that made an actor call
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for group, marks in GROUPS.items():
            marks = (marks,) if isinstance(marks, str) else marks
            if any(m in f for f in frames for m in marks):
                groups[group] += n
        calls = [i for i, f in enumerate(frames) if "ActorHandle._actor_method_call" in f]
        if calls:
            ours = [f for f in frames[: calls[0]] if "(serve_app/" in f or "(ray_jobs/" in f]
            callers[ours[-1] if ours else "(no project frame: Ray's own)"] += n
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in leaf.most_common(top)] if total else [],
        "inclusive": {g: n / total for g, n in groups.most_common()} if total else {},
        "actor_calls_by": [(f, n / total) for f, n in callers.most_common(top)] if total else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--ingress", choices=["auto", "proxy", "direct", "haproxy"], default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")

    import ray
    from ray import serve

    from ray_jobs.config import ModelConfig
    from ray_jobs.data import generate_reviews
    from ray_jobs.model import build_model, save_model
    from ray_jobs.runtime import apply_serve_ingress, resolve_serve_ingress
    from serve_app.app import build_app

    tmp = Path(tempfile.mkdtemp())
    model, tok = build_model(ModelConfig(source="bert", name="minilm"))
    model_dir = str(save_model(model, tok, tmp / "model", {"max_length": args.max_length, "truncation": "head_tail"}))
    texts = [f"{t} (#{i})" for i, t in enumerate(generate_reviews(4000, seed=11).texts)]
    app = "profiled"
    apply_serve_ingress(args.ingress)  # read by the cluster ray.init starts below
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(
        build_app(
            {
                "serve.model_uri": model_dir,
                "registry.root": str(tmp / "mlflow"),
                "serve.num_cpus": 1,
                "serve.max_queued_requests": -1,
                "serve.autoscaling.min_replicas": 1,
                "serve.autoscaling.max_replicas": 1,
                "serve.app_name": app,
            }
        ),
        name=app,
        route_prefix=f"/{app}",
    )
    wait_http(f"http://127.0.0.1:{SERVE_PORT}/{app}/health")
    pids = actor_pids(app)
    ingress = resolve_serve_ingress(args.ingress)
    print(f"ingress {ingress}: profiling {pids} under {args.clients} clients for {args.seconds:g} s", flush=True)

    result: dict = {}
    done = threading.Event()

    def load() -> None:
        seconds = args.warmup + args.seconds + 3
        r = asyncio.run(closed_loop("127.0.0.1", SERVE_PORT, f"/{app}/predict", texts, args.clients, seconds, 10**9))
        result["load"] = r
        done.set()

    threading.Thread(target=load, daemon=True).start()
    time.sleep(args.warmup)
    cpu0 = cpu_seconds()
    spies = {
        name: subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(args.seconds)),
                "-r",
                "100",
                "--nonblocking",
                "-f",
                "raw",
                "-o",
                str(tmp / f"{name}.txt"),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name, pid in pids.items()
    }
    t0 = time.time()
    for name, p in spies.items():
        _, err = p.communicate()
        if p.returncode != 0:
            print(f"py-spy on {name} failed: {err.decode()[-400:]}", file=sys.stderr)
    cores = cpu_shares(cpu0, cpu_seconds(), time.time() - t0, top=8)
    done.wait()
    out = {"ingress": ingress, "clients": args.clients, "seconds": args.seconds, "cores": cores}
    out.update({"load": result["load"], "processes": {}})
    print(f"\n{result['load']['req_s']:.1f} req/s, errors {result['load']['errors']}; cores used: {cores}")
    for name in pids:
        path = tmp / f"{name}.txt"
        if not path.exists():
            continue
        s = summarize(path, args.top)
        out["processes"][name] = s
        print(f"\n== {name}: {s['samples']} samples")
        for group, share in s["inclusive"].items():
            print(f"   {share:6.1%}  {group}")
        print("   -- self time, top functions:")
        for frame, share in s["self"]:
            print(f"   {share:6.1%}  {frame[:150]}")
        if s["actor_calls_by"]:
            print("   -- actor calls, by the project's frame that made them:")
            for frame, share in s["actor_calls_by"]:
                print(f"   {share:6.1%}  {frame[:150]}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

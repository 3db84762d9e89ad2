"""Serving load test on loopback: a closed-loop HTTP load generator (bounded in requests and time) that
sweeps concurrency against, in one run and on the same model:
  1. the Ray Serve app with dynamic batching,
  2. the same app with batching off (max batch 1),
  3. a plain one-process FastAPI server running the model per request (the seed's design),
and next to them the in-process batched forward of the same model (the upper bound, no HTTP).

    python benchmarks/serve_load.py                          # synthetic reviews, 128-token model
    python benchmarks/serve_load.py --levels 1 8 32 64 128 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from ray_jobs.config import ModelConfig  # noqa: E402
from ray_jobs.data import generate_reviews  # noqa: E402

PLAIN_SERVER = '''
import sys, torch
from fastapi import FastAPI
from pydantic import BaseModel
sys.path.insert(0, {root!r})
from serve_app.predictor import Predictor
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
'''


async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal errors, sent
            i = k
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json={"text": texts[i % len(texts)]})
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"req_s": len(latencies) / elapsed, "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "errors": errors, "n": len(latencies)}


def batch_stats(metrics_port: int, app: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram on Ray's Prometheus endpoint. One app runs at a
    time, so all series are summed (`app` is kept for the call sites' readability)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("ray_sentiment_batch_size_sum"):
            s += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_sentiment_batch_size_count"):
            c += float(line.rsplit(" ", 1)[1])
    return s, c


def in_process_upper_bound(model_dir: str, texts: list[str], precision: str, batch: int = 32) -> float:
    import torch

    from serve_app.predictor import Predictor

    torch.set_num_threads(1)
    p = Predictor(model_dir, num_threads=1, precision=precision, batch_size=batch)
    p.predict(texts[:batch])
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 10:
        p.predict(texts[n % len(texts): n % len(texts) + batch] or texts[:batch])
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--max-requests", type=int, default=5000, help="per concurrency level")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max-batch-size", type=int, default=32)
    args = ap.parse_args()

    import ray
    from ray import serve

    from ray_jobs.model import build_model, save_model
    from serve_app.app import build_app

    tmp = Path(tempfile.mkdtemp())
    model, tok = build_model(ModelConfig(source="bert", name="minilm"))
    model_dir = str(save_model(model, tok, tmp / "model", {"max_length": 128, "truncation": "head_tail"}))
    texts = [f"{t} (#{i})" for i, t in enumerate(generate_reviews(4000, seed=11).texts)]
    print(f"model: 384-wide 6-layer DistilBERT, max_length 128, precision {args.precision}; one replica = 1 CPU; 2 cores in all", flush=True)

    upper = in_process_upper_bound(model_dir, texts, args.precision, args.max_batch_size)
    print(f"in-process batched forward (batch {args.max_batch_size}, 1 thread): {upper:.1f} req/s", flush=True)

    metrics_port = 18090
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    port = 18080
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, dict[int, dict]] = {}
    variants = {"serve-batched": args.max_batch_size, "serve-unbatched": 1}
    for name, mbs in variants.items():
        serve.run(build_app({"model_uri": model_dir, "precision": args.precision, "num_cpus": 1, "max_batch_size": mbs,
                             "batch_wait_timeout_s": 0.005 if mbs > 1 else 0.0, "max_ongoing_requests": max(2 * mbs, 8),
                             "max_queued_requests": -1, "min_replicas": 1, "max_replicas": 1, "name": name}),
                  name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{port}/{name}/predict"
        results[name] = {}
        for level in args.levels:
            before = batch_stats(metrics_port, name)
            r = asyncio.run(closed_loop(url, texts, level, args.seconds, args.max_requests))
            time.sleep(11)  # Ray exports metrics every ~10 s
            after = batch_stats(metrics_port, name)
            r["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            results[name][level] = r
            print(f"{name:>16} c={level:<4} {r['req_s']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f}  p99 {r['p99']:7.1f}  "
                  f"errors {r['errors']}  mean batch {r['mean_batch']:.1f}", flush=True)
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()

    # The seed's design: one uvicorn process, the model run per request.
    server = tmp / "plain_server.py"
    server.write_text(PLAIN_SERVER.format(root=str(Path(__file__).resolve().parents[1]), model=model_dir, precision=args.precision))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "plain_server:app", "--host", "127.0.0.1", "--port", "18081", "--log-level", "warning"],
                            cwd=tmp, env={**os.environ, "PYTHONPATH": str(tmp)})
    try:
        for _ in range(120):
            try:
                if httpx.get("http://127.0.0.1:18081/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        results["fastapi-per-request"] = {}
        for level in args.levels:
            r = asyncio.run(closed_loop("http://127.0.0.1:18081/predict", texts, level, args.seconds, args.max_requests))
            r["mean_batch"] = 1.0
            results["fastapi-per-request"][level] = r
            print(f"{'fastapi-per-request':>16} c={level:<4} {r['req_s']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f}  "
                  f"p99 {r['p99']:7.1f}  errors {r['errors']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\nin-process upper bound: {upper:.1f} req/s\n")
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |\n|---|---|---|---|---|---|---|---|")
    for name, per in results.items():
        for level, r in per.items():
            print(f"| {name} | {level} | {r['req_s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['errors']} | {r['mean_batch']:.1f} |")
    if 64 in results["serve-batched"]:
        b, f = results["serve-batched"][64], results["fastapi-per-request"][64]
        print(f"\nat 64 clients: batched Serve = {b['req_s'] / f['req_s']:.2f}x the per-request server, "
              f"{b['req_s'] / upper:.0%} of the in-process upper bound, p99 {b['p99']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a model process's start costs, started the plain way (`python -m serve_app.model_worker`) and
forked from the fork server (serve_app.fork_server), side by side in one run, alternating:

- seconds from asking to a process that answers (ModelWorker returns once the model is loaded, warmed up
  and its speed measured);
- CPU seconds of that process to get there (from /proc; a forked one's imports were paid once by the
  server, whose own start is reported apart);
- seconds from SIGKILL of a replica's model process to the first batch answered by its replacement
  (serve_app.supervised_model.SupervisedModel, as a replica runs it): the window in which a replica
  with one model process has no model.

    python benchmarks/model_start.py --model-dir DIR [--rounds 5] [--out benchmarks/results/model_start.json]

Without --model-dir it builds the tests' untrained tiny model in a temporary folder (DistilBERT, 2
layers of 128): the imports then dominate a plain start, which is the point being measured; a larger
model adds the same load time to both.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def tiny_model(folder: Path) -> str:
    from ray_jobs.config import load_config
    from ray_jobs.model import build_model, save_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "tune_configs/quickstart.yaml", ["model.source=tiny"])
    model, tok = build_model(cfg.model, seed=1)
    return str(save_model(model, tok, folder / "tiny", {"max_length": 64, "truncation": "head_tail"}))


def one_start(model_dir: str, fork: bool) -> dict:
    from serve_app.model_worker import ModelWorker

    start = time.perf_counter()
    worker = ModelWorker(model_dir, num_threads=1, precision="fp32", fork_server=fork)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(worker.pid)
    worker.close()
    return {"seconds": seconds, "cpu_seconds": cpu}


def one_restart(model_dir: str, fork: bool) -> float:
    """Seconds from SIGKILL of the model process to the first batch its replacement answers."""
    from serve_app.model_worker import ModelWorker
    from serve_app.supervised_model import SupervisedModel

    async def run() -> float:
        model = await SupervisedModel.create(
            functools.partial(ModelWorker, model_dir, num_threads=1, precision="fp32", fork_server=fork)
        )
        try:
            await model.run(["warm"])
            killed = time.perf_counter()
            os.kill(model.worker.pid, signal.SIGKILL)
            await model.run(["a batch sent the moment its process died"])
            return time.perf_counter() - killed
        finally:
            await asyncio.to_thread(model.close)

    return asyncio.run(run())


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="a saved model folder (default: the tests' untrained tiny model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from serve_app import fork_server

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or tiny_model(Path(tmp))
        # A server of this run's own: its first start (the imports, once) is measured, not inherited.
        os.environ[fork_server.DIR_ENV] = str(Path(tmp) / "sockets")
        first = one_start(model_dir, fork=True)
        server_pid = None
        results: dict[str, dict[str, list[float]]] = {
            mode: {"seconds": [], "cpu_seconds": [], "restart_seconds": []} for mode in ("plain", "fork")
        }
        for r in range(args.rounds):
            for mode in ("plain", "fork") if r % 2 == 0 else ("fork", "plain"):
                got = one_start(model_dir, fork=mode == "fork")
                results[mode]["seconds"].append(got["seconds"])
                results[mode]["cpu_seconds"].append(got["cpu_seconds"])
                results[mode]["restart_seconds"].append(one_restart(model_dir, fork=mode == "fork"))
                print(
                    f"round {r + 1} {mode:5s} start {got['seconds']:.2f}s ({got['cpu_seconds']:.2f} CPU-s), "
                    f"kill to answer {results[mode]['restart_seconds'][-1]:.2f}s",
                    flush=True,
                )
        for pid in filter(str.isdigit, os.listdir("/proc")):  # stop this run's server
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(Path(tmp) / "sockets").encode() in f.read():
                        server_pid = int(pid)
                        os.kill(server_pid, signal.SIGKILL)
            except OSError:
                continue

    summary = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "model_dir": args.model_dir or "the tests' untrained tiny model",
        "rounds": args.rounds,
        "first_forked_start_with_server_start": first,
        **{mode: {k: spread(v) for k, v in results[mode].items()} for mode in results},
        "raw": results,
    }
    summary["ratio_median_start_plain_over_fork"] = (
        summary["plain"]["seconds"]["median"] / summary["fork"]["seconds"]["median"]
    )
    summary["ratio_median_restart_plain_over_fork"] = (
        summary["plain"]["restart_seconds"]["median"] / summary["fork"]["restart_seconds"]["median"]
    )
    for mode in ("plain", "fork"):
        s = summary[mode]
        print(
            f"{mode:5s} start median {s['seconds']['median']:.2f}s ({s['cpu_seconds']['median']:.2f} CPU-s), "
            f"kill to answer median {s['restart_seconds']['median']:.2f}s"
        )
    print(f"first forked start, the server's imports included: {first['seconds']:.2f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

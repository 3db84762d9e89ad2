"""Data at scale (issue 34): the same training job on growing corpora, on a local cluster of a head and two
worker nodes whose object stores are capped below the largest corpus, reporting what grows with the data:

- driver peak RSS (VmHWM of the `python -m ray_jobs train` process),
- object-store peak (the nodes' plasma usage, summed, from their Prometheus metrics),
- time to the first training step (from the job's start to the first "step" log line of rank 0),
- tokenization: throughput (texts/s on one CPU, measured here on the corpus's own texts), what it would
  cost each trial if each worker tokenized its own half, and what the run's one Ray Data tokenization
  took (`tokenize_once_s`, from its log line; absent where the workers tokenize),
- training samples/s (what the run reports) and the exit code, with the error's last lines on a failure.

    python benchmarks/data_scale.py --out benchmarks/results/data_scale.json                # synthetic reviews
    python benchmarks/data_scale.py --data ../shared/data/imdb/train.parquet --sizes 25000 250000 \\
        --out benchmarks/results/data_scale_imdb.json

Corpora above the source's size repeat it with a marker ("[copy k] ") in front of each copy's texts, so
that every text is distinct and the copies can be counted. The model is the tiny one (model.source=tiny):
what is measured is the data path, not the model's speed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos import cluster_env, free_port, start_head, start_worker, stop_head  # noqa: E402

STEP_LINE = re.compile(r"epoch \d+ step 1/\d+")
TOKENIZED_LINE = re.compile(r"tokenized (\d+) texts once .* in ([\d.]+)s")  # ray_jobs.ingest, once per run
SPLIT_LINE = re.compile(r"split on the cluster in ([\d.]+)s")  # ray_jobs.ingest.stream_splits (data.split=content)


def write_corpus(source: str | None, n: int, path: Path) -> dict:
    """`n` labelled reviews in `path` (parquet), written one copy of the source at a time: this process
    never holds more than one copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_jobs.data import generate_reviews, load_file

    base = load_file(source) if source else generate_reviews(25_000, seed=0)
    writer, written, copy = None, 0, 0
    while written < n:
        take = min(len(base), n - written)
        prefix = f"[copy {copy}] " if copy else ""
        table = pa.table({"text": [prefix + t for t in base.texts[:take]], "label": base.labels[:take]})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        written, copy = written + take, copy + 1
    writer.close()
    return {"rows": n, "copies": copy, "bytes": path.stat().st_size, "source": source or "synthetic"}


def tokenization_rate(path: Path, n: int = 4000) -> float:
    """Texts per second on one CPU: the tiny model's tokenizer and ray_jobs.data.encode, as the workers run it."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU: the workers' own setting
    import pyarrow.parquet as pq

    from ray_jobs.config import load_config
    from ray_jobs.data import encode
    from ray_jobs.model import build_model

    texts = pq.ParquetFile(path).read_row_group(0).column("text").to_pylist()[:n]
    cfg = load_config(ROOT / "tune_configs/quickstart.yaml", ["model.source=tiny", "model.max_length=128"])
    _, tok = build_model(cfg.model)
    t0 = time.perf_counter()
    encode(tok, texts, cfg.model.max_length)
    return len(texts) / (time.perf_counter() - t0)


def plasma_bytes(metrics_ports: list[int]) -> float:
    """Bytes in the nodes' object stores (shared memory plus the fallback allocation), from their metrics."""
    import httpx

    total = 0.0
    for port in metrics_ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith("ray_object_store_memory{") and 'Location="SPILLED"' not in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


class Sampler(threading.Thread):
    """Every `period_s`: the driver's peak RSS (VmHWM) and the object stores' usage; keeps the peaks."""

    def __init__(self, pid: int, metrics_ports: list[int], period_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.ports, self.period_s = pid, metrics_ports, period_s
        self.driver_peak_rss = 0
        self.store_peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
                self.driver_peak_rss = max(self.driver_peak_rss, hwm)
            except (OSError, AttributeError):
                pass
            self.store_peak = max(self.store_peak, plasma_bytes(self.ports))
            self.done.wait(self.period_s)


def run_job(env: dict, gcs: int, corpus: Path, work: Path, args, metrics_ports: list[int]) -> dict:
    """One `train` job (two workers, one per worker node), or with --trials N a `tune` search of N
    one-worker trials, two at a time: `trial_first_steps_s` then says when each trial's first step came."""
    sets = [
        "model.source=tiny",
        "model.max_length=128",
        "data.source=file",
        f"data.path={corpus}",
        f"data.split={args.split}",
        "data.val_fraction=0.01",
        "data.test_fraction=0.01",
        f"ray.address=127.0.0.1:{gcs}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.resources_per_worker={trainer: 1}",
        "train.epochs=1",
        "train.batch_size=32",
        "train.precision=fp32",
        f"train.time_budget_s={args.train_seconds}",
        "train.log_every_steps=1",
        f"train.storage_path={work}/ray",
    ]
    command = "train"
    if args.trials:
        command = "tune"
        sets += [
            "train.num_workers=1",
            f"tune.num_samples={args.trials}",
            "tune.max_concurrent_trials=2",
            "tune.scheduler=none",
            "tune.search_space={}",
            f"tune.storage_path={work}/tune",
        ]
    cmd = [sys.executable, "-m", "ray_jobs", command, "--config", str(ROOT / "tune_configs/quickstart.yaml")]
    cmd += [x for kv in sets for x in ("--set", kv)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, metrics_ports)
    sampler.start()
    first_steps, tokenized, split_s, tail = [], None, None, []
    for line in proc.stdout:
        if STEP_LINE.search(line):
            first_steps.append(round(time.time() - t0, 1))
        if tokenized is None and (m := TOKENIZED_LINE.search(line)):
            tokenized = float(m.group(2))
        if split_s is None and (m := SPLIT_LINE.search(line)):
            split_s = float(m.group(1))
        tail = (tail + [line.rstrip()])[-40:]
        if args.verbose:
            print(line, end="")
    code = proc.wait()
    sampler.done.set()
    sampler.join()
    out = {
        "exit_code": code,
        "wall_s": round(time.time() - t0, 1),
        "driver_peak_rss_mb": round(sampler.driver_peak_rss / 2**20, 1),
        "object_store_peak_mb": round(sampler.store_peak / 2**20, 1),
        "first_step_s": first_steps[0] if first_steps else None,
        # Once per run (Ray Data map tasks), or None where each worker tokenizes its own shard in each trial.
        "tokenize_once_s": tokenized,
        # data.split=content: counting, placing and digesting the corpus on the cluster, before tokenizing.
        "split_on_cluster_s": split_s,
    }
    # The command prints the best checkpoint's folder; Ray's own shutdown lines may follow it.
    checkpoint = next((line for line in reversed(tail) if line.startswith("/") and Path(line).is_dir()), None)
    if code == 0 and checkpoint and Path(checkpoint, "sentiment_meta.json").is_file():
        metrics = json.loads(Path(checkpoint, "sentiment_meta.json").read_text())["metrics"]
        out["train_samples_per_s"] = round(metrics["train_samples_per_s"], 1)
        out["steps"] = metrics["step"]
    if args.trials:
        out["trial_first_steps_s"] = first_steps
    if code != 0:
        out["error_tail"] = tail[-15:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="a labelled parquet file to grow the corpora from (default: synthetic reviews)")
    p.add_argument("--sizes", type=int, nargs="+", default=[25_000, 250_000, 2_500_000])
    p.add_argument("--store-mb", type=int, default=300, help="object store of each node, in MiB")
    p.add_argument("--train-seconds", type=float, default=20, help="each run's time budget (train.time_budget_s)")
    p.add_argument(
        "--split",
        choices=["content", "seeded"],
        default="content",
        help="data.split: content builds the splits on the cluster; seeded on the driver (as before issue 34)",
    )
    p.add_argument("--trials", type=int, default=0, help="run a search of this many one-worker trials instead")
    p.add_argument("--work", default="/tmp/data_scale", help="corpora and checkpoints go here")
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true", help="print the jobs' output")
    p.add_argument("--label", default="this run", help="this run's name in the figure")
    p.add_argument("--compare", help="another run's JSON (e.g. of the code before a change), drawn beside this one")
    args = p.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = cluster_env("proxy")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["RAY_metrics_report_interval_ms"] = "1000"  # the sampler reads the stores' usage every 0.5 s
    env["RAY_DEDUP_LOGS"] = "0"  # trials of one search log the same first step: each line counts
    store = [f"--object-store-memory={args.store_mb * 2**20}"]
    ports = [free_port() for _ in range(3)]
    head, gcs, head_temp = start_head(env, 1, extra_args=[*store, f"--metrics-export-port={ports[0]}"])
    nodes = [(head, head_temp)]
    results: dict = {"args": vars(args), "machine": f"{_cpus()} CPUs", "label": args.label, "sizes": {}}
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        results["compare"] = {"label": other.get("label", args.compare), "sizes": other["sizes"]}
    try:
        for port in ports[1:]:
            metrics = f"--metrics-export-port={port}"
            nodes.append(start_worker(env, gcs, 1, {"trainer": 1}, str(work), extra_args=[*store, metrics]))
        for n in args.sizes:
            corpus = work / f"reviews_{n}.parquet"
            info = write_corpus(args.data, n, corpus)
            info["tokenize_texts_per_s_per_cpu"] = round(tokenization_rate(corpus), 1)
            train_n = n - round(n * 0.01) - round(n * 0.01)
            # What tokenizing in the workers costs each trial: each of the 2 workers its half, side by side.
            info["tokenize_s_in_workers"] = round(train_n / 2 / info["tokenize_texts_per_s_per_cpu"], 1)
            print(f"{n} reviews ({info['bytes'] / 2**20:.0f} MiB parquet): training ...", flush=True)
            info.update(run_job(env, gcs, corpus, work / f"run_{n}", args, ports))
            print(json.dumps(info), flush=True)
            results["sizes"][str(n)] = info
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        for node, temp in reversed(nodes):
            stop_head(node, temp, graceful=False)
    from figures import render  # benchmarks/figures.py

    print(f"figure: {render(args.out)}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())

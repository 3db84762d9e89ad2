"""Faithfulness and latency of /explain's word attributions (integrated gradients, ray_jobs.explain).

    python benchmarks/explain.py --model <model folder> --data ../shared/data/imdb/train.parquet \
        [--n 100] [--k 5 10] [--n-steps 20] [--latency-lengths 128 512] [--out results.json]

Faithfulness (deletion test): for each of N reviews, the predicted class's probability before and
after deleting the k words with the highest attribution, against deleting k words drawn at random
(same review, same k; averaged over 3 draws). Attribution that points at what the model uses drops
the probability far more than random deletion. Reviews are cut to the words the model sees (its
max_length), so that deleting a word past the truncation cannot count as a non-effect.

Latency: POST /explain over HTTP to a Serve app (the project's own, `serve_app.app:build_app`, with
the model folder as serve.model_uri) for texts of 128 and 512 tokens, one request at a time: p50 and
p95, next to /predict for the same texts. The model's max_length applies: a 512-token text needs a
model trained with max_length 512 (tune_configs/imdb_cpu.yaml).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.data import load_file  # noqa: E402
from ray_jobs.explain import Explainer  # noqa: E402


def delete_words(text: str, words: list[dict]) -> str:
    """`text` without the character spans of `words`."""
    out, at = [], 0
    for w in sorted(words, key=lambda w: w["start"]):
        out.append(text[at : w["start"]])
        at = w["end"]
    out.append(text[at:])
    return "".join(out)


def seen_part(explainer: Explainer, text: str) -> str:
    """The review cut at the last character the model sees (head truncation for the benchmark)."""
    p = explainer.predictor
    enc = explainer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets = enc["offset_mapping"][: p.max_length - 2]
    return text[: offsets[-1][1]] if offsets else text


def faithfulness(explainer: Explainer, texts: list[str], ks: list[int], n_steps: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    drops: dict[str, list[float]] = {f"{kind}_{k}": [] for k in ks for kind in ("top", "random")}
    deltas, seconds = [], []
    for i, raw in enumerate(texts):
        text = seen_part(explainer, raw)
        ex = explainer.explain(text, n_steps=n_steps)
        deltas.append(ex["convergence_delta"])
        seconds.append(ex["seconds"])
        target = ex["label"]
        base = ex["probabilities"][target]
        words = ex["words"]
        variants, keys = [], []
        for k in ks:
            if len(words) <= k:
                continue
            variants.append(delete_words(text, sorted(words, key=lambda w: -w["score"])[:k]))
            keys.append(f"top_{k}")
            for _ in range(3):
                variants.append(delete_words(text, rng.sample(words, k)))
                keys.append(f"random_{k}")
        probs = explainer.predictor.predict_proba(variants)
        per_key: dict[str, list[float]] = {}
        for key, p in zip(keys, probs, strict=True):
            per_key.setdefault(key, []).append(base - float(p[1 if target == "positive" else 0]))
        for key, values in per_key.items():
            drops[key].append(statistics.fmean(values))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(texts)} reviews explained", flush=True)
    out = {key: statistics.fmean(v) for key, v in drops.items() if v}
    out["n"] = len(texts)
    out["convergence_delta_median"] = statistics.median(deltas)
    out["explain_s_median_in_process"] = statistics.median(seconds)
    return out


def pick_texts(explainer: Explainer, texts: list[str], tokens: int, n: int) -> list[str]:
    """`n` reviews of at least `tokens` tokens, cut to exactly that many (the model adds [CLS]/[SEP])."""
    out = []
    for t in texts:
        enc = explainer.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        if len(enc["input_ids"]) >= tokens - 2:
            out.append(t[: enc["offset_mapping"][tokens - 3][1]])
        if len(out) == n:
            break
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def latency(model_dir: str, texts_by_length: dict[int, list[str]], n_steps: int, precision: str, cpus: float) -> dict:
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = 8765
    # Logical CPUs: the model replica's one and the explainer's (2 physical cores in our runs).
    ray.init(num_cpus=1 + int(cpus + 0.999), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "serve.model_uri": model_dir,
        "serve.app_name": "bench",
        "serve.num_cpus": 1,
        "serve.autoscaling.min_replicas": 1,
        "serve.autoscaling.max_replicas": 1,
        "serve.explain.min_replicas": 1,
        "serve.explain.num_cpus": cpus,
        "serve.explain.precision": precision,
        "serve.request_timeout_s": 120,
        "serve.explain.timeout_s": 120,
        "registry.root": "/tmp/explain-bench-mlflow",
    }
    serve.run(build_app(args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        with httpx.Client(timeout=180) as c:
            c.post(f"{url}/explain", json={"text": "warm up", "n_steps": 2}).raise_for_status()
            for length, texts in texts_by_length.items():
                explain_s, predict_s, deltas = [], [], []
                for t in texts:
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/explain", json={"text": t, "n_steps": n_steps})
                    r.raise_for_status()
                    explain_s.append(time.perf_counter() - t0)
                    deltas.append(r.json()["convergence_delta"])
                    t0 = time.perf_counter()
                    c.post(f"{url}/predict", json={"text": t}).raise_for_status()
                    predict_s.append(time.perf_counter() - t0)
                out[length] = {
                    "n": len(texts),
                    "explain_p50_s": percentile(explain_s, 0.5),
                    "explain_p95_s": percentile(explain_s, 0.95),
                    "predict_p50_s": percentile(predict_s, 0.5),
                    "tokens": r.json()["tokens"],
                    "convergence_delta_median": statistics.median(deltas),
                }
                print(f"  {length} tokens: {out[length]}", flush=True)
            out["predict_while_explaining"] = predict_under_explain_load(c, url, texts_by_length, n_steps)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def predict_under_explain_load(c, url: str, texts_by_length: dict[int, list[str]], n_steps: int) -> dict:
    """/predict latency (one request at a time) with the explainer idle, then while another client keeps
    it busy with explanations of the longest texts, then idle again: the cost of sharing 2 cores."""
    import threading

    import httpx

    texts = texts_by_length[min(texts_by_length)]
    busy_texts = texts_by_length[max(texts_by_length)]

    def predict_p50() -> tuple[float, float]:
        seconds = []
        for _ in range(3):
            for t in texts:
                t0 = time.perf_counter()
                c.post(f"{url}/predict", json={"text": t}).raise_for_status()
                seconds.append(time.perf_counter() - t0)
        return percentile(seconds, 0.5), percentile(seconds, 0.95)

    stop = threading.Event()
    explained = []

    def keep_busy() -> None:
        with httpx.Client(timeout=180) as bc:
            while not stop.is_set():
                for t in busy_texts:
                    if stop.is_set():
                        break
                    explained.append(bc.post(f"{url}/explain", json={"text": t, "n_steps": n_steps}).status_code)

    idle_before = predict_p50()
    thread = threading.Thread(target=keep_busy)
    thread.start()
    time.sleep(2.0)  # the first explanation is under way
    try:
        busy = predict_p50()
    finally:
        stop.set()
        thread.join()
    idle_after = predict_p50()
    out = {
        "idle_p50_s": (idle_before[0] + idle_after[0]) / 2,
        "idle_p95_s": (idle_before[1] + idle_after[1]) / 2,
        "busy_p50_s": busy[0],
        "busy_p95_s": busy[1],
        "explanations_during": len(explained),
    }
    print(f"  /predict while explaining: {out}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (e.g. the imdb_cpu pipeline's registered version)")
    p.add_argument("--data", required=True, help="labelled reviews (.parquet/.csv/.jsonl)")
    p.add_argument("--n", type=int, default=100, help="reviews for the deletion test")
    p.add_argument("--k", type=int, nargs="+", default=[5, 10], help="words deleted")
    p.add_argument("--n-steps", type=int, default=20, help="integration steps (serve.explain.n_steps default)")
    p.add_argument("--latency-lengths", type=int, nargs="*", default=[128, 512])
    p.add_argument("--latency-n", type=int, default=20, help="requests per length")
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process (the deployment: num_cpus)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="serve.explain.precision")
    p.add_argument("--explain-cpus", type=float, default=1, help="serve.explain.num_cpus (its torch threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the results as JSON to this file")
    args = p.parse_args()

    reviews = load_file(args.data, "text", "label").texts
    rng = random.Random(args.seed)
    sample = rng.sample(reviews, min(len(reviews), 5 * args.n + 500))
    explainer = Explainer(args.model, num_threads=args.threads, precision=args.precision)
    print(
        f"model {args.model}: max_length {explainer.predictor.max_length}, n_steps {args.n_steps}, "
        f"precision {args.precision}",
        flush=True,
    )
    t0 = time.time()
    faith = faithfulness(explainer, sample[: args.n], args.k, args.n_steps, args.seed) if args.n else {}
    print(f"faithfulness ({time.time() - t0:.0f}s): {json.dumps(faith)}", flush=True)
    texts_by_length = {n: pick_texts(explainer, sample[args.n :], n, args.latency_n) for n in args.latency_lengths}
    lat = (
        latency(args.model, texts_by_length, args.n_steps, args.precision, args.explain_cpus)
        if args.latency_lengths
        else {}
    )

    print("\n| deleted words | top-attributed: mean drop | random: mean drop | ratio |\n|---|---|---|---|")
    for k in args.k:
        top, rnd = faith.get(f"top_{k}"), faith.get(f"random_{k}")
        if top is not None and rnd is not None:
            print(f"| {k} | {top:.3f} | {rnd:.3f} | {top / rnd if rnd > 0 else float('inf'):.1f}x |")
    print("\n| text | /explain p50 | /explain p95 | /predict p50 | convergence delta (median) |\n|---|---|---|---|---|")
    busy = lat.pop("predict_while_explaining", None)
    for length, r in lat.items():
        print(
            f"| {length} tokens (n={r['n']}) | {r['explain_p50_s']:.2f} s | {r['explain_p95_s']:.2f} s | "
            f"{1000 * r['predict_p50_s']:.0f} ms | {r['convergence_delta_median']:.3f} |"
        )
    if busy:
        print(
            f"\n/predict ({min(args.latency_lengths)} tokens) p50 {1000 * busy['idle_p50_s']:.0f} ms / p95 "
            f"{1000 * busy['idle_p95_s']:.0f} ms with the explainer idle, {1000 * busy['busy_p50_s']:.0f} ms / "
            f"{1000 * busy['busy_p95_s']:.0f} ms while it explains ({busy['explanations_during']} explanations)"
        )
        lat["predict_while_explaining"] = busy
    results = {
        "machine": f"{__import__('os').cpu_count()} CPUs",
        "model": args.model,
        "n_steps": args.n_steps,
        "precision": args.precision,
        "explain_cpus": args.explain_cpus,
        "faithfulness": faith,
        "latency": lat,
    }
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

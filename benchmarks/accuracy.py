"""Accuracy on real reviews: the transformer trained by the normal pipeline within a wall-clock budget
vs TF-IDF (1-2 grams) + logistic regression, both scored on the same held-out test split, in one run.

    python benchmarks/accuracy.py --data ../shared/data/imdb/train.parquet            # 30-minute budget
    python benchmarks/accuracy.py --data ... --budget-min 5 --set data.max_train_samples=4000

The pipeline registers the model (registry.model_name of the config) and gates it as usual; deployment is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.data import load_splits  # noqa: E402
from ray_jobs.inference import classification_metrics  # noqa: E402


def tfidf_baseline(train, test) -> dict:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=500_000)
    x = vec.fit_transform(train.texts)
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, train.labels)
    pred = clf.predict(vec.transform(test.texts))
    return {**classification_metrics(np.asarray(test.labels), np.asarray(pred)), "seconds": time.time() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="labelled train file (.parquet/.csv/.jsonl); val and test are carved from it"
    )
    p.add_argument("--config", default="tune_configs/imdb_cpu.yaml")
    p.add_argument("--budget-min", type=float, default=30.0, help="training wall-clock budget in minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--baseline-only", action="store_true")
    p.add_argument("--out", help="also write the results as JSON to this file")
    args = p.parse_args()
    cfg = load_config(
        args.config, [f"data.path={args.data}", f"train.time_budget_s={args.budget_min * 60}", *args.overrides]
    )
    splits = load_splits(cfg.data)
    print(
        f"split: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, digests "
        f"{splits.digests()}",
        flush=True,
    )
    base = tfidf_baseline(splits.train, splits.test)
    print(f"TF-IDF + LR: F1 {base['f1']:.4f} acc {base['accuracy']:.4f} ({base['seconds']:.0f}s)", flush=True)
    results = {
        "machine": f"{__import__('os').cpu_count()} CPUs",
        "split": splits.digests(),
        "n_test": len(splits.test),
        "tfidf": base,
    }
    if not args.baseline_only:
        from ray_jobs.pipeline import run_pipeline

        t0 = time.time()
        out = run_pipeline(cfg, deploy_app=False)
        m = out.best_metrics
        results["model"] = {
            "f1": out.decision.challenger_f1,
            "val_f1": m.get("val_f1"),
            "train_minutes": m.get("elapsed_s", 0) / 60,
            "train_samples_per_s": m.get("train_samples_per_s"),
            "wall_minutes": (time.time() - t0) / 60,
            "version": out.version,
            "gate": out.decision.reason,
            "promoted": out.decision.promote,
        }
    print("\n| model | test F1 | accuracy | training | samples/s |\n|---|---|---|---|---|")
    print(
        f"| TF-IDF (1-2 grams) + logistic regression | {base['f1']:.4f} | {base['accuracy']:.4f} | "
        f"{base['seconds']:.0f} s | - |"
    )
    if "model" in results:
        r = results["model"]
        print(
            f"| DistilBERT (MiniLM-L6 init), {cfg.model.max_length} tokens {cfg.model.truncation} | "
            f"{r['f1']:.4f} | - | "
            f"{r['train_minutes']:.1f} min | {r['train_samples_per_s'] or 0:.1f} |"
        )
    print(json.dumps(results, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

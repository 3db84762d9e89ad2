"""Accuracy on real reviews: the transformer trained by the normal pipeline (the config's epochs, or a
wall-clock budget) vs TF-IDF (1-2 grams) + logistic regression, both scored on the same held-out test split,
in one run.

    python benchmarks/accuracy.py --data ../shared/data/imdb/train.parquet            # imdb_cpu.yaml: 1 epoch
    python benchmarks/accuracy.py --data ... --budget-min 5 --set data.max_train_samples=4000

The pipeline registers the model (registry.model_name of the config) and gates it as usual; deployment is skipped.
Besides the test F1 of both it reports:
- F1 by review length in tokens (<= 256, 257-512, > 512: head+tail truncation drops the middle of the last);
- with --chunked, the model's F1 when a review longer than max_length is scored as overlapping windows whose
  logits are averaged, against head+tail truncation;
- with --score-checkpoints, every checkpoint the run kept (set train.num_to_keep high) with its validation
  loss and F1 and its test F1: which selection criterion would have picked the best one;
- with --set train.ema_decay=D, the registered model is the weights' moving average: the same run's raw
  weights (kept in its checkpoints for resuming) are scored beside it, at the selected checkpoint and,
  with --score-checkpoints, at every kept one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
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
    return {
        **classification_metrics(np.asarray(test.labels), np.asarray(pred)),
        "seconds": time.time() - t0,
        "preds": pred.tolist(),
    }


LENGTH_EDGES = (256, 512)


def by_length(labels, preds, lengths) -> dict[str, dict]:
    """F1 and count per review-length bucket (token counts before truncation)."""
    import numpy as np

    labels, preds, lengths = np.asarray(labels), np.asarray(preds), np.asarray(lengths)
    out, low = {}, 0
    for high in (*LENGTH_EDGES, None):
        sel = (lengths > low) & (lengths <= high if high is not None else True)
        name = f"{low + 1}-{high}" if high is not None else f">{low}"
        out[name] = {"n": int(sel.sum()), "f1": round(classification_metrics(labels[sel], preds[sel])["f1"], 4)}
        low = high or low
    return out


def chunked_logits(predictor, texts, stride_fraction: float = 0.5):
    """(n, 2) logits: a text within max_length as the predictor encodes it; a longer one as windows of
    max_length - 2 tokens (overlapping by 1 - stride_fraction), each with [CLS]/[SEP], logits averaged."""
    import numpy as np

    from ray_jobs.data import HTML_BREAK
    from ray_jobs.inference import batched_logits

    tok = predictor.tokenizer
    budget = predictor.max_length - 2
    stride = max(1, int(budget * stride_fraction))
    seqs, owner = [], []
    raw = tok([HTML_BREAK.sub(" ", t) for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
    for i, ids in enumerate(raw):
        starts = [0] if len(ids) <= budget else [*range(0, len(ids) - budget, stride), len(ids) - budget]
        for st in starts:
            seqs.append([tok.cls_token_id, *ids[st : st + budget], tok.sep_token_id])
            owner.append(i)
    predictor.model.eval()
    logits = batched_logits(
        predictor.model, seqs, tok.pad_token_id, predictor.batch_size, predictor.device, predictor.amp_dtype
    ).numpy()
    out = np.zeros((len(texts), 2), dtype=np.float64)
    counts = np.bincount(owner, minlength=len(texts))
    np.add.at(out, owner, logits)
    return out / counts[:, None]


@contextlib.contextmanager
def raw_weights(checkpoint: Path):
    """A model folder of `checkpoint`'s raw weights (those the optimizer stepped) where the run averaged
    them (train.ema_decay; the checkpoint's own model is the average), else None."""
    from ray_jobs.train_worker import RESUME_FILES, TRAIN_WEIGHTS_FILE

    if not (checkpoint / TRAIN_WEIGHTS_FILE).is_file():
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "raw"
        shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("model.safetensors", *RESUME_FILES))
        shutil.copyfile(checkpoint / TRAIN_WEIGHTS_FILE, folder / "model.safetensors")
        yield folder


def score_checkpoints(run_dir: Path, test, precision: str, batch_size: int) -> list[dict]:
    """Every checkpoint of one Ray Train run: step, validation loss and F1 (from its metadata), test F1
    (and, where the run averaged its weights, the raw weights' test F1)."""
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.model import read_meta

    rows = []
    for d in sorted(p.parent for p in run_dir.glob("checkpoint_*/model.safetensors")):
        m = read_meta(d).get("metrics", {})
        ev = evaluate_dir(str(d), test, batch_size, precision)
        rows.append({"step": m.get("step"), "val_loss": m.get("val_loss"), "val_f1": m.get("val_f1"), "test_f1": ev.f1})
        with raw_weights(d) as raw:
            if raw is not None:
                rows[-1]["raw_test_f1"] = evaluate_dir(str(raw), test, batch_size, precision).f1
        print(
            f"checkpoint step {m.get('step')}: val_loss {m.get('val_loss'):.4f} val_f1 {m.get('val_f1'):.4f} "
            f"test_f1 {ev.f1:.4f}"
            + (f" (raw weights {rows[-1]['raw_test_f1']:.4f})" if "raw_test_f1" in rows[-1] else ""),
            flush=True,
        )
    rows.sort(key=lambda r: r["step"] or 0)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="labelled train file (.parquet/.csv/.jsonl); val and test are carved from it"
    )
    p.add_argument("--config", default="tune_configs/imdb_cpu.yaml")
    p.add_argument(
        "--budget-min", type=float, help="a training wall-clock budget in minutes (default: the config's epochs)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--baseline-only", action="store_true")
    p.add_argument("--chunked", action="store_true", help="also score long reviews as overlapping windows")
    p.add_argument("--score-checkpoints", action="store_true", help="test F1 of every checkpoint the run kept")
    p.add_argument("--out", help="also write the results as JSON to this file")
    args = p.parse_args()
    budget = [] if args.budget_min is None else [f"train.time_budget_s={args.budget_min * 60}"]
    cfg = load_config(args.config, [f"data.path={args.data}", *budget, *args.overrides])
    splits = load_splits(cfg.data)
    print(
        f"split: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, digests "
        f"{splits.digests()}",
        flush=True,
    )
    base = tfidf_baseline(splits.train, splits.test)
    from ray_jobs.data import encode_counted
    from ray_jobs.model import build_model

    # Token counts before truncation, as drift monitoring counts them.
    lengths = encode_counted(build_model(cfg.model)[1], splits.test.texts, cfg.model.max_length)[1]
    base["by_length"] = by_length(splits.test.labels, base.pop("preds"), lengths)
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
            # Over the whole run, validations included: the last report's own rate covers only the
            # steps since the report before it (3 steps, once, when the budget struck right after one).
            "train_samples_per_s": m.get("step", 0)
            * cfg.train.batch_size
            * cfg.train.num_workers
            / max(m.get("elapsed_s", 0), 1e-9),
            "wall_minutes": (time.time() - t0) / 60,
            "version": out.version,
            "gate": out.decision.reason,
            "promoted": out.decision.promote,
            "selected_by": cfg.train.select_by,
            "val_loss": m.get("val_loss"),
            "step": m.get("step"),
        }
        ckpt = Path(m["checkpoint_path"])
        from ray_jobs.inference import Predictor

        def predictor_of(folder: Path) -> Predictor:
            return Predictor(str(folder), precision=cfg.gate.precision, batch_size=cfg.gate.eval_batch_size)

        predictor = predictor_of(ckpt)
        preds = predictor.predict_proba(splits.test.texts).argmax(1)
        results["model"]["by_length"] = by_length(splits.test.labels, preds, lengths)
        with raw_weights(ckpt) as raw:  # the same run's raw weights beside their average (train.ema_decay)
            if raw is not None:
                raw_preds = predictor_of(raw).predict_proba(splits.test.texts).argmax(1)
                results["model"]["raw_weights"] = {
                    "f1": classification_metrics(splits.test.labels, raw_preds)["f1"],
                    "by_length": by_length(splits.test.labels, raw_preds, lengths),
                }
        if args.chunked:  # only the reviews over max_length change; the others keep their prediction
            t1 = time.time()
            long = [i for i, n in enumerate(lengths) if n > predictor.max_length - 2]
            chunked = preds.copy()
            chunked[long] = chunked_logits(predictor, [splits.test.texts[i] for i in long]).argmax(1)
            results["model"]["chunked"] = {
                "f1": classification_metrics(splits.test.labels, chunked)["f1"],
                "seconds": time.time() - t1,  # the long reviews' windows
                "by_length": by_length(splits.test.labels, chunked, lengths),
            }
        if args.score_checkpoints:
            results["checkpoints"] = score_checkpoints(
                ckpt.parent, splits.test, cfg.gate.precision, cfg.gate.eval_batch_size
            )
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
    if "raw_weights" in results.get("model", {}):
        print(
            f"| same run, raw weights (not averaged, train.ema_decay={cfg.train.ema_decay}) | "
            f"{results['model']['raw_weights']['f1']:.4f} | - | | |"
        )
    for name, r in (("TF-IDF + LR", base), ("model", results.get("model"))):
        if r:
            print(f"{name} F1 by review length (tokens): {r['by_length']}")
    if "chunked" in results.get("model", {}):
        c = results["model"]["chunked"]
        print(
            f"model, long reviews as overlapping windows: F1 {c['f1']:.4f} ({c['seconds']:.0f} s), "
            f"by length {c['by_length']}"
        )
    print(json.dumps(results, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        from figures import render  # benchmarks/figures.py: test F1 against steps, beside TF-IDF

        print(f"figure: {render(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

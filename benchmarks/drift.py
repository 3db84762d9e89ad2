"""Drift detection on real reviews: how often each scenario alarms, per window size, and what
monitoring costs a served app.

    python benchmarks/drift.py --model <model folder> --imdb ../shared/data/imdb/train.parquet \
        --sst2 ../shared/data/sst2 --config tune_configs/imdb_cpu.yaml [--windows 100 250 500 1000] \
        [--trials 50] [--cache /tmp/drift_features] [--serve-cost] [--out results.json]

The model is one trained by the config on the IMDB file: the config's split then gives reviews it
never trained on (its test and validation splits, 3,000 for imdb_cpu.yaml). Each trial draws a
reference of half the test split's size from them (what registration profiles: ray_jobs.drift) and
its windows from the rest, so trials are independent. Scenarios, each scored by the detector the
monitor runs (`Detector.test`, default alpha 0.05):

    none          windows from the held-out pool: every alarm is a false alarm
    prior_10_90   10% negative, 90% positive reviews (by their true label)
    sst2          SST-2 sentences: short single sentences, another source
    inject_5pct   5% (and inject_1pct: 1%) of the reviews with a sentence inserted
    other_lang    reviews in Spanish and German (generated from templates below: no such data here)

Windows are drawn without replacement from their pool where it is large enough, else with
replacement (noted in the output). Features are computed once per text and cached.

`--serve-cost`: the Serve app with drift monitoring on and off, alternately, on this machine:
req/s and p99 at 64 clients (benchmarks/serve_load.py's client), same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.data import load_file, load_splits  # noqa: E402
from ray_jobs.drift import REFERENCE_FILE, TESTS, Detector, Features, Reference  # noqa: E402

INJECTED = "The film was shot on location in a small harbour town over eleven weeks in the autumn."

# Reviews in another language: sentences written for this benchmark, combined at random.
_ES = {
    "open": [
        "Vi esta película el fin de semana con mi familia.",
        "Fui al cine sin saber nada de la historia.",
        "Esta película llegó con mucha publicidad.",
        "La vi en casa una noche de lluvia.",
        "Un amigo me la recomendó hace meses.",
    ],
    "pos": [
        "Los actores están magníficos y la música es preciosa.",
        "La historia me atrapó desde el primer minuto.",
        "Es una obra maestra, divertida y emocionante.",
        "La fotografía es bellísima y el guion muy inteligente.",
        "Me reí y lloré, una experiencia inolvidable.",
    ],
    "neg": [
        "El guion es un desastre y los diálogos son ridículos.",
        "Me aburrí muchísimo, es demasiado larga y lenta.",
        "Los actores parecen perdidos y nada tiene sentido.",
        "Una pérdida de tiempo y de dinero.",
        "El final es absurdo y la dirección es torpe.",
    ],
    "close": [
        "La recomiendo a todo el mundo.",
        "No pienso volver a verla.",
        "Quizás la vea otra vez con mis hijos.",
        "Al final salí del cine pensando en ella.",
        "Eso es todo lo que tengo que decir.",
    ],
}
_DE = {
    "open": [
        "Ich habe diesen Film am Sonntag im Kino gesehen.",
        "Meine Freundin wollte ihn unbedingt sehen.",
        "Der Film lief gestern Abend im Fernsehen.",
        "Ich hatte viel Gutes über diesen Film gehört.",
        "Ohne große Erwartungen habe ich ihn angeschaut.",
    ],
    "pos": [
        "Die Schauspieler sind großartig und die Geschichte berührt.",
        "Spannend von der ersten bis zur letzten Minute.",
        "Ein wunderbarer Film mit herrlichen Bildern.",
        "Die Musik und die Kamera sind einfach fantastisch.",
        "Selten habe ich so gelacht, ein echtes Meisterwerk.",
    ],
    "neg": [
        "Die Handlung ist langweilig und völlig vorhersehbar.",
        "Die Dialoge sind hölzern und die Figuren flach.",
        "Zwei Stunden meines Lebens, die ich nie zurückbekomme.",
        "Schlecht gespielt, schlecht geschrieben, schlecht gedreht.",
        "Das Ende ist albern und ergibt keinen Sinn.",
    ],
    "close": [
        "Ich kann ihn nur empfehlen.",
        "Ein zweites Mal schaue ich ihn mir nicht an.",
        "Vielleicht gebe ich ihm noch eine Chance.",
        "Mehr gibt es dazu nicht zu sagen.",
        "Am Ende war ich trotzdem froh, ihn gesehen zu haben.",
    ],
}


def other_language_reviews(n: int, seed: int = 0) -> list[str]:
    """`n` distinct reviews: an opening, two or three opinions of one polarity, a closing."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        lang = rng.choice([_ES, _DE])
        polarity = lang["pos"] if rng.random() < 0.5 else lang["neg"]
        parts = [rng.choice(lang["open"]), *rng.sample(polarity, rng.choice([2, 3])), rng.choice(lang["close"])]
        out.add(" ".join(parts))
    return sorted(out)


def inject(text: str, rng: random.Random) -> str:
    """`INJECTED` inserted at a sentence boundary of `text`."""
    cuts = [i + 2 for i, ch in enumerate(text) if ch == "." and text[i + 1 : i + 2] == " "]
    at = rng.choice(cuts) if cuts else len(text)
    return f"{text[:at]}{INJECTED} {text[at:]}"


def cached_features(predictor, texts: list[str], cache: Path | None, name: str) -> Features:
    key = hashlib.sha256((predictor.model_dir + "\0" + "\0".join(texts)).encode()).hexdigest()[:16]
    path = cache / f"{name}-{key}.npz" if cache else None
    if path and path.exists():
        return Reference.load(path).features
    start = time.perf_counter()
    parts = []
    for i in range(0, len(texts), 256):
        parts.append(predictor.predict_features(texts[i : i + 256])[1])
        print(f"  {name}: {min(i + 256, len(texts))}/{len(texts)} texts", flush=True)
    f = Features.concat(parts)
    print(f"  {name}: {len(texts)} texts in {time.perf_counter() - start:.0f}s", flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Reference(f, {"name": name}).save(path)
    return f


def draw(n_pool: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    replace = size > n_pool
    return rng.choice(n_pool, size=size, replace=replace), replace


def window_for(scenario: str, size: int, pools: dict, pool_idx: np.ndarray, rng: np.random.Generator):
    """(window features, drawn with replacement?) for one trial; `pool_idx`: this trial's held-out
    reviews that are not in its reference."""
    heldout = pools["heldout"]
    if scenario == "none":
        i, rep = draw(len(pool_idx), size, rng)
        return heldout.take(pool_idx[i]), rep
    if scenario == "prior_10_90":
        labels = pools["labels"][pool_idx]
        pos, neg = pool_idx[labels == 1], pool_idx[labels == 0]
        n_pos = int(round(0.9 * size))
        ip, rp = draw(len(pos), n_pos, rng)
        ineg, rn = draw(len(neg), size - n_pos, rng)
        return heldout.take(np.concatenate([pos[ip], neg[ineg]])), rp or rn
    if scenario in ("sst2", "other_lang"):
        i, rep = draw(len(pools[scenario]), size, rng)
        return pools[scenario].take(i), rep
    if scenario.startswith("inject_"):
        share = float(scenario.split("_")[1].rstrip("pct")) / 100
        i, rep = draw(len(pool_idx), size, rng)
        idx = pool_idx[i]
        chosen = rng.choice(size, size=max(1, int(round(share * size))), replace=False)
        window = heldout.take(idx)
        injected = pools["injected"].take(idx[chosen])
        for f in dataclasses.fields(window):
            getattr(window, f.name)[chosen] = getattr(injected, f.name)
        return window, rep
    raise ValueError(scenario)


SCENARIOS = ("none", "prior_10_90", "sst2", "inject_5pct", "inject_1pct", "other_lang")


def detection_table(pools: dict, n_reference: int, sizes: list[int], trials: int, seed: int) -> dict:
    """Each trial draws its own reference from the held-out reviews (as registration profiles a test
    split) and its window from the others: trials are independent, so the false-alarm rate is that
    of a random reference, not of one lucky or unlucky split."""
    rng = np.random.default_rng(seed)
    n = len(pools["heldout"])
    splits = []
    for t in range(trials):
        perm = rng.permutation(n)
        reference = Reference.from_features(pools["heldout"].take(np.sort(perm[:n_reference])), seed=seed + t)
        splits.append((Detector(reference, seed=seed + t), perm[n_reference:]))
    table: dict = {}
    for scenario, size in itertools.product(SCENARIOS, sizes):
        alarms, per_test, replaced, seconds = 0, {t: 0 for t in TESTS}, False, 0.0
        for detector, pool_idx in splits:
            window, rep = window_for(scenario, size, pools, pool_idx, rng)
            replaced |= rep
            start = time.perf_counter()
            res = detector.test(window)
            seconds += time.perf_counter() - start
            alarms += res.alarm
            for t, r in res.tests.items():
                per_test[t] += r.alarm
        table.setdefault(scenario, {})[str(size)] = {
            "alarm_rate": alarms / trials,
            "per_test": {t: v / trials for t, v in per_test.items()},
            "with_replacement": replaced,
            "test_ms": round(1000 * seconds / trials, 1),
        }
        print(
            f"{scenario:<12} window {size:>5}: alarm {alarms / trials:6.1%}  "
            + "  ".join(f"{t} {v / trials:5.1%}" for t, v in per_test.items())
            + ("  (with replacement)" if replaced else "")
            + f"  {1000 * seconds / trials:.0f} ms/window",
            flush=True,
        )
    return table


def serve_cost(args, reference: Reference) -> dict:
    """benchmarks/serve_load.py at 64 clients on SST-2 sentences (short texts: many requests, so many
    windows), the app with monitoring on and off, alternating for `--rounds`; the model is --model
    with a reference profile, so that the monitor tests every full window."""
    tmp = Path(tempfile.mkdtemp())
    served = tmp / "model"
    shutil.copytree(args.model, served)
    reference.save(served / REFERENCE_FILE)
    out = tmp / "serve_load.json"
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("serve_load.py")),
        "--model",
        str(served),
        "--only",
        "serve-batched",
        "serve-batched-no-drift",
        "--rounds",
        str(args.rounds),
        "--levels",
        "64",
        "--seconds",
        str(args.seconds),
        "--max-requests",
        "100000",
        "--data",
        str(Path(args.sst2) / "dev.parquet"),
        "--drift-window",
        str(args.serve_window),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    results = json.loads(out.read_text())["results"]
    runs = {
        "on": [r["64"] for k, r in results.items() if k.split(" #")[0] == "serve-batched"],
        "off": [r["64"] for k, r in results.items() if k.split(" #")[0] == "serve-batched-no-drift"],
    }
    summary = {
        mode: {
            "req_s": [round(r["req_s"], 1) for r in rs],
            "of_bound": [round(r["of_bound"], 3) for r in rs],
            "p99_ms": [round(r["p99"], 1) for r in rs],
            "errors": sum(r["errors"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    mean = {m: float(np.mean(summary[m]["of_bound"])) for m in runs}
    summary["on_over_off"] = round(mean["on"] / mean["off"], 3)
    print(
        f"serving at 64 clients, monitoring on vs off: {summary['on_over_off']:.3f}x in share of the in-process bound "
        f"(on: {summary['on']['req_s']} req/s, p99 {summary['on']['p99_ms']} ms; "
        f"off: {summary['off']['req_s']} req/s, p99 {summary['off']['p99_ms']} ms)",
        flush=True,
    )
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder trained by --config on --imdb")
    p.add_argument("--imdb", required=True, help="IMDB train.parquet")
    p.add_argument("--sst2", required=True, help="folder with SST-2 train.parquet and dev.parquet")
    p.add_argument("--config", default="tune_configs/imdb_cpu.yaml", help="the config that trained --model")
    p.add_argument("--windows", type=int, nargs="+", default=[100, 250, 500, 1000])
    p.add_argument("--trials", type=int, default=50, help="windows per scenario and size")
    p.add_argument("--other-lang", type=int, default=300, help="reviews in another language to generate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", help="as served (auto: bf16 where the CPU has it)")
    p.add_argument("--cache", type=Path, default=None, help="folder for computed features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-cost", action="store_true", help="also measure serving with monitoring on and off")
    p.add_argument("--rounds", type=int, default=2, help="--serve-cost: on/off pairs")
    p.add_argument("--seconds", type=float, default=20, help="--serve-cost: seconds per load run")
    p.add_argument("--serve-window", type=int, default=500, help="--serve-cost: serve.drift.window_size")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from ray_jobs.inference import Predictor

    cfg = load_config(args.config, [f"data.path={args.imdb}"])
    splits = load_splits(cfg.data)
    heldout_texts = splits.test.texts + splits.val.texts
    labels = np.array(splits.test.labels + splits.val.labels)
    n_reference = len(splits.test) // 2
    rng = random.Random(args.seed)
    sst = load_file(Path(args.sst2) / "train.parquet").texts + load_file(Path(args.sst2) / "dev.parquet").texts
    print(
        f"{len(heldout_texts)} held-out reviews: per trial a reference of {n_reference}, windows from the rest; "
        f"SST-2 {len(sst)} sentences"
    )

    predictor = Predictor(args.model, num_threads=args.threads, precision=args.precision)
    pools = {
        "heldout": cached_features(predictor, heldout_texts, args.cache, "heldout"),
        "labels": labels,
        "injected": cached_features(predictor, [inject(t, rng) for t in heldout_texts], args.cache, "injected"),
        "sst2": cached_features(predictor, sst, args.cache, "sst2"),
        "other_lang": cached_features(predictor, other_language_reviews(args.other_lang), args.cache, "other_lang"),
    }
    for k in ("heldout", "injected", "sst2", "other_lang"):
        print(f"{k}:", json.dumps({a: round(b, 4) for a, b in pools[k].summary().items()}))
    result = {
        "model": args.model,
        "heldout_n": len(heldout_texts),
        "reference_n": n_reference,
        "trials": args.trials,
        "alpha": 0.05,
        "detection": detection_table(pools, n_reference, args.windows, args.trials, args.seed),
    }
    if args.serve_cost:
        reference = Reference.from_features(pools["heldout"].take(np.arange(n_reference)))
        result["serve_cost"] = serve_cost(args, reference)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        from figures import render  # benchmarks/figures.py: alarm rates per scenario and window size

        print(f"figure: {render(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

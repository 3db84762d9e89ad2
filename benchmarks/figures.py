"""Figures of the benchmarks' JSON results, for the docs: each benchmark renders its own right after it
writes its JSON (`--out`), and this script renders committed results again:

    python benchmarks/figures.py benchmarks/results/chaos_run3.json benchmarks/results/serve_load_run8.json

A figure goes to docs/figures/<name of the JSON>.png, where the docs pages (and GitHub) show it; the JSON
it was drawn from stays in benchmarks/results/. The kind of result is read from its keys.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def kind_of(data: dict) -> str:
    """chaos, serve_load, accuracy, drift, gpu_train, data_scale or suite_profile, from the keys each
    benchmark writes."""
    if "by_kind" in data and "wall_bound_s" in data:
        return "suite_profile"
    if "sizes" in data and "store_mb" in data.get("args", {}):
        return "data_scale"
    if "matmul_tflops" in data and "sections" in data:
        return "gpu_train"
    if "rows" in data and "faults" in data.get("args", {}):
        return "chaos"
    if "detection" in data:
        return "drift"
    if "tfidf" in data and "model" in data:
        return "accuracy"
    if "results" in data:
        return "serve_load"
    raise ValueError(f"not a result this script draws (keys: {sorted(data)})")


def chaos(data: dict, title: str):
    """Per fault and ingress mode: with a timeline (benchmarks/chaos.py records one per fault), each
    request's latency p99 per half second and the failed requests over time around the fault; results
    from before timelines were recorded: failed requests and recovery time per fault."""
    plt = _pyplot()
    rows = data["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    if all("timeline" in r for r in rows):
        fig, axes = plt.subplots(len(faults), len(modes), figsize=(5 * len(modes), 1.9 * len(faults)), squeeze=False)
        for r in rows:
            ax = axes[faults.index(r["fault"])][modes.index(r["mode"])]
            tl = r["timeline"]
            ax.plot(
                tl["t"],
                [float("nan") if p is None else p / 1000 for p in tl["p99_ms"]],
                color="tab:blue",
                lw=1,
                label="p99 latency (s)",
            )
            ax.set_yscale("log")
            ax.set_ylabel("p99 (s)", fontsize=7)
            ax.axvline(0, color="black", lw=0.8)
            if r["recovery_s"] is not None:
                ax.axvspan(0, r["recovery_s"], color="tab:orange", alpha=0.15)
            failed = [(t, f) for t, f in zip(tl["t"], tl["failed"], strict=True) if f]
            if failed:
                twin = ax.twinx()
                twin.bar([t for t, _ in failed], [f for _, f in failed], width=tl["bin_s"], color="tab:red")
                twin.set_ylabel("failed", color="tab:red", fontsize=7)
            ax.set_title(f"{r['mode']}: {r['fault']} ({r['failed']} of {r['sent']} failed)", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("seconds from the fault (shaded: until recovered)", fontsize=7)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(faults) + 1.6))
        height = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            by_fault = {r["fault"]: r for r in rows if r["mode"] == mode}
            ys = [k + i * height for k in range(len(faults))]
            rec = [(by_fault[f]["recovery_s"] or 0) if f in by_fault else 0 for f in faults]
            fail = [by_fault[f]["failed"] if f in by_fault else 0 for f in faults]
            right.barh(ys, rec, height, label=mode)
            left.barh(ys, [max(x, 0.5) for x in fail], height, label=mode)
            for y, x in zip(ys, fail, strict=True):
                left.text(max(x, 0.5) * 1.1, y, str(x), va="center", fontsize=7)
        for ax in (left, right):
            ax.set_yticks([k + 0.4 - height / 2 for k in range(len(faults))], faults, fontsize=8)
            ax.invert_yaxis()
        left.set_xscale("log")
        left.set_xlabel("failed requests (log; 0 drawn at 0.5)")
        right.set_xlabel("recovery (s)")
        right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _rounds(results: dict) -> dict[str, dict[int, list[dict]]]:
    """variant -> clients -> one measurement per round ("name #2" is round 2 of "name")."""
    out: dict[str, dict[int, list[dict]]] = {}
    for name, levels in results.items():
        variant = name.split(" #")[0]
        for level, m in levels.items():
            out.setdefault(variant, {}).setdefault(int(level), []).append(m)
    return out


def serve_load(data: dict, title: str):
    """Per variant against clients: req/s and p99 latency (medians over rounds, the spread as a bar),
    and each one's share of the in-process bound."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    rounds = _rounds(data["results"])
    for variant, levels in rounds.items():
        xs = sorted(levels)
        for ax, key, scale in ((axes[0], "req_s", 1), (axes[1], "p99", 1 / 1000), (axes[2], "of_bound", 100)):
            vals = [[m[key] * scale for m in levels[x] if key in m] for x in xs]
            pts = [(x, v) for x, v in zip(xs, vals, strict=True) if v]
            if not pts:
                continue
            med = [statistics.median(v) for _, v in pts]
            err = [
                [m - min(v) for m, (_, v) in zip(med, pts, strict=True)],
                [max(v) - m for m, (_, v) in zip(med, pts, strict=True)],
            ]
            ax.errorbar([x for x, _ in pts], med, yerr=err, marker="o", capsize=3, label=variant)
    levels = sorted({x for levels in rounds.values() for x in levels})
    for ax, label in zip(axes, ("requests/s", "p99 latency (s)", "% of the in-process bound"), strict=True):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def accuracy(data: dict, title: str):
    """Test F1 against training steps (every scored checkpoint where the run kept them), beside TF-IDF."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    m = data["model"]
    points = sorted(
        data.get("checkpoints") or [{"step": m.get("step", 0), "test_f1": m["f1"]}], key=lambda c: c["step"]
    )
    ax.plot([c["step"] for c in points], [c["test_f1"] for c in points], marker="o", label="transformer, test F1")
    if any("val_f1" in c for c in points):
        ax.plot(
            [c["step"] for c in points], [c.get("val_f1") for c in points], marker=".", ls=":", label="validation F1"
        )
    ax.axhline(data["tfidf"]["f1"], color="gray", ls="--", label=f"TF-IDF + LR {data['tfidf']['f1']:.4f}")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("F1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def drift(data: dict, title: str):
    """Share of windows that alarm, per scenario and window size (a no-shift row is the false-alarm
    rate, which the detector bounds by alpha)."""
    plt = _pyplot()
    scenarios = list(data["detection"])
    sizes = sorted({int(s) for by_size in data["detection"].values() for s in by_size})
    rates = [
        [100 * data["detection"][sc].get(str(s), {}).get("alarm_rate", float("nan")) for s in sizes] for sc in scenarios
    ]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(scenarios) + 1.4))
    ax.imshow(rates, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(rates):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}%", ha="center", va="center", fontsize=8, color="white" if v > 60 else "black")
    ax.set_xticks(range(len(sizes)), [f"{s} texts" for s in sizes], fontsize=8)
    ax.set_yticks(range(len(scenarios)), scenarios, fontsize=8)
    ax.set_xlabel(f"window; % of {data.get('trials', '?')} windows that alarm (alpha {data['alpha']:g})", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# Issue 29's targets, as shares of the chip's measured bf16 matmul rate.
GPU_TARGETS = {"infer": 0.60, "train256": 0.50, "train512": 0.40}


def gpu_train(data: dict, title: str):
    """benchmarks/gpu_train.py: each variant's share of the matmul rate measured in the same run (the
    target as a dashed mark), and the 512-token loss curves of the loop before and after."""
    plt = _pyplot()
    sections = data["sections"]
    rows = []
    for section in ("infer", "train256", "train512"):
        for name, row in sections.get(section, {}).items():
            if isinstance(row, dict) and ("share" in row or "share_real_tokens" in row):
                rows.append((section, name, row.get("share", row.get("share_real_tokens"))))
    curves = {k: v["loss_per_10_steps"] for k, v in sections.get("train512", {}).items() if isinstance(v, dict)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 1.8), width_ratios=[1.6, 1])
    colors = {"infer": "tab:blue", "train256": "tab:orange", "train512": "tab:green"}
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [100 * r[2] for r in rows], color=[colors[r[0]] for r in rows])
    for yi, (section, _, value) in zip(y, rows, strict=True):
        ax.text(100 * value + 0.5, yi, f"{100 * value:.1f}%", va="center", fontsize=7)
        ax.plot([100 * GPU_TARGETS[section]] * 2, [yi - 0.4, yi + 0.4], color="black", ls="--", lw=1)
    ax.set_yticks(y, [f"{s}: {n}" for s, n, _ in rows], fontsize=7)
    ax.set_xlabel(f"% of the measured bf16 matmul rate ({data['matmul_tflops']} TFLOP/s); dashed: target", fontsize=8)
    ax.set_title(f"{title}, torch {data.get('torch')}", fontsize=9)
    for name, losses in curves.items():
        ax2.plot([10 * (i + 1) for i in range(len(losses))], losses, marker=".", label=name)
    ax2.set_xlabel("step (mean loss of each 10)", fontsize=8)
    ax2.set_ylabel("training loss", fontsize=8)
    ax2.set_title("512 tokens, IMDB: same batches, same initial weights", fontsize=9)
    if curves:
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def data_scale(data: dict, title: str):
    """benchmarks/data_scale.py: what grows with the corpus (driver peak RSS, object-store peak, time to the
    first training step), this run beside the run it names in `compare` (e.g. the code before a change).
    A run that failed at a size is drawn as an x at the value it had reached."""
    plt = _pyplot()
    runs = [(data.get("label", "this run"), data["sizes"])]
    if data.get("compare"):
        runs.insert(0, (data["compare"]["label"], data["compare"]["sizes"]))
    panels = [
        ("driver_peak_rss_mb", "driver peak RSS (MiB)"),
        ("object_store_peak_mb", "object-store peak (MiB)"),
        ("first_step_s", "time to the first training step (s)"),
    ]
    key = "trial_first_steps_s"
    trials = [(name, size[key]) for name, sizes in runs for size in sizes.values() if key in size]
    fig, axes = plt.subplots(1, 4 if trials else 3, figsize=(16 if trials else 12, 3.4))
    if trials:  # a search (--trials): when each trial's first step came, run beside run
        for name, starts in trials:
            axes[3].plot(range(1, len(starts) + 1), starts, marker="o", label=name)
        axes[3].set_xlabel("trial (in the order their first steps came)", fontsize=8)
        axes[3].set_title("each trial's first training step (s)", fontsize=9)
        axes[3].grid(alpha=0.3)
    for ax, (key, label) in zip(axes, panels, strict=False):
        for name, sizes in runs:
            xs = sorted(sizes, key=int)
            ok = [(int(n), sizes[n][key]) for n in xs if sizes[n]["exit_code"] == 0 and sizes[n].get(key) is not None]
            failed = [(int(n), sizes[n][key]) for n in xs if sizes[n]["exit_code"] != 0 and sizes[n].get(key)]
            line = ax.plot(*zip(*ok, strict=True), marker="o", label=name)[0] if ok else None
            if failed:
                color = line.get_color() if line else None
                ax.scatter(*zip(*failed, strict=True), marker="x", s=80, color=color, label=f"{name}: failed")
        ax.set_xscale("log")
        ticks = sorted({int(n) for _, sizes in runs for n in sizes})
        ax.set_xticks(ticks, [f"{n / 1000:g}k" if n < 10**6 else f"{n / 10**6:g}M" for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("reviews in the corpus", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="upper left")  # that panel rises to the right: its upper left is empty
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def suite_profile(data: dict, title: str):
    """benchmarks/suite_profile.py: CPU seconds per kind of process (bars, with the number of processes),
    and the wall time beside the shortest wall time the machine's cores allow for that CPU."""
    plt = _pyplot()
    rows = list(data["by_kind"].items())[:14][::-1]  # the largest at the top
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    ax.barh([k for k, _ in rows], [r["cpu_s"] for _, r in rows], color="tab:blue")
    for i, (_, r) in enumerate(rows):
        ax.text(r["cpu_s"], i, f"  {r['cpu_s']:.0f} s, {r['processes']} proc.", va="center", fontsize=7)
    ax.set_xlabel("CPU seconds", fontsize=8)
    ax.set_title("where the CPU went, by kind of process", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    bars = [("wall", data["wall_s"]), (f"CPU / {data['cores']} cores", data["wall_bound_s"])]
    bx.bar([b for b, _ in bars], [v for _, v in bars], color=["tab:gray", "tab:orange"])
    for i, (_, v) in enumerate(bars):
        bx.text(i, v, f"{v:.0f} s", ha="center", va="bottom", fontsize=8)
    bx.set_title(f"wall time (machine {data['machine_busy']:.0%} busy)", fontsize=9)
    bx.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


DRAW = {
    "chaos": chaos,
    "serve_load": serve_load,
    "accuracy": accuracy,
    "drift": drift,
    "gpu_train": gpu_train,
    "data_scale": data_scale,
    "suite_profile": suite_profile,
}


def render(json_path: str | Path, data: dict | None = None) -> Path:
    """Draw the figure of one result file; returns the PNG's path (docs/figures/<stem>.png)."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text()) if data is None else data
    machine = data.get("machine") or data.get("gpu") or "machine not recorded"
    fig = DRAW[kind_of(data)](data, f"{json_path.name} ({machine})")
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"{json_path.stem}.png"
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__)
        return 2
    for path in argv:
        sys.stdout.write(f"{render(path)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

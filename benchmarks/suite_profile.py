"""Where the test suite's CPU goes: run a command (the README's test command by default) and sample every
process on the machine twice a second, then report CPU seconds per kind of process and the bound that
the machine's cores put on the suite's wall time.

    python benchmarks/suite_profile.py --out benchmarks/results/suite_profile_2core.json   # python -m pytest -q -n 2
    python benchmarks/suite_profile.py -- python -m pytest -q tests/test_faults.py

Why: a suite of scenario tests is a mix of waiting (process starts, polls, deadlines) and computing. If
the cores are idle much of the time, running tests side by side shortens it; if they are busy, only less
work does. Total CPU seconds / cores is the shortest wall time any scheduling of the same work can reach.

Kinds: a Ray actor by its class (`ray::ServeReplica`, `ray::RayTrainWorker`, ...), a model process
(serve_app.model_worker), the pytest process, Ray's daemons (gcs_server, raylet, dashboard, ...), other
commands by name. A process that lives less than one sample interval may be missed (at most 0.5 s of
CPU each); CPU is counted from the first sample for processes that existed before the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
# Substrings of a command line that name its kind, first match wins (Ray workers name their actor class
# in argv[0] as `ray::Class.method`, handled before these).
KINDS = (
    "serve_app.model_worker",
    "fork_server",
    "pytest",
    "gcs_server",
    "raylet/raylet",
    "dashboard.py",
    "dashboard/agent",
    "log_monitor",
    "autoscaler",
    "runtime_env",
    "default_worker",
    "mlflow",
    "postgres",
    "haproxy",
    "ray_jobs",
    "forkserver",
)


def kind_of(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return "kernel"
    if argv[0].startswith("ray::"):
        name = argv[0].split("(")[0].split(".")[0]
        return "ray::ServeReplica" if name.startswith(("ray::ServeReplica", "ray::SERVE_REPLICA")) else name
    line = " ".join(argv[:3])
    return next((k for k in KINDS if k in line), Path(argv[0]).name)


def cpu_seconds(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / HZ


def jiffies() -> tuple[int, int]:
    """(all jiffies, idle jiffies) of the machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def profile(command: list[str], interval_s: float = 0.5) -> dict:
    seen: dict[str, list] = {}  # pid -> [kind, cpu at first sample, latest cpu]
    first = True
    total0, idle0 = jiffies()
    start = time.monotonic()
    proc = subprocess.Popen(command)
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            if pid not in seen:
                seen[pid] = [kind_of(pid), cpu if first else 0.0, cpu]
            seen[pid][2] = cpu
            if seen[pid][0] in (None, "default_worker") or str(seen[pid][0]).startswith("ray::IDLE"):
                seen[pid][0] = kind_of(pid) or seen[pid][0]  # a pool worker becomes an actor later
        first = False
        if proc.poll() is not None:
            break
        time.sleep(interval_s)
    wall = time.monotonic() - start
    total1, idle1 = jiffies()
    by_kind: dict[str, dict] = {}
    for kind, cpu0, cpu in seen.values():
        row = by_kind.setdefault(kind or "?", {"cpu_s": 0.0, "processes": 0})
        row["cpu_s"] += cpu - cpu0
        row["processes"] += 1
    cores = os.cpu_count() or 1
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    cpu_total = sum(r["cpu_s"] for r in by_kind.values())
    return {
        "machine": f"{cores} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "command": command,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "cores": cores,
        "machine_busy": round(busy, 3),
        "cpu_s": round(cpu_total, 1),
        "wall_bound_s": round(cpu_total / cores, 1),
        "by_kind": {
            k: {"cpu_s": round(v["cpu_s"], 1), "processes": v["processes"]}
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["cpu_s"])
            if v["cpu_s"] >= 0.5
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    p.add_argument("command", nargs="*", help="the command to profile (after --)")
    args = p.parse_args(argv)
    report = profile(args.command or [sys.executable, "-m", "pytest", "-q", "-n", "2"])
    print(f"\nwall {report['wall_s']} s on {report['cores']} cores, machine busy {report['machine_busy']:.0%}")
    print(f"CPU {report['cpu_s']} s: no schedule of this work takes less than {report['wall_bound_s']} s")
    for kind, row in list(report["by_kind"].items())[:20]:
        print(f"{row['cpu_s']:9.1f} s  {row['processes']:5d}  {kind}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        from figures import render  # benchmarks/figures.py, beside this script

        print(f"figure: {render(args.out, report)}")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

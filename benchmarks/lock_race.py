"""How many waiters win one takeover of the gate lock: N processes see the same dead holder and try to take
its lease at the same moment, R rounds, per store (ray_jobs.registry_lock). Exactly one winner per round is
the lock's promise; zero is safe (they try again later); two or more is a double hold.

    python benchmarks/lock_race.py [--rounds 12] [--waiters 4] [--pg-uri postgresql+psycopg2://...] [--out F]

Stores: `sql` (the database compare-and-set) on a sqlite file and, with --pg-uri, on PostgreSQL (an empty
database: MLflow creates its tables); `api` (read, compare, write, read back through MLflow's client, as
beside an `mlflow server` without registry.lock_db_uri) with its read-back pause and without it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOCK = "race.gate-lock"


def _store(kind: str, uri: str, settle_s: float):
    from ray_jobs.registry_lock import _ApiLease, _SqlLease

    if kind == "sql":
        return _SqlLease(uri, LOCK)
    store = _ApiLease(uri, LOCK)
    store.SETTLE_S = settle_s
    return store


def _waiter(kind: str, uri: str, settle_s: float, folder: str, me: int, rounds: int) -> None:
    store = _store(kind, uri, settle_s)
    for r in range(rounds):
        while not (Path(folder) / f"go{r}").exists():
            time.sleep(0.002)
        won = store.swap(f"dead|{r}", f"waiter{me}|0")
        (Path(folder) / f"r{r}.{me}").write_text("won" if won else "lost")


def race(kind: str, uri: str, settle_s: float, rounds: int, waiters: int) -> dict:
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    Registry(RegistryConfig(tracking_uri=uri)).ping()  # the schema, once
    store = _store(kind, uri, settle_s)
    store.ensure()
    folder = tempfile.mkdtemp(prefix="lock-race-")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_waiter, args=(kind, uri, settle_s, folder, i, rounds)) for i in range(waiters)]
    for p in procs:
        p.start()
    winners = []
    for r in range(rounds):
        if kind == "sql":
            t, _ = store._row()
            store._update(t.c.value.isnot(None), f"dead|{r}")
        else:
            store.client.set_registered_model_tag(LOCK, "lease", f"dead|{r}")
        (Path(folder) / f"go{r}").touch()
        while len(list(Path(folder).glob(f"r{r}.*"))) < waiters:
            if not all(p.is_alive() for p in procs):
                raise SystemExit(f"a waiter died in round {r}")
            time.sleep(0.01)
        winners.append(sum(f.read_text() == "won" for f in Path(folder).glob(f"r{r}.*")))
    for p in procs:
        p.join(timeout=60)
    return {
        "rounds": rounds,
        "waiters": waiters,
        "exactly_one": winners.count(1),
        "none": winners.count(0),
        "two_or_more": sum(w >= 2 for w in winners),
        "winners": winners,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--waiters", type=int, default=4)
    ap.add_argument("--pg-uri", help="an empty PostgreSQL database (postgresql+psycopg2://user@host:port/db)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="lock-race-stores-")
    cases = [
        ("sql on sqlite", "sql", f"sqlite:///{tmp}/sql.db", 0.0),
        ("api on sqlite, read back after 0.25 s", "api", f"sqlite:///{tmp}/api.db", 0.25),
        ("api on sqlite, no read-back pause", "api", f"sqlite:///{tmp}/api0.db", 0.0),
    ]
    if args.pg_uri:
        cases.insert(1, ("sql on postgresql", "sql", args.pg_uri, 0.0))
    results = {}
    for name, kind, uri, settle in cases:
        results[name] = race(kind, uri, settle, args.rounds, args.waiters)
        r = results[name]
        print(
            f"{name:40s} exactly one winner {r['exactly_one']:3d}/{r['rounds']}  "
            f"none {r['none']:3d}  two or more {r['two_or_more']:3d}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The gate lock is held in the registry, so it excludes drivers in other processes (other nodes and
clusters behave alike: all they share is the registry). Real processes, a real sqlite MLflow store; the
tracking-server and multi-node cases are in tests/test_cluster_integration.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from ray_jobs.config import RegistryConfig
from ray_jobs.errors import RegistryError
from ray_jobs.registry import Registry


def _hold(uri: str, out: str, rounds: int, hold_s: float) -> None:
    """Take the lock `rounds` times, holding it `hold_s` each, and append (start, end) of each hold."""
    reg = Registry(RegistryConfig(tracking_uri=uri))
    for _ in range(rounds):
        with reg.lock(timeout_s=120, lease_s=30):
            start = time.time()
            time.sleep(hold_s)
            end = time.time()
        with open(out, "a") as f:
            f.write(json.dumps([start, end]) + "\n")


def _hold_until_told(uri: str, ready: str, go: str, out: str, lease_s: float) -> None:
    """Take the lock, say so, wait for `go`, then report whether the lease is still ours."""
    reg = Registry(RegistryConfig(tracking_uri=uri))
    with reg.lock(timeout_s=60, lease_s=lease_s) as lease:
        Path(ready).touch()
        while not Path(go).exists():
            time.sleep(0.05)
        try:
            lease.check()
            Path(out).write_text("held")
        except RegistryError as err:
            Path(out).write_text(f"lost: {err}")


@pytest.fixture
def uri(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Registry(RegistryConfig(tracking_uri=uri)).ping()  # create the schema once, not in two processes at once
    return uri


def _wait_for(path: Path, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.is_alive() and time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_two_processes_never_hold_the_gate_lock_at_once(uri, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "holds.jsonl"
    procs = [ctx.Process(target=_hold, args=(uri, str(out), 3, 0.4)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    holds = sorted(json.loads(line) for line in out.read_text().splitlines())
    assert len(holds) == 6
    for (_, end), (start, _) in zip(holds, holds[1:], strict=False):
        assert start >= end, f"two holders at once: {holds}"
    # Released each time: nothing of the lock is left in the registry.
    assert Registry(RegistryConfig(tracking_uri=uri)).client.search_registered_models() == []


def test_a_killed_holders_lock_is_taken_over_after_its_lease(uri, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = tmp_path / "ready"
    holder = ctx.Process(target=_hold_until_told, args=(uri, str(ready), str(tmp_path / "never"), "/dev/null", 2))
    holder.start()
    _wait_for(ready, holder)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: no release, no more heartbeats
    holder.join()
    reg = Registry(RegistryConfig(tracking_uri=uri))
    start = time.monotonic()
    with reg.lock(timeout_s=60, lease_s=2) as lease:
        lease.check()
        waited = time.monotonic() - start
    assert waited >= 2, "the dead holder's lease must run out before anyone takes the lock over"


def _stop_between_writes(pid: int, uri: str) -> None:
    """SIGSTOP `pid` at a moment when it holds no write transaction on the sqlite file: one frozen in
    the middle of its heartbeat's write would keep every other process out of the database (the
    embedded store's limit, not the lock's), and no takeover could happen until it resumed."""
    import sqlite3

    path = uri.removeprefix("sqlite:///")
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        conn = sqlite3.connect(path, timeout=0.5)
        try:
            conn.execute("BEGIN IMMEDIATE")  # fails while another connection holds the write lock
            conn.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            conn.close()
    pytest.fail("the holder never paused between two writes")


def test_a_live_holder_keeps_its_lock_and_a_stalled_one_learns_it_lost_it(uri, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = tmp_path / "ready", tmp_path / "go", tmp_path / "out"
    holder = ctx.Process(target=_hold_until_told, args=(uri, str(ready), str(go), str(out), 1))
    holder.start()
    _wait_for(ready, holder)
    reg = Registry(RegistryConfig(tracking_uri=uri))
    # Alive and renewing (every 0.25 s): a waiter gives up rather than take it (four leases long).
    with pytest.raises(RegistryError, match="timed out .* gate lock"):
        with reg.lock(timeout_s=4, lease_s=1):
            pass
    # Stalled (SIGSTOP: a frozen VM, a long GC pause): its lease runs out and a waiter takes over.
    _stop_between_writes(holder.pid, uri)
    try:
        with reg.lock(timeout_s=60, lease_s=1):
            os.kill(holder.pid, signal.SIGCONT)
            go.touch()
            holder.join(timeout=30)
    finally:
        if holder.is_alive():
            os.kill(holder.pid, signal.SIGCONT)
    # The old holder, resumed, must not write aliases: its check() says the lock is gone.
    assert out.read_text().startswith("lost:"), out.read_text()

"""The gate lock is held in the registry, so it excludes drivers in other processes (other nodes and
clusters behave alike: all they share is the registry). Real processes, real stores: a sqlite file, and
for what rests on the database's own atomicity a PostgreSQL server of its own too (skipped where this
machine has none); the tracking-server and multi-node case is in tests/test_cluster_jobs.py."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from ray_jobs.config import RegistryConfig
from ray_jobs.errors import RegistryError
from ray_jobs.registry import CHAMPION, Registry
from ray_jobs.registry_lock import LEASE_TAG, GateLease, _SqlLease

# Real processes and a database server: not the quick lane.
pytestmark = pytest.mark.integration

LOCK = "sentiment-distilbert.gate-lock"


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


def _write_after_go(uri: str, ready: str, go: str, out: str, version: str, inside: bool) -> None:
    """Take the lock and check it; say so from before the write (inside=False) or from inside the
    fenced writes (inside=True); wait for `go`; then set the champion alias to `version`."""
    reg = Registry(RegistryConfig(tracking_uri=uri))
    with reg.lock(timeout_s=60, lease_s=1) as lease:
        lease.check()
        try:
            if inside:
                with lease.fenced() as w:
                    Path(ready).touch()
                    while not Path(go).exists():
                        time.sleep(0.05)
                    reg.set_aliases(version, None, w)
            else:
                Path(ready).touch()
                while not Path(go).exists():
                    time.sleep(0.05)
                with lease.fenced() as w:
                    reg.set_aliases(version, None, w)
            Path(out).write_text("written")
        except RegistryError as err:
            Path(out).write_text(f"lost: {err}")


def _race(uri: str, lease_s: float, rounds: int, folder: str, me: int) -> None:
    """Each round: wait for the round's start, then try to take over the dead holder `dead|<round>`."""
    reg = Registry(RegistryConfig(tracking_uri=uri))
    lease = GateLease(reg, lease_s)
    lease.store.ensure()
    for r in range(rounds):
        while not (Path(folder) / f"go{r}").exists():
            time.sleep(0.002)
        won = lease.store.swap(f"dead|{r}", lease._value("0"))
        (Path(folder) / f"r{r}.{me}").write_text("won" if won else "lost")


def _store_uri(request, tmp_path, kind: str) -> str:
    if kind == "sqlite":
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    else:
        server, why = request.getfixturevalue("postgres")
        if server is None:
            pytest.skip(why)
        import psycopg2

        db = f"lock_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(server)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {db}")
        conn.close()
        # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3; name the driver installed here.
        uri = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://") + f"/{db}"
    Registry(RegistryConfig(tracking_uri=uri)).ping()  # create the schema once, not in two processes at once
    return uri


@pytest.fixture
def uri(request, tmp_path):
    """The lease's behaviour over time (waiting, renewing, expiring): the same code on every backend."""
    return _store_uri(request, tmp_path, "sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_uri(request, tmp_path):
    """What rests on the database's own atomicity (the compare-and-set, fenced writes): on each backend."""
    return _store_uri(request, tmp_path, request.param)


def _wait_for(path: Path, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.is_alive() and time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _spawn_holder(target, uri: str, tmp_path: Path, *extra):
    """A holder process running target(uri, ready, go, out, *extra), once it has said `ready`."""
    ready, go, out = tmp_path / "ready", tmp_path / "go", tmp_path / "out"
    args = (uri, str(ready), str(go), str(out), *extra)
    holder = multiprocessing.get_context("spawn").Process(target=target, args=args)
    holder.start()
    _wait_for(ready, holder)
    return holder, go, out


@contextlib.contextmanager
def _frozen(holder, uri: str | None = None):
    """The holder SIGSTOPped (between two of its writes where `uri` names the store), never left so."""
    if uri is None:
        os.kill(holder.pid, signal.SIGSTOP)
    else:
        _stop_between_writes(holder.pid, uri)
    try:
        yield
    finally:
        if holder.is_alive():
            os.kill(holder.pid, signal.SIGCONT)


def _resume(holder, go: Path) -> None:
    os.kill(holder.pid, signal.SIGCONT)
    go.touch()
    holder.join(timeout=30)


def _lease_value(uri: str) -> str:
    return _SqlLease(uri, LOCK).read()


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
    # Released each time: the lock's registered model stays, its lease is free.
    lock = Registry(RegistryConfig(tracking_uri=uri)).client.get_registered_model(LOCK)
    assert lock.tags == {LEASE_TAG: ""} and not lock.latest_versions


def test_waiters_taking_over_one_dead_lease_exactly_one_wins(db_uri, tmp_path):
    """The takeover is a compare-and-set: four processes that saw the same dead holder try at the same
    moment, twelve times over; each time exactly one of them holds the lease."""
    ctx = multiprocessing.get_context("spawn")
    waiters, rounds = 4, 12
    store = _SqlLease(db_uri, LOCK)
    store.ensure()
    procs = [ctx.Process(target=_race, args=(db_uri, 1, rounds, str(tmp_path), i)) for i in range(waiters)]
    for p in procs:
        p.start()
    try:
        for r in range(rounds):
            store._update(store._row()[0].c.value.isnot(None), f"dead|{r}")  # a holder that died holding it
            (tmp_path / f"go{r}").touch()
            deadline = time.time() + 120
            while len(list(tmp_path.glob(f"r{r}.*"))) < waiters:
                assert time.time() < deadline and all(p.is_alive() for p in procs), f"round {r} never finished"
                time.sleep(0.01)
            results = [f.read_text() for f in tmp_path.glob(f"r{r}.*")]
            assert results.count("won") == 1, f"round {r}: {results}"
            assert _lease_value(db_uri).endswith("|0") and not _lease_value(db_uri).startswith("dead|")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


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
    """SIGSTOP `pid` at a moment when its heartbeat is not in the middle of a write: a process frozen
    inside a write transaction keeps the lease row locked (PostgreSQL) or the whole file (SQLite), and
    no takeover can happen until it resumes (by design: see test_a_takeover_waits_for_...)."""
    import sqlalchemy

    store = _SqlLease(uri, LOCK)
    t, where = store._row()
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        try:
            with store._session(0.2) as session:  # rewrites the row unchanged, then rolls back: needs its lock
                session.execute(sqlalchemy.update(t).where(where).values(value=t.c.value))
            return
        except sqlalchemy.exc.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    pytest.fail("the holder never paused between two writes")


def test_a_live_holder_keeps_its_lock_and_a_stalled_one_learns_it_lost_it(uri, tmp_path):
    holder, go, out = _spawn_holder(_hold_until_told, uri, tmp_path, 1)
    reg = Registry(RegistryConfig(tracking_uri=uri))
    # Alive and renewing (every 0.25 s): a waiter gives up rather than take it (four leases long).
    with pytest.raises(RegistryError, match="timed out .* gate lock"):
        with reg.lock(timeout_s=4, lease_s=1):
            pass
    # Stalled (SIGSTOP: a frozen VM, a long GC pause): its lease runs out and a waiter takes over.
    with _frozen(holder, uri), reg.lock(timeout_s=60, lease_s=1):
        _resume(holder, go)
    # The old holder, resumed, must not write aliases: its check() says the lock is gone.
    assert out.read_text().startswith("lost:"), out.read_text()


def _two_versions(uri: str, folder: Path) -> Registry:
    reg = Registry(RegistryConfig(tracking_uri=uri))
    reg.client.create_registered_model(reg.name)
    for _ in range(2):
        reg.client.create_model_version(reg.name, source=str(folder))
    return reg


def test_a_holder_paused_after_its_check_cannot_move_an_alias(db_uri, tmp_path):
    """Fencing: a holder that checked its lease, then froze past it, is refused at the write itself
    (a check and a write are not atomic; the fenced write is)."""
    reg = _two_versions(db_uri, tmp_path)
    holder, go, out = _spawn_holder(_write_after_go, db_uri, tmp_path, "1", False)  # checked, about to write
    with _frozen(holder, db_uri):
        with reg.lock(timeout_s=60, lease_s=1) as lease:  # taken over after a lease of silence
            with lease.fenced() as w:
                reg.set_aliases("2", None, w)
            _resume(holder, go)  # while the new holder still holds the lock
    assert out.read_text().startswith("lost: lost the gate lock"), out.read_text()
    assert reg.alias_version(CHAMPION) == "2", "the stalled holder moved the alias after losing the lease"


def test_a_takeover_waits_for_a_holder_inside_its_writes(db_uri, tmp_path):
    """The other half: a holder frozen inside its fenced writes keeps the lease row locked, so no waiter
    takes over between its check and its write; the writes land, then the waiter gets the lock."""
    reg = _two_versions(db_uri, tmp_path)
    holder, go, out = _spawn_holder(_write_after_go, db_uri, tmp_path, "1", True)  # inside its writes
    with _frozen(holder):
        with pytest.raises(RegistryError, match="timed out .* gate lock"):
            with reg.lock(timeout_s=5, lease_s=1):  # five leases of silence, and still no takeover
                pass
        _resume(holder, go)
    assert out.read_text() == "written"
    assert reg.alias_version(CHAMPION) == "1"
    with reg.lock(timeout_s=10, lease_s=1) as lease:  # released by the holder: free at once
        with lease.fenced() as w:
            reg.set_aliases("2", "1", w)
    assert reg.aliases() == {"champion": "2", "previous": "1"}

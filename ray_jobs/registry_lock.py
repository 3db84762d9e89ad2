"""The gate's lock: an exclusive lease on a registered model's aliases, held in the MLflow store itself, so
that it holds for every driver that shares the registry (on other nodes, in other clusters).

The lease is one value: the tag `lease` of a registered model `<name>.gate-lock` (kept, with no versions),
empty while free and `<owner>|<nonce>` while held. The holder writes a new nonce every lease_s/4 (its
heartbeat); a waiter that sees one value unchanged for lease_s of its own clock takes the lease over, so
host clocks need not agree. Every change of the value is a compare-and-set ("write v2 if it is still v1"),
and writes under the lock go through `GateLease.fenced()`.

How exact that is depends on what the driver reaches (docs/cluster.md, "Gate decisions from many drivers"):
- **A database** (the tracking URI is sqlite:///, postgresql://, mysql:// or mssql://, or
  `registry.lock_db_uri` names the database behind an MLflow server): exact. A compare-and-set is one
  `UPDATE ... WHERE value = v1`, so of two waiters that saw the same dead holder exactly one matches the
  row. `fenced()` is one transaction that first rewrites the lease row where its owner is this holder,
  then runs MLflow's own store code for the writes: PostgreSQL and MySQL keep that row locked, SQLite its
  write lock, until the writes commit. A takeover therefore lands before them (they are refused and
  rolled back) or after them, never between.
- **An MLflow server over HTTP only, or a file store**: the same protocol through MLflow's API, whose
  writes are unconditional (read, compare, write, read back). Holders that are alive and renewing exclude
  each other; two waiters that take over one dead holder within a round trip of each other, or a holder
  stalled between its check and its write past the lease, can still overlap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Protocol

from ray_jobs.errors import RegistryError

log = logging.getLogger(__name__)

LEASE_TAG = "lease"
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
CAS_WAIT_S = 2.0  # how long a compare-and-set waits for a row (or SQLite's write lock) that a holder writes under


def is_database_uri(uri: str) -> bool:
    """A SQLAlchemy URL of a database MLflow stores in (postgresql+psycopg2://... included)."""
    scheme = uri.partition("://")[0].split("+")[0].lower()
    return "://" in uri and scheme in DB_SCHEMES


class Writes(Protocol):
    """Writes to one registered model under the lock (from `GateLease.fenced()`)."""

    def set_alias(self, alias: str, version: str) -> None: ...
    def delete_alias(self, alias: str) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def delete_tag(self, key: str) -> None: ...


class GateLease:
    """The registry-held lock of `Registry.lock` (see there and this module's docstring)."""

    def __init__(self, reg, lease_s: float, lock_name: str | None = None):
        # reg: the ray_jobs.registry.Registry whose lock this is (not imported: that module imports this one)
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.reg, self.lease_s = reg, lease_s
        self.lock_name = lock_name = lock_name or reg.lock_name  # another name: another lock (one retraining)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        reg.client  # noqa: B018 - creates the embedded store's folder, which the lock's store opens too
        db_uri = reg.cfg.lock_db_uri or (reg.uri if is_database_uri(reg.uri) else None)
        self.store: _SqlLease | _ApiLease = _SqlLease(db_uri, lock_name) if db_uri else _ApiLease(reg.uri, lock_name)
        self._stop = threading.Event()
        self._lost: str | None = None
        self._beat: threading.Thread | None = None

    def _value(self, nonce: str) -> str:
        return f"{self.owner}|{nonce}"

    def acquire(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.reg._call("create the gate lock", self.store.ensure)
        seen: str | None = None  # the value last seen, and since when it has not moved
        seen_since = time.monotonic()
        waited = False
        while True:
            value = self.reg._call("read the gate lock", self.store.read)
            now = time.monotonic()
            if value == "":
                if self.reg._call("take the gate lock", self.store.swap, "", self._value("0")):
                    break
                # Another waiter took it first (or a write held the row): read who, after the pause.
            elif value != seen:
                seen, seen_since = value, now
            elif now - seen_since > self.lease_s:
                log.warning("gate lock of %s not renewed for %.0f s: taking it over", _owner(seen), now - seen_since)
                if self.reg._call("take over the gate lock", self.store.swap, seen, self._value("0")):
                    break
                seen = None  # someone else did, or the holder came back: start counting again
            if not waited:
                log.info("waiting for the lock %s (held by %s)", self.lock_name, _owner(value))
                waited = True
            if now > deadline:
                raise RegistryError(
                    f"timed out after {timeout_s:.0f} s waiting for the gate lock {self.lock_name} "
                    f"(held by {_owner(value)})"
                )
            time.sleep(0.2 + 0.3 * (uuid.uuid4().int % 100) / 100)  # jitter: waiters do not poll in step
        self._beat = threading.Thread(target=self._heartbeat, name="gate-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        beat = 0
        while not self._stop.wait(self.lease_s / 4):
            beat += 1
            try:
                if not self.store.swap_owned(self.owner, self._value(str(beat))):
                    self._lost = f"taken over by {_owner(self.store.read())}"
                    return
            except Exception as err:  # noqa: BLE001 - one missed beat is not a lost lease; fenced() decides
                log.warning("gate lock heartbeat failed: %s: %s", type(err).__name__, str(err)[:200])

    def check(self) -> None:
        """Raise RegistryError unless this process still holds the lock (an early way out; the writes
        themselves go through `fenced()`, which checks again in their own transaction)."""
        value = self.reg._call("read the gate lock", self.store.read)
        if self._lost or _owner(value) != self.owner:
            why = self._lost or f"now held by {_owner(value)}"
            raise RegistryError(f"lost the gate lock {self.lock_name} ({why})")

    @contextlib.contextmanager
    def fenced(self) -> Iterator[Writes]:
        """Writes to the registered model that happen only while this process holds the lock: all of them
        or none (a database store), refused with RegistryError if the lease was taken over."""
        if self._lost:
            raise RegistryError(f"lost the gate lock {self.lock_name} ({self._lost})")
        try:
            with self.store.fenced(self.owner, self._value(uuid.uuid4().hex[:8]), self.reg.name) as writes:
                yield writes
        except LeaseLost as err:
            raise RegistryError(
                f"lost the gate lock {self.lock_name} (now held by {err.holder}): nothing written"
            ) from None

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        try:
            self.store.swap_owned(self.owner, "")
        except Exception as err:  # noqa: BLE001 - the lease expires by itself; say so and go on
            log.warning("could not release the gate lock (it expires in %.0f s): %s", self.lease_s, err)


class LeaseBusy(Exception):
    """A compare-and-set that could not be tried: the row is held by a transaction (the holder's writes)."""


class LeaseLost(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _owner(value: str | None) -> str:
    return (value or "").rpartition("|")[0] or "nobody"


def _lock_description(lock_name: str) -> str:
    model = lock_name.rsplit(".", 1)[0]
    return f"gate lock of {model}: its tag '{LEASE_TAG}' names the driver deciding (ray_jobs.registry_lock)"


def already_exists(err: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(err, "error_code", "")) or "already exists" in str(err).lower()


def does_not_exist(err: Exception) -> bool:
    text = f"{getattr(err, 'error_code', '')} {err}".lower()
    return "resource_does_not_exist" in text or "not found" in text or "does not exist" in text


# ---------------------------------------------------------------------------------------- a database
@functools.cache
def _sql_store(db_uri: str):
    """MLflow's own registry store on `db_uri` (one per process: it creates the tables where missing)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore(db_uri)


class _SqlLease:
    """The lease as one row of MLflow's `registered_model_tags`, changed only by conditional UPDATEs."""

    def __init__(self, db_uri: str, lock_name: str):
        self.db_uri, self.lock_name = db_uri, lock_name

    @property
    def _store(self):
        return _sql_store(self.db_uri)

    def _row(self):
        from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelTag

        t = SqlRegisteredModelTag.__table__
        return t, (t.c.name == self.lock_name) & (t.c.key == LEASE_TAG)

    @contextlib.contextmanager
    def _session(self, wait_s: float):
        """A session whose writes wait at most wait_s for a locked row (or SQLite's write lock)."""
        import sqlalchemy
        from sqlalchemy.orm import Session

        engine = self._store.engine
        with Session(engine) as session:
            dialect = engine.dialect.name
            if dialect == "sqlite":
                session.execute(sqlalchemy.text("PRAGMA foreign_keys = ON"))
                session.execute(sqlalchemy.text(f"PRAGMA busy_timeout = {int(wait_s * 1000)}"))
            elif dialect == "postgresql":
                session.execute(sqlalchemy.text(f"SET LOCAL lock_timeout = '{int(wait_s * 1000)}ms'"))
            elif dialect == "mysql":
                session.execute(sqlalchemy.text(f"SET SESSION innodb_lock_wait_timeout = {max(1, int(wait_s))}"))
            yield session

    def ensure(self) -> None:
        """Create the lock's registered model and its free lease row, once (concurrent creators are fine).
        Reads first: on SQLite a create would wait for a holder's write transaction to end."""
        import sqlalchemy
        from mlflow.entities.model_registry import RegisteredModelTag
        from mlflow.exceptions import MlflowException

        t, where = self._row()
        with self._session(CAS_WAIT_S) as session:
            if session.execute(sqlalchemy.select(t.c.value).where(where)).first() is not None:
                return
        try:
            self._store.create_registered_model(
                self.lock_name, tags=[RegisteredModelTag(LEASE_TAG, "")], description=_lock_description(self.lock_name)
            )
            return
        except MlflowException as err:
            if not already_exists(err):
                raise
        with self._session(20) as session:
            try:  # a lock model from before the lease tag: give it a free lease (a plain INSERT: one wins)
                session.execute(sqlalchemy.insert(t).values(name=self.lock_name, key=LEASE_TAG, value=""))
                session.commit()
            except sqlalchemy.exc.IntegrityError:
                session.rollback()

    def read(self) -> str:
        import sqlalchemy

        t, where = self._row()
        with self._session(CAS_WAIT_S) as session:
            row = session.execute(sqlalchemy.select(t.c.value).where(where)).first()
        return "" if row is None or row[0] is None else row[0]

    def _update(self, condition, new: str) -> bool:
        """True if the row matched `condition` and now holds `new`; LeaseBusy if it could not be tried."""
        import sqlalchemy

        t, where = self._row()
        try:
            with self._session(CAS_WAIT_S) as session:
                matched = session.execute(sqlalchemy.update(t).where(where & condition).values(value=new)).rowcount
                session.commit()
        except sqlalchemy.exc.OperationalError as err:
            # The row is locked by a holder writing under the lock (or SQLite's file by any writer).
            raise LeaseBusy(str(err.orig)[:160]) from None
        return matched == 1

    def swap(self, expected: str, new: str) -> bool:
        t, _ = self._row()
        try:
            return self._update(t.c.value == expected, new)
        except LeaseBusy as err:
            # Not done: the caller reads again and, if it still must, tries again.
            log.info("gate lock busy (%s): not taken this time", err)
            return False

    def _owned_by(self, owner: str):
        t, _ = self._row()
        return t.c.value.startswith(f"{owner}|", autoescape=True)

    def swap_owned(self, owner: str, new: str) -> bool:
        return self._update(self._owned_by(owner), new)

    @contextlib.contextmanager
    def fenced(self, owner: str, new: str, model: str) -> Iterator[Writes]:
        import sqlalchemy

        t, where = self._row()
        # Waits as long as MLflow's own sessions would for SQLite's write lock: the heartbeat's short writes
        # must not fail a decision.
        with self._session(20) as session:
            # A new nonce (not value = value): MySQL counts only rows whose value changed.
            mine = self._owned_by(owner)
            if session.execute(sqlalchemy.update(t).where(where & mine).values(value=new)).rowcount != 1:
                session.rollback()
                raise LeaseLost(_owner(self.read()))
            # From here the lease row is locked by this transaction (SQLite: the whole file) until commit.
            store = copy.copy(self._store)
            store.ManagedSessionMaker = lambda read_only=True: contextlib.nullcontext(session)
            yield _StoreWrites(store, model)
            session.commit()


class _StoreWrites:
    """MLflow's SqlAlchemyStore methods, run inside the fenced transaction."""

    def __init__(self, store, model: str):
        self.store, self.model = store, model

    def set_alias(self, alias: str, version: str) -> None:
        self.store.set_registered_model_alias(self.model, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self.store.delete_registered_model_alias(self.model, alias)

    def set_tag(self, key: str, value: str) -> None:
        from mlflow.entities.model_registry import RegisteredModelTag

        self.store.set_registered_model_tag(self.model, RegisteredModelTag(key, value))

    def delete_tag(self, key: str) -> None:
        self.store.delete_registered_model_tag(self.model, key)


# ------------------------------------------------------------------------------ MLflow's API only
class _ApiLease:
    """The lease through MLflow's client (an MLflow server, a file store): unconditional writes, so each
    compare-and-set is read, compare, write, read back (best effort: the module docstring says what holds)."""

    SETTLE_S = 0.25  # a competing writer that read the same value has written by then, in the usual case

    def __init__(self, uri: str, lock_name: str):
        from mlflow import MlflowClient

        self.client, self.lock_name = MlflowClient(uri, uri), lock_name

    def ensure(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.lock_name, tags={LEASE_TAG: ""}, description=_lock_description(self.lock_name)
            )
        except MlflowException as err:
            if not already_exists(err):
                raise

    def read(self) -> str:
        return (self.client.get_registered_model(self.lock_name).tags or {}).get(LEASE_TAG, "")

    def swap(self, expected: str, new: str) -> bool:
        if self.read() != expected:
            return False
        self.client.set_registered_model_tag(self.lock_name, LEASE_TAG, new)
        time.sleep(self.SETTLE_S)
        return self.read() == new

    def swap_owned(self, owner: str, new: str) -> bool:
        if _owner(self.read()) != owner:
            return False
        self.client.set_registered_model_tag(self.lock_name, LEASE_TAG, new)
        return True

    @contextlib.contextmanager
    def fenced(self, owner: str, new: str, model: str) -> Iterator[Writes]:
        if not self.swap_owned(owner, new):
            raise LeaseLost(_owner(self.read()))
        yield _ClientWrites(self.client, model)


class _ClientWrites:
    def __init__(self, client, model: str):
        self.client, self.model = client, model

    def _ignore_missing(self, fn, *args) -> None:
        from mlflow.exceptions import MlflowException

        try:
            fn(self.model, *args)
        except MlflowException as err:
            if not does_not_exist(err):
                raise

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.model, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self._ignore_missing(self.client.delete_registered_model_alias, alias)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_registered_model_tag(self.model, key, value)

    def delete_tag(self, key: str) -> None:
        self._ignore_missing(self.client.delete_registered_model_tag, key)

"""The durable prediction and feedback log: what the live evidence store (serve_app.rollout) knows, in a
database, so that a killed store, a redeploy or a cluster restart loses no label.

Two tables, keyed by the Serve app's name so that several apps can share one database:
- `evidence_predictions`: one row per (request id, version): the slot (champion | challenger), whether that
  version's answer was the one sent, its label and P(positive), the time, the text's digest, and the text
  itself only where `serve.log_texts` is on.
- `evidence_labels`: one row per labelled request id: the true label and when it came. The first label
  stands (a second is refused by the store before it gets here; the insert ignores a duplicate anyway).

Only the store writes (one process: SQLite's single writer suits it), in batches off the response path
(`LogWriter`).
Every insert is INSERT ... ON CONFLICT DO NOTHING, so a batch written twice (a retry after a timeout)
changes nothing: hence SQLite or PostgreSQL, the two dialects whose insert has it in SQLAlchemy.
Blocking calls: the store runs them in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

from ray_jobs.config import EvidenceLogConfig, mask_password
from ray_jobs.errors import ConfigError

log = logging.getLogger(__name__)

_meta = sa.MetaData()
PREDICTIONS = sa.Table(
    "evidence_predictions",
    _meta,
    sa.Column("app", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("slot", sa.String(16), nullable=False),
    sa.Column("answered", sa.Boolean, nullable=False),
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("p_positive", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("t", sa.Float, nullable=False),
    sa.Column("text_digest", sa.String(32), nullable=False),
    sa.Column("text", sa.Text, nullable=True),
    sa.Index("evidence_predictions_by_time", "app", "t"),
)
LABELS = sa.Table(
    "evidence_labels",
    _meta,
    sa.Column("app", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("t", sa.Float, nullable=False),
    sa.Index("evidence_labels_by_time", "app", "t"),
)


class Prediction(NamedTuple):
    """One version's answer to one request, as the log keeps it."""

    request_id: str
    version: str
    slot: str
    answered: bool
    label: int
    p_positive: float
    seconds: float
    t: float
    text_digest: str
    text: str | None = None


class Label(NamedTuple):
    request_id: str
    label: int
    t: float


def _insert(dialect: str):
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise ConfigError(f"the evidence log takes SQLite or PostgreSQL, not {dialect}")
    return insert


class EvidenceLog:
    """The log of one Serve app in the database at `uri` (tables created if missing)."""

    def __init__(self, uri: str, app: str):
        self.app = app
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if uri.startswith("sqlite"):
            # The store's event loop hands calls to worker threads: one connection shared by them.
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        try:
            self.engine = sa.create_engine(uri, **kwargs)
            self._insert = _insert(self.engine.dialect.name)
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_wal)
            _meta.create_all(self.engine)
        except sa.exc.SQLAlchemyError as err:
            raise ConfigError(f"the evidence log at {mask_password(uri)} cannot be opened: {err}") from None

    def write(self, predictions: Sequence[Prediction], labels: Sequence[Label] = ()) -> None:
        """Both in one transaction: a label is never kept without the predictions that came before it."""
        with self.engine.begin() as conn:
            if predictions:
                rows = [{"app": self.app, **p._asdict()} for p in predictions]
                conn.execute(self._insert(PREDICTIONS).on_conflict_do_nothing(), rows)
            if labels:
                rows = [{"app": self.app, **lab._asdict()} for lab in labels]
                conn.execute(self._insert(LABELS).on_conflict_do_nothing(), rows)

    def find(self, request_id: str) -> tuple[list[Prediction], int | None]:
        """A request's predictions (one per version that scored it) and its label, if any."""
        with self.engine.connect() as conn:
            preds = conn.execute(
                sa.select(*_prediction_columns()).where(
                    PREDICTIONS.c.app == self.app, PREDICTIONS.c.request_id == request_id
                )
            ).all()
            label = conn.execute(
                sa.select(LABELS.c.label).where(LABELS.c.app == self.app, LABELS.c.request_id == request_id)
            ).scalar()
        return [Prediction(*row) for row in preds], label

    def recent(self, since: float, limit: int) -> tuple[list[Prediction], dict[str, int]]:
        """The newest `limit` predictions since `since` (oldest first), and the labels of their requests:
        what a restarted store loads."""
        with self.engine.connect() as conn:
            newest = (
                sa.select(*_prediction_columns())
                .where(PREDICTIONS.c.app == self.app, PREDICTIONS.c.t >= since)
                .order_by(PREDICTIONS.c.t.desc())
                .limit(limit)
                .subquery()
            )
            preds = [Prediction(*row) for row in conn.execute(sa.select(newest).order_by(newest.c.t)).all()]
            labels = dict(
                conn.execute(
                    sa.select(LABELS.c.request_id, LABELS.c.label).where(LABELS.c.app == self.app, LABELS.c.t >= since)
                ).all()
            )
        return preds, labels

    def paired(self, champion: str, challenger: str, since: float, limit: int | None = None) -> dict[str, list]:
        """The labelled requests both versions scored, in the order their labels came (the first `limit`):
        ids, true labels and each version's label. What live F1 and `registry promote` are computed on."""
        ch, cl = PREDICTIONS.alias("ch"), PREDICTIONS.alias("cl")
        query = (
            sa.select(LABELS.c.request_id, LABELS.c.label, ch.c.label, cl.c.label, LABELS.c.t)
            .join(ch, sa.and_(ch.c.app == LABELS.c.app, ch.c.request_id == LABELS.c.request_id))
            .join(cl, sa.and_(cl.c.app == LABELS.c.app, cl.c.request_id == LABELS.c.request_id))
            .where(LABELS.c.app == self.app, ch.c.version == champion, cl.c.version == challenger, LABELS.c.t >= since)
            .order_by(LABELS.c.t, LABELS.c.request_id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            "request_ids": [r[0] for r in rows],
            "labels": [int(r[1]) for r in rows],
            "champion": [int(r[2]) for r in rows],
            "challenger": [int(r[3]) for r in rows],
            "labelled_at": [float(r[4]) for r in rows],
        }

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            n_pred = conn.execute(sa.select(sa.func.count()).where(PREDICTIONS.c.app == self.app)).scalar()
            n_lab = conn.execute(sa.select(sa.func.count()).where(LABELS.c.app == self.app)).scalar()
        return {"predictions": int(n_pred or 0), "labels": int(n_lab or 0)}

    def prune(self, before: float) -> int:
        """Delete what is older than `before` (serve.feedback.retention_s); the rows deleted."""
        with self.engine.begin() as conn:
            n = conn.execute(sa.delete(PREDICTIONS).where(PREDICTIONS.c.app == self.app, PREDICTIONS.c.t < before))
            m = conn.execute(sa.delete(LABELS).where(LABELS.c.app == self.app, LABELS.c.t < before))
        return int(n.rowcount or 0) + int(m.rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()


def _prediction_columns() -> Iterable[sa.Column]:
    return [PREDICTIONS.c[name] for name in Prediction._fields]


def _sqlite_wal(dbapi_conn, _record) -> None:
    # WAL: readers (a promote's evidence query) do not wait for the writer. synchronous=NORMAL keeps every
    # committed transaction through a killed process (not through a power cut), at a fraction of FULL's fsyncs.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class LogUnavailable(RuntimeError):
    """The durable log could not take a write."""


class LogWriter:
    """Write-behind to an EvidenceLog from an asyncio event loop (the store's): predictions wait in a
    bounded queue and go in one transaction every `flush_s`; a label goes at once, with whatever
    predictions wait, and its caller resumes when the database has it. Blocking calls run in a thread.
    Started on the first call (no loop runs yet when the store is built)."""

    def __init__(self, log: EvidenceLog, cfg: EvidenceLogConfig, retention_s: float):
        self.log, self.cfg, self.retention_s = log, cfg, retention_s
        self.pending: collections.deque[Prediction] = collections.deque()
        self._labels: list[tuple[Label, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._write_lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._pruned_at = time.time()
        self.stats: dict[str, Any] = {"written": 0, "dropped": 0, "errors": 0, "last_error": None, "pruned": 0}

    def add(self, predictions: Iterable[Prediction]) -> None:
        self.pending.extend(predictions)
        over = len(self.pending) - self.cfg.max_pending
        if over > 0:
            for _ in range(over):
                self.pending.popleft()
            self.stats["dropped"] += over
            log.warning("evidence log: %d predictions dropped, the database is behind (max_pending)", over)
        self._start()

    async def label(self, label: Label) -> None:
        """Returns once the label (and the predictions before it) is in the database; else LogUnavailable."""
        self._start()
        done = asyncio.get_running_loop().create_future()
        self._labels.append((label, done))
        self._wake.set()  # labels do not wait for the next tick: one write takes every label waiting
        await done

    async def flush(self) -> None:
        """Write what waits, in one transaction. On failure the predictions wait again (bounded) and the
        labels' callers get LogUnavailable."""
        self._start()
        async with self._write_lock:
            preds = list(self.pending)
            self.pending.clear()
            waiting, self._labels = self._labels, []
            if not preds and not waiting:
                return
            try:
                await asyncio.to_thread(self.log.write, preds, [lab for lab, _ in waiting])
            except Exception as err:  # noqa: BLE001 - reported at /challenger, predictions retried
                self.stats["errors"] += 1
                self.stats["last_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                log.warning("evidence log: write failed, %d predictions kept for retry: %s", len(preds), err)
                self.pending.extendleft(reversed(preds))
                self.add(())  # the bound again
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(LogUnavailable(self.stats["last_error"]))
                return
            self.stats["written"] += len(preds)
            for _, done in waiting:
                if not done.done():
                    done.set_result(None)

    def report(self, uri: str) -> dict[str, Any]:
        return {"uri": mask_password(uri), "pending": len(self.pending), **self.stats}

    def _start(self) -> None:
        if self._wake is None:
            self._wake, self._write_lock = asyncio.Event(), asyncio.Lock()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.cfg.flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()
            if time.time() - self._pruned_at > self.cfg.prune_every_s:
                self._pruned_at = time.time()
                try:
                    self.stats["pruned"] += await asyncio.to_thread(self.log.prune, time.time() - self.retention_s)
                except Exception as err:  # noqa: BLE001 - tried again at the next interval
                    log.warning("evidence log: pruning failed: %s", err)

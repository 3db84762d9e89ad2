"""The durable prediction and feedback log: what the live evidence store (serve_app.evidence_store) knows,
in a database, so that a killed store, a redeploy or a cluster restart loses no label; and what the
retrain command (ray_jobs.retrain) reads back.

Two tables, keyed by the Serve app's name so that several apps can share one database:
- `evidence_predictions`: one row per (request id, version): the slot (champion | challenger), whether that
  version's answer was the one sent, its label and P(positive), the time, the text's digest, and the text
  itself only where `serve.log_texts` is on.
- `evidence_labels`: one row per labelled request id: the true label and when it came. The first label
  stands (a second is refused by the store before it gets here; the insert ignores a duplicate anyway).

Only the store writes (one process: SQLite's single writer suits it), in batches off the response path
(serve_app.log_writer).
Every insert is INSERT ... ON CONFLICT DO NOTHING, so a batch written twice (a retry after a timeout)
changes nothing: hence SQLite or PostgreSQL, the two dialects whose insert has it in SQLAlchemy.
Blocking calls: the store runs them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa

from ray_jobs.config import mask_password
from ray_jobs.errors import ConfigError

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
        self.app, self.uri = app, mask_password(uri)  # the URI as reports may show it
        try:
            url = sa.engine.make_url(uri)
            self._insert = _insert(url.get_backend_name())
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.get_backend_name() == "sqlite":
                # The store's event loop hands calls to worker threads: one connection shared by them.
                kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
                if url.database and url.database != ":memory:":
                    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, **kwargs)
            if url.get_backend_name() == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_wal)
            _meta.create_all(self.engine)
        except (sa.exc.SQLAlchemyError, OSError) as err:
            raise ConfigError(f"the evidence log at {self.uri} cannot be opened: {err}") from None

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

    def labels_since(self, since: float) -> int:
        """Labels that arrived after `since` (the retrain trigger's count)."""
        with self.engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).where(LABELS.c.app == self.app, LABELS.c.t > since)).scalar()
        return int(n or 0)

    def labelled_texts(self, until: float) -> list[tuple[str, str, int]]:
        """(request id, text, true label) of every labelled request whose answered prediction kept its text
        (serve.log_texts), labelled up to `until`, in the order the labels came."""
        p = PREDICTIONS
        query = (
            sa.select(LABELS.c.request_id, p.c.text, LABELS.c.label)
            .join(p, sa.and_(p.c.app == LABELS.c.app, p.c.request_id == LABELS.c.request_id))
            .where(LABELS.c.app == self.app, LABELS.c.t <= until, p.c.answered.is_(True), p.c.text.is_not(None))
            .order_by(LABELS.c.t, LABELS.c.request_id)
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1], int(r[2])) for r in conn.execute(query).all()]

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


def _prediction_columns() -> Iterable[sa.Column]:
    return [PREDICTIONS.c[name] for name in Prediction._fields]


def _sqlite_wal(dbapi_conn, _record) -> None:
    # WAL: readers (a promote's evidence query) do not wait for the writer. synchronous=NORMAL keeps every
    # committed transaction through a killed process (not through a power cut), at a fraction of FULL's fsyncs.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()

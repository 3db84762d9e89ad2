"""The durable prediction and feedback log behind the live evidence store, on a real SQLite file and a
real PostgreSQL server: a store started again on the same database has every label, the first label
stands across restarts, a label the database did not take is not kept, and what cannot be written is
bounded and counted. The store runs here as a plain object on an event loop (Serve runs it as a replica;
tests/test_rollout_serve.py kills that replica)."""

from __future__ import annotations

import asyncio

import pytest

from ray_jobs.evidence_log import EvidenceLog
from serve_app.evidence_store import LiveEvidence
from serve_app.log_writer import LogUnavailable
from serve_app.rollout import Entry


@pytest.fixture(params=["sqlite", "postgresql"])
def log_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/evidence.db"
    uri, why = request.getfixturevalue("postgres")
    if uri is None:
        pytest.skip(why)
    uri = uri.replace("postgresql://", "postgresql+psycopg2://")  # SQLAlchemy 2.1 reads postgresql:// as psycopg 3
    # One database per test: drop what an earlier test left.
    import sqlalchemy as sa

    from ray_jobs.evidence_log import _meta

    _meta.drop_all(sa.create_engine(uri))
    return uri


def _store(uri, **feedback) -> LiveEvidence:
    return LiveEvidence({"grace_s": 0.1, **feedback}, "app", uri)


def _entries(ids, version, slot, labels, answered=True):
    return [
        Entry(i, slot, version, answered, int(y), 0.9 if y else 0.1, 0.01, f"digest-{i}")
        for i, y in zip(ids, labels, strict=True)
    ]


def test_a_restarted_store_has_every_label_and_the_first_label_stands(log_uri):
    ids = [f"r{i}" for i in range(40)]
    champ = [i % 2 for i in range(40)]
    chal = [1] * 40
    truth = [1 if i % 3 else 0 for i in range(40)]

    async def first_life():
        store = _store(log_uri)
        await store.record(_entries(ids, "1", "champion", champ))
        await store.record(_entries(ids, "2", "challenger", chal, answered=False))
        for i in range(0, 40, 2):
            assert (await store.feedback(ids[i], truth[i]))["versions"] == ["1", "2"]
        assert await store.feedback(ids[0], 1 - truth[0]) == {"conflict": truth[0]}
        return await store.evidence("1", "2")

    before = asyncio.run(first_life())  # the store is gone with its loop: only the database remains
    assert before["source"] == "log" and before["request_ids"] == ids[0:40:2]

    async def second_life():
        store = _store(log_uri)
        report = await store.report("1", "2")
        conflict = await store.feedback(ids[0], 1 - truth[0])
        again = await store.feedback(ids[0], truth[0])
        late = await store.feedback(ids[1], truth[1])  # a request answered before the restart
        return store, report, conflict, again, late, await store.evidence("1", "2")

    store, report, conflict, again, late, after = asyncio.run(second_life())
    assert store.loaded == 40
    assert report["paired"]["labelled"] == 20 and report["store"]["labelled"] == 20
    assert conflict == {"conflict": truth[0]} and again is not None  # no silent rewrite across a restart
    assert late == {"answered_by": "1", "versions": ["1", "2"]}
    assert after["request_ids"] == ids[0:40:2] + [ids[1]]  # in the order the labels came
    assert after["labels"] == [truth[i] for i in range(0, 40, 2)] + [truth[1]]
    assert after["challenger"] == [1] * 21
    limited = asyncio.run(_store(log_uri).evidence("1", "2", limit=5))
    assert limited["request_ids"] == ids[0:10:2]


def test_the_log_keeps_labels_the_memory_has_let_go(log_uri):
    """max_records bounds the store's memory, not the log: a client cannot flush labelled evidence out
    with a burst of predictions."""

    async def go():
        store = _store(log_uri, max_records=100)
        await store.record(_entries(["old"], "1", "champion", [1]) + _entries(["old"], "2", "challenger", [1], False))
        assert await store.feedback("old", 1) is not None
        burst = [f"b{i}" for i in range(300)]
        await store.record(_entries(burst, "1", "champion", [0] * 300))
        assert "old" not in store.records
        unlabelled_old = "b0"
        return await store.evidence("1", "2"), await store.feedback(unlabelled_old, 0)

    evidence, late = asyncio.run(go())
    assert evidence["request_ids"] == ["old"]
    assert late == {"answered_by": "1", "versions": ["1"]}  # found in the log, not in memory


def test_a_label_the_database_did_not_take_is_not_kept(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/evidence.db"

    async def go():
        store = _store(uri)
        await store.record(_entries(["a"], "1", "champion", [1]))

        def down(*_a, **_k):
            raise OSError("disk full")

        real = store.log.write
        monkeypatch.setattr(store.log, "write", down)  # the database refuses every write
        with pytest.raises(LogUnavailable, match="disk full"):
            await store.feedback("a", 0)
        assert store.records["a"].label is None and store.writer.stats["errors"] >= 1
        assert len(store.writer.pending) == 1  # the prediction waits to be written again
        monkeypatch.setattr(store.log, "write", real)
        assert await store.feedback("a", 1) is not None  # the first label that was kept is this one
        return store

    store = asyncio.run(go())
    assert store.writer.stats["written"] == 1 and not store.writer.pending
    assert EvidenceLog(uri, "app").find("a")[1] == 1


def test_predictions_the_database_cannot_take_are_bounded_and_counted(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/evidence.db"

    async def go():
        store = _store(uri, log={"max_pending": 1000, "flush_s": 0.05})

        def down(*_a, **_k):
            raise OSError("database unreachable")

        monkeypatch.setattr(store.log, "write", down)
        await store.record(_entries([f"x{i}" for i in range(1500)], "1", "champion", [1] * 1500))
        await asyncio.sleep(0.2)  # a few failed flushes
        return store, (await store.report("1", None))["store"]["log"]

    store, log = asyncio.run(go())
    assert log["pending"] == 1000 and log["dropped"] == 500 and log["errors"] >= 1
    assert "database unreachable" in log["last_error"]


def test_every_prediction_is_written_once_and_old_rows_are_pruned(tmp_path):
    uri = f"sqlite:///{tmp_path}/evidence.db"

    async def go():
        store = _store(uri, retention_s=0.5, log={"prune_every_s": 0.3, "flush_s": 0.05})
        await store.record(_entries([f"p{i}" for i in range(50)], "1", "champion", [1] * 50))
        await store.record(_entries([f"p{i}" for i in range(10)], "1", "champion", [1] * 10))  # sent again
        await asyncio.sleep(0.2)
        written = EvidenceLog(uri, "app").counts()
        await asyncio.sleep(0.8)
        return written, EvidenceLog(uri, "app").counts(), store.writer.stats["pruned"]

    written, later, pruned = asyncio.run(go())
    assert written == {"predictions": 50, "labels": 0}
    assert later == {"predictions": 0, "labels": 0} and pruned == 50

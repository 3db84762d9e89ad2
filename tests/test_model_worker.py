"""The model in a process of its own (serve_app.model_worker): same answers as in-process, batches
pipelined and answered in order, clear errors, and no process left behind. Tests marked so start it from
the fork server, as a replica does (serve.fork_server; what is particular to it: test_fork_server.py);
the others start it the plain way, as the trial load before a deploy and a GPU replica do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ray_jobs.inference import Predictor
from serve_app.model_worker import ModelWorker, ModelWorkerError

pytestmark = pytest.mark.integration  # real model processes, real signals

TEXTS = [
    "A wonderful, moving film.",
    "Dull and far too long.",
    "not bad at all",
    "the worst acting I have seen",
    "great fun from start to finish",
    "I walked out after an hour",
]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A dead child of ours stays a zombie until reaped; that counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_answers_equal_the_in_process_predictor_and_pipelined_batches_keep_their_order(untrained_tiny):
    expected = Predictor(untrained_tiny, precision="fp32").predict(TEXTS)
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32")
    try:
        assert worker.alive() and worker.pid != os.getpid()
        # Several batches queued before the first is answered: each future gets its own batch's answers.
        batches = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
        futures = [worker.submit(b) for b in batches]
        for batch, future in zip(batches, futures, strict=True):
            got, seconds, features = future.result(timeout=60)
            assert seconds > 0 and features is None
            want = [expected[TEXTS.index(t)] for t in batch]
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert worker.predict([TEXTS[0]])[0]["label"] == expected[0]["label"]
    finally:
        worker.close()
    assert _gone(worker.pid, 10)


def test_close_lets_submitted_batches_finish_then_refuses_new_ones(untrained_tiny):
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32", fork_server=True)
    futures = [worker.submit(TEXTS) for _ in range(4)]
    worker.close()
    assert all(len(f.result(timeout=0)[0]) == len(TEXTS) for f in futures)
    assert not worker.alive()
    with pytest.raises(ModelWorkerError, match="closed"):
        worker.submit(TEXTS)


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelWorkerError, match=re.escape(str(tmp_path))):
        ModelWorker(str(tmp_path), num_threads=1)


def test_a_killed_model_process_fails_its_batches_and_reports_not_alive(untrained_tiny):
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32", fork_server=True)
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(ModelWorkerError, match="exited"):
        for _ in range(50):  # the first submits may race the receiver noticing the death
            worker.submit(TEXTS).result(timeout=30)
            time.sleep(0.1)
    assert not worker.alive()
    worker.close()


def test_only_the_batch_being_computed_is_blamed_for_a_dead_process(untrained_tiny, monkeypatch):
    """A process that dies on a batch (POISON_KILL_ENV: SIGKILL on a marker text) fails every pending
    batch, but only the one it was computing with ProcessLost: the batches queued behind it were not what
    killed it, and the replica must not count them towards a deadly text."""
    from serve_app.model_worker import POISON_KILL_ENV, ProcessLost

    monkeypatch.setenv(POISON_KILL_ENV, "DEADLY-MARKER")
    worker = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)
    try:
        first = worker.submit(TEXTS[:2])
        deadly = worker.submit(["DEADLY-MARKER here", *TEXTS[2:4]])
        queued = [worker.submit(TEXTS[4:]) for _ in range(3)]
        assert len(first.result(timeout=60).predictions) == 2  # answered before the fatal batch
        with pytest.raises(ProcessLost, match="exited"):
            deadly.result(timeout=60)
        for future in queued:
            err = future.exception(timeout=60)
            assert isinstance(err, ModelWorkerError) and not isinstance(err, ProcessLost), err
        assert not worker.alive()
    finally:
        worker.close()


@pytest.mark.parametrize("fork", [False, True], ids=["plain", "forked"])
def test_the_model_process_leaves_when_its_parent_is_killed(untrained_tiny, fork):
    """No orphans: a replica killed with SIGKILL (no chance to clean up) takes its model process along,
    also a forked one, which is the fork server's child, not the replica's."""
    code = (
        "import sys, time; from serve_app.model_worker import ModelWorker; "
        f"w = ModelWorker({untrained_tiny!r}, num_threads=1, precision='fp32', fork_server={fork}); "
        "print(w.pid, flush=True); time.sleep(600)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        assert ("fork_server.py" in _cmdline(_parent(child))) == fork
        parent.kill()
        parent.wait()
        assert _gone(child, 15), "the model process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_killed_model_process_is_replaced_and_its_batches_rerun(untrained_tiny):
    """SIGKILL on the model process under a stream of batches: every batch is still answered (the
    lost ones re-run on a replacement process), with the same answers, and the replacement is counted."""
    import asyncio
    import functools

    from serve_app.supervised_model import SupervisedModel

    expected = Predictor(untrained_tiny, precision="fp32").predict(TEXTS)

    async def run():
        model = await SupervisedModel.create(
            functools.partial(ModelWorker, untrained_tiny, num_threads=1, precision="fp32", fork_server=True)
        )
        first = model.worker.pid
        tasks = [asyncio.ensure_future(model.run(TEXTS)) for _ in range(20)]
        await asyncio.sleep(0.05)
        os.kill(first, signal.SIGKILL)
        tasks += [asyncio.ensure_future(model.run(TEXTS)) for _ in range(20)]  # sent while it restarts
        results = await asyncio.gather(*tasks)
        try:
            return first, model.worker.pid, model.restarts, model.state, results
        finally:
            await asyncio.to_thread(model.close)

    first, now, restarts, state, results = asyncio.run(run())
    assert now != first and restarts == 1 and state == "ok"
    assert _gone(first, 5)
    for got, _, _ in results:
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_closing_while_a_replacement_starts_leaves_no_model_process(untrained_tiny, tmp_path):
    """A hot swap or a stopping replica closes the model while its dead process is being replaced: the
    replacement, once up, is closed too, instead of living on unowned beside the replica."""
    import asyncio
    import functools
    import shutil

    from conftest import model_process

    from serve_app.supervised_model import SupervisedModel

    folder = str(shutil.copytree(untrained_tiny, tmp_path / "own"))  # its processes are this test's alone

    async def run():
        model = await SupervisedModel.create(functools.partial(ModelWorker, folder, num_threads=1, precision="fp32"))
        first = model.worker.pid
        os.kill(first, signal.SIGKILL)
        while model.worker.alive():
            await asyncio.sleep(0.05)
        await model.check()  # the health check starts the replacement (a new process takes seconds)
        await asyncio.sleep(0.2)
        assert model.state == "degraded"
        await asyncio.to_thread(model.close)
        for _ in range(300):
            if model.state != "degraded":
                break
            await asyncio.sleep(0.1)
        return first, model.state

    first, state = asyncio.run(run())
    assert state == "failed" and _gone(first, 5)
    for _ in range(100):
        if model_process(folder) is None:
            break
        time.sleep(0.1)
    assert model_process(folder) is None


def test_a_wedged_model_process_misses_its_deadline_and_is_replaced(untrained_tiny):
    """SIGSTOP (alive, never answering): the batch misses the deadline derived from the model's measured
    speed, the process is killed and replaced, and the batch is answered by the replacement."""
    import asyncio
    import functools

    from serve_app.model_worker import DEADLINE_FLOOR_S
    from serve_app.supervised_model import SupervisedModel

    async def run():
        model = await SupervisedModel.create(
            functools.partial(ModelWorker, untrained_tiny, num_threads=1, precision="fp32", fork_server=True)
        )
        first = model.worker.pid
        deadline = model.worker.batch_deadline_s(len(TEXTS))
        os.kill(first, signal.SIGSTOP)
        start = time.monotonic()
        got = (await model.run(TEXTS)).predictions
        try:
            return first, model.worker.pid, model.restarts, deadline, time.monotonic() - start, got
        finally:
            await asyncio.to_thread(model.close)

    first, now, restarts, deadline, took, got = asyncio.run(run())
    assert DEADLINE_FLOOR_S <= deadline < DEADLINE_FLOOR_S + 5  # the tiny model is fast: the floor dominates
    assert now != first and restarts == 1 and len(got) == len(TEXTS)
    assert deadline <= took < deadline + 60
    assert _gone(first, 5)  # SIGKILL ends a stopped process too


def test_the_replica_heals_a_dead_model_process_and_is_unhealthy_only_when_restarts_fail(untrained_tiny, tmp_path):
    """Serve replaces a replica whose check_health raises. A model process that dies is replaced inside
    the replica (health stays up); only when a replacement cannot start does the replica report unhealthy."""
    import asyncio
    import shutil

    from serve_app.app import SentimentModel

    model_dir = str(shutil.copytree(untrained_tiny, tmp_path / "model"))
    svc = SentimentModel({"serve.model_uri": model_dir, "serve.precision": "fp32"})

    async def run():
        await svc.reconfigure({"model_uri": model_dir, "model_version": "local"})
        await svc.check_health()
        first = svc.predictor.worker.pid
        os.kill(first, signal.SIGKILL)
        # Idle: the health check notices the dead process and starts a replacement.
        deadline = time.time() + 60
        while time.time() < deadline and (svc.predictor.restarts == 0 or svc.status()[0] != "ok"):
            await svc.check_health()  # never raises while the replacement starts ("degraded")
            await asyncio.sleep(0.2)
        assert svc.predictor.restarts == 1 and svc.predictor.worker.pid != first and svc.status() == ("ok", "")
        # Now make replacements impossible: the next death leaves the replica unhealthy.
        shutil.rmtree(model_dir)
        os.kill(svc.predictor.worker.pid, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                await svc.check_health()
            except RuntimeError as err:
                return str(err)
            await asyncio.sleep(0.2)
        pytest.fail("check_health kept passing although the model process could not be replaced")

    try:
        reason = asyncio.run(run())
        assert "could not start" in reason and svc.status()[0] == "unavailable"
    finally:
        svc.predictor.close()

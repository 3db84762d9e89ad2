"""The model in a process of its own (serve_app.model_worker): same answers as in-process, batches
pipelined and answered in order, clear errors, and no process left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from serve_app.model_worker import ModelWorker, ModelWorkerError
from serve_app.predictor import Predictor

TEXTS = ["A wonderful, moving film.", "Dull and far too long.", "not bad at all", "the worst acting I have seen",
         "great fun from start to finish", "I walked out after an hour"]


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


def test_answers_equal_the_in_process_predictor_and_pipelined_batches_keep_their_order(untrained_tiny):
    expected = Predictor(untrained_tiny, precision="fp32").predict(TEXTS)
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32")
    try:
        assert worker.alive() and worker.pid != os.getpid()
        # Several batches queued before the first is answered: each future gets its own batch's answers.
        batches = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
        futures = [worker.submit(b) for b in batches]
        for batch, future in zip(batches, futures):
            got, seconds = future.result(timeout=60)
            assert seconds > 0
            want = [expected[TEXTS.index(t)] for t in batch]
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert worker.predict([TEXTS[0]])[0]["label"] == expected[0]["label"]
    finally:
        worker.close()
    assert _gone(worker.pid, 10)


def test_close_lets_submitted_batches_finish_then_refuses_new_ones(untrained_tiny):
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32")
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
    worker = ModelWorker(untrained_tiny, num_threads=1, precision="fp32")
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(ModelWorkerError, match="exited"):
        for _ in range(50):  # the first submits may race the receiver noticing the death
            worker.submit(TEXTS).result(timeout=30)
            time.sleep(0.1)
    assert not worker.alive()
    worker.close()


def test_the_model_process_leaves_when_its_parent_is_killed(untrained_tiny):
    """No orphans: a replica killed with SIGKILL (no chance to clean up) takes its model process along."""
    code = ("import sys, time; from serve_app.model_worker import ModelWorker; "
            f"w = ModelWorker({untrained_tiny!r}, num_threads=1, precision='fp32'); print(w.pid, flush=True); time.sleep(600)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait()
        assert _gone(child, 15), "the model process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_replica_reports_unhealthy_when_its_model_process_dies(untrained_tiny):
    """Serve replaces a replica whose check_health raises: that is how a dead model process comes back."""
    import asyncio

    from serve_app.app import SentimentModel

    svc = SentimentModel({"model_uri": untrained_tiny, "precision": "fp32"})
    asyncio.run(svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"}))
    try:
        svc.check_health()  # healthy
        os.kill(svc.predictor.pid, signal.SIGKILL)
        # Serve polls check_health; it must start raising once the process is gone (its threads take
        # a moment to exit after the kill).
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                svc.check_health()
            except RuntimeError as err:
                assert "has exited" in str(err)
                break
            time.sleep(0.1)
        else:
            pytest.fail("check_health kept passing after the model process was killed")
    finally:
        svc.predictor.close()

"""Model processes forked from a pre-imported server (serve_app.fork_server): the same answers as a plain
start, from one server however many ask at once, with the asker's environment, named as model processes,
and the plain start wherever the server cannot be used. (No orphans when the asker dies:
test_model_worker.py, both ways of starting.)"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import model_process
from test_model_worker import TEXTS, _cmdline, _gone, _parent

from ray_jobs.inference import Predictor
from serve_app import fork_server
from serve_app.model_worker import POISON_ENV, ModelWorker, ModelWorkerError

pytestmark = pytest.mark.integration  # real processes, real signals


@pytest.fixture
def own_servers(monkeypatch):
    """A socket folder of this test's own (so the first start starts a server here), and its servers
    stopped afterwards. The environment is a Ray worker's in the way that matters: SPT_NOENV is set."""
    # Short, under /tmp: a socket's path must fit AF_UNIX's ~100 bytes, which a pytest-xdist worker's
    # tmp_path (…/popen-gw0/<test name>/…) can exceed.
    folder = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp")) / "sockets"
    monkeypatch.setenv(fork_server.DIR_ENV, str(folder))
    monkeypatch.setenv("SPT_NOENV", "1")
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "fork_server.py" in _cmdline(int(pid)) and str(folder) in _cmdline(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def test_forked_processes_answer_as_plain_ones_from_one_server_started_once(untrained_tiny, own_servers):
    expected = Predictor(untrained_tiny, precision="fp32").predict(TEXTS)
    # A long folder: the title must hold it whole (it once was cut at the server's own command line's length).
    folder = str(shutil.copytree(untrained_tiny, own_servers.parent / ("a-long-folder-name-" * 8) / "model"))
    # Three replicas asking at once, before any server runs: one server starts, all three are its children.
    workers: list[ModelWorker] = []
    threads = [
        threading.Thread(target=lambda: workers.append(ModelWorker(folder, precision="fp32", fork_server=True)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(workers) == 3
        servers = {_parent(w.pid) for w in workers}
        assert len(servers) == 1, servers
        [server] = servers
        assert "fork_server.py" in _cmdline(server) and str(own_servers) in _cmdline(server)
        # Detached: not this process's child, so no asker's exit (or Ray's clean-up of it) takes it.
        assert _parent(server) != os.getpid()
        for w in workers:
            assert w.pid != os.getpid() and _parent(w.pid) != os.getpid()
            got = w.predict(TEXTS)
            assert [g["label"] for g in got] == [e["label"] for e in expected]
            assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)
        # Named as a plain one is: the tests and the benchmarks find it by its model folder.
        assert "serve_app.model_worker" in _cmdline(workers[0].pid)
        assert model_process(folder) in {w.pid for w in workers}
        assert (os.stat(own_servers).st_mode & 0o777) == 0o700
    finally:
        for w in workers:
            w.close()
    assert all(_gone(w.pid, 10) for w in workers)
    assert os.path.exists(f"/proc/{server}")  # the server stays for the next start


def test_a_forked_process_runs_with_the_askers_environment_not_the_servers(untrained_tiny, own_servers, monkeypatch):
    first = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)  # the server starts without the fault
    server = _parent(first.pid)
    first.close()
    monkeypatch.setenv(POISON_ENV, "POISON-MARKER")  # the asker's environment now names a fault
    worker = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)
    try:
        assert _parent(worker.pid) == server  # forked by the same server
        assert len(worker.predict(TEXTS)) == len(TEXTS)
        with pytest.raises(ModelWorkerError, match="poison marker"):
            worker.predict(["POISON-MARKER in a review"])
    finally:
        worker.close()


def test_a_killed_server_costs_no_running_model_process_and_is_started_again(untrained_tiny, own_servers):
    worker = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)
    try:
        server = _parent(worker.pid)
        assert server != os.getpid() and "fork_server.py" in _cmdline(server)  # never SIGKILL this process
        os.kill(server, signal.SIGKILL)
        assert _gone(server, 10)
        assert worker.alive() and len(worker.predict(TEXTS)) == len(TEXTS)  # its children live on
        again = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)  # a stale socket: a new server
        try:
            assert _parent(again.pid) not in (server, os.getpid())
            assert "fork_server.py" in _cmdline(_parent(again.pid))
            assert len(again.predict(TEXTS)) == len(TEXTS)
        finally:
            again.close()
    finally:
        worker.close()


def test_a_command_forks_only_from_a_running_server_and_never_starts_one(untrained_tiny, own_servers, caplog):
    # A deploy's trial load (start_fork_server=False): with no server, the plain start, quietly, and no server.
    with caplog.at_level(logging.WARNING, logger="serve_app.model_worker"):
        plain = ModelWorker(untrained_tiny, precision="fp32", fork_server=True, start_fork_server=False)
    try:
        assert _parent(plain.pid) == os.getpid() and len(plain.predict(TEXTS)) == len(TEXTS)
        assert "plain way" not in caplog.text  # asked for, not a fault to warn of
    finally:
        plain.close()
    assert not list(own_servers.glob("*.sock"))
    # Once a replica has started one, the same call forks from it.
    replica = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)
    try:
        trial = ModelWorker(untrained_tiny, precision="fp32", fork_server=True, start_fork_server=False)
        try:
            assert _parent(trial.pid) == _parent(replica.pid) != os.getpid()
            assert len(trial.predict(TEXTS)) == len(TEXTS)
        finally:
            trial.close()
    finally:
        replica.close()


def test_a_folder_others_can_enter_means_the_plain_start(untrained_tiny, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)  # another user could plant a socket here: never used
    monkeypatch.setenv(fork_server.DIR_ENV, str(folder))
    with pytest.raises(fork_server.ForkServerError, match="not this user's alone"):
        fork_server.socket_dir()
    with caplog.at_level(logging.WARNING, logger="serve_app.model_worker"):
        worker = ModelWorker(untrained_tiny, precision="fp32", fork_server=True)
    try:
        assert _parent(worker.pid) == os.getpid()  # started the plain way
        assert "plain way" in caplog.text and "not this user's alone" in caplog.text
        assert len(worker.predict(TEXTS)) == len(TEXTS)
    finally:
        worker.close()
    assert list(Path(folder).iterdir()) == []


def test_a_forked_process_that_cannot_load_is_a_clear_error(tmp_path, own_servers):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelWorkerError, match="could not load " + re.escape(str(tmp_path / "model"))):
        ModelWorker(str(tmp_path / "model"), fork_server=True)

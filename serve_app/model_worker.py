"""The replica's model in a process of its own.

Why: a replica's event loop (HTTP parsing, validation, answers) and a forward pass in a thread of the
same process share one GIL. Measured under load (64 clients, `benchmarks/serve_load.py`): the forward
thread ran only 84% of its wall time and computed at 62-69% of the model's speed alone, although
the machine had idle CPU; a busy process beside it slows it by nothing measurable. In a process of
its own the model computes at full speed while the loop serves HTTP on another core.

    worker = ModelWorker(model_dir, num_threads=1, precision="auto")   # blocks until the model is loaded
    worker.predict(["great film"])   # -> [{"label": ..., "score": ..., "probabilities": {...}}]
    future = worker.submit(texts)    # never blocks; future.result() -> (predictions, compute seconds)
    worker.close()

Batches are pipelined: `submit` queues the next batch on the socket while the child still computes the
one before, so the child starts it the moment it is free, without waiting for the parent's threads
(which share the GIL with the event loop) to read an answer and send the next batch. Measured: the
model process ran 92% of a core under load before, 95-97% pipelined.

The parent speaks to the child over a private socket pair (`multiprocessing.connection`, whose pickled
messages only ever cross between these two processes). The child leaves when the parent closes the
socket, and also when the parent dies without closing it (the socket reads end-of-file): no orphans.
It is a plain subprocess (`python -m serve_app.model_worker`), not `multiprocessing`'s spawn, which
would re-run the parent's main module (inside Ray, the Ray worker's own script).
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Sequence

_START_TIMEOUT_S = 600.0


class ModelWorkerError(RuntimeError):
    """The worker could not load its model, failed on a batch, or is gone."""


class ModelWorker:
    """A Predictor in a child process. Batches are answered in the order they were submitted: a sender
    thread writes them to the socket, a receiver thread reads the answers and completes the futures."""

    def __init__(self, model_dir: str, num_threads: int = 1, precision: str = "auto", start_timeout_s: float = _START_TIMEOUT_S):
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the same imports as here
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "serve_app.model_worker", str(child_sock.fileno()), str(model_dir), str(num_threads), precision],
                pass_fds=[child_sock.fileno()], env=env,
                # Its own session: a Ctrl-C meant for the parent's terminal reaches the parent only; the
                # child follows when the parent closes the socket.
                start_new_session=True,
            )
        finally:
            child_sock.close()
        self.pid = self._proc.pid
        self._conn = Connection(parent_sock.detach())
        if not self._conn.poll(start_timeout_s):
            self._kill()
            raise ModelWorkerError(f"model worker did not load {model_dir} within {start_timeout_s:.0f}s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            kind, payload = "error", f"it exited (code {self._proc.wait()})"
        if kind != "ready":
            self._kill()
            raise ModelWorkerError(f"model worker could not load {model_dir}: {payload}")
        self._lock = threading.Lock()  # keeps `_pending` in the order of the sender's queue
        self._pending: collections.deque[Future] = collections.deque()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._error: str | None = None
        self._sender = threading.Thread(target=self._send_loop, name="model-worker-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="model-worker-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    # ------------------------------------------------------------------ public
    def submit(self, texts: Sequence[str]) -> Future:
        """Queue a batch; the future gives (predictions in input order, the child's compute seconds)."""
        future: Future = Future()
        with self._lock:
            if self._stopping or self._error:
                raise ModelWorkerError(self._error or "model worker is closed")
            self._pending.append(future)
            self._outbox.put(("predict", list(texts)))
        return future

    def predict(self, texts: Sequence[str]) -> list[dict]:
        return self.submit(texts).result()[0]

    def alive(self) -> bool:
        return self._error is None and self._proc.poll() is None

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the batches submitted so far finish, then stop the child (killed after `timeout_s`).
        Idempotent; blocks, so call it from a thread, not from an event loop."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._outbox.put(("stop", None))
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
        self._receiver.join(timeout=5)
        self._fail_pending("model worker was closed")

    # ------------------------------------------------------------------ threads
    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except OSError:
                return  # the child is gone; the receiver sees end-of-file and fails what is pending
            if message[0] == "stop":
                return

    def _receive_loop(self) -> None:
        while True:
            try:
                kind, payload, seconds = self._conn.recv()
            except (EOFError, OSError):
                with self._lock:  # before waiting: `alive` must not read a running process meanwhile
                    if not self._stopping:
                        self._error = "model worker exited"
                code = self._proc.wait()
                self._fail_pending("model worker was closed" if self._stopping and code == 0 else f"model worker exited (code {code})")
                self._outbox.put(("stop", None))  # lets the sender leave too
                return
            with self._lock:
                future = self._pending.popleft() if self._pending else None
            if future is None:
                continue
            if kind == "ok":
                future.set_result((payload, seconds))
            else:
                future.set_exception(ModelWorkerError(payload))

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            if not self._stopping:
                self._error = reason
            pending, self._pending = list(self._pending), collections.deque()
        for future in pending:
            if not future.done():
                future.set_exception(ModelWorkerError(reason))

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.wait()


def _child(fd: int, model_dir: str, num_threads: int, precision: str) -> int:
    conn = Connection(fd)
    try:
        from serve_app.predictor import Predictor

        predictor = Predictor(model_dir, num_threads=num_threads, precision=precision)
        predictor.predict(["warm up"])  # the first forward pass allocates; do it before traffic
    except Exception as err:  # reported to the parent, which raises it where the model was asked for
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready", None))
    while True:
        try:
            kind, texts = conn.recv()
        except (EOFError, OSError):
            return 0  # the parent is gone
        if kind == "stop":
            return 0
        start = time.perf_counter()
        try:
            reply = ("ok", predictor.predict(texts), time.perf_counter() - start)
        except Exception as err:
            reply = ("error", f"{type(err).__name__}: {err} (a batch of {len(texts)})", time.perf_counter() - start)
        try:
            conn.send(reply)
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]))

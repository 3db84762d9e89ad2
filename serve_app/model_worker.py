"""The replica's model in a process of its own.

Why: a replica's event loop (HTTP parsing, validation, answers) and a forward pass in a thread of the
same process share one GIL. Measured under load (64 clients, `benchmarks/serve_load.py`): the forward
thread ran only 84% of its wall time and computed at 62-69% of the model's speed alone, although
the machine had idle CPU; a busy process beside it slows it by nothing measurable. In a process of
its own the model computes at full speed while the loop serves HTTP on another core.

    worker = ModelWorker(model_dir, num_threads=1, precision="auto")   # blocks until the model is loaded
    worker.predict(["great film"])   # -> [{"label": ..., "score": ..., "probabilities": {...}}]
    future = worker.submit(texts)    # never blocks; future.result() -> BatchAnswer(predictions, seconds, features)
    worker.close()

Batches are pipelined: `submit` queues the next batch on the socket while the child still computes the
one before, so the child starts it the moment it is free, without waiting for the parent's threads
(which share the GIL with the event loop) to read an answer and send the next batch. Measured: the
model process ran 92% of a core under load before, 95-97% pipelined.

The parent speaks to the child over a private socket pair (`multiprocessing.connection`, whose pickled
messages only ever cross between these two processes). The child leaves when the parent closes the
socket, and also when the parent dies without closing it (the socket reads end-of-file): no orphans.
It is a plain subprocess (`python -m serve_app.model_worker`), not `multiprocessing`'s spawn, which
would re-run the parent's main module (inside Ray, the Ray worker's own script); in a replica it is
forked instead from serve_app.fork_server, which has imported torch and transformers already, and runs
the same `_child` with the same socket protocol.

Faults: a batch that the child does not answer by its deadline (the child alive but wedged: stopped,
deadlocked, swapping) kills the child, and its batches fail like those of a child that died.
`serve_app.supervised_model.SupervisedModel` is what the replica uses: it starts a replacement process
and re-runs the batches the old one lost, so that a dead or wedged model process costs clients latency,
not errors, and it finds the texts a model fails or dies on.
The deadline is derived from the model's own speed, measured when it starts: one forward pass on a
text of the model's full length, times the texts in the batch, times a safety factor, plus a floor.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ray_jobs.onnx_runtime import EAGER, RuntimeChoice

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0
# A batch must be answered within FLOOR + FACTOR x (its texts) x (seconds of one full-length text alone).
# The factor covers a machine whose other core is busy and slower batch shapes; the floor covers
# scheduling hiccups. A false alarm costs a restart and a re-run (latency), never a failed request.
DEADLINE_FLOOR_S = 5.0
DEADLINE_FACTOR = 4.0


class ModelWorkerError(RuntimeError):
    """The worker could not load its model, or it is gone (died, wedged, closed): its batches may be re-run."""


class ModelBatchError(ModelWorkerError):
    """The model raised on this batch (the process is fine): re-running the same batch would fail again."""


class ProcessLost(ModelWorkerError):
    """The process died (or was killed as wedged) while computing this batch: the head of its queue. The
    batches queued behind it fail with a plain ModelWorkerError: they were not what it was doing."""


# Faults for tests and the chaos benchmark, like ray_jobs.train_steps.FaultInjection: a model process
# started with POISON_ENV set raises on every batch holding a text that contains its value; with
# POISON_KILL_ENV set it dies of SIGKILL on such a batch (as a native crash would).
POISON_ENV = "SENTIMENT_TEST_POISON"
POISON_KILL_ENV = "SENTIMENT_TEST_POISON_KILL"


class BatchAnswer(NamedTuple):
    predictions: list[dict]
    seconds: float  # the child's compute time for the batch
    features: Any  # ray_jobs.drift.Features of the batch's texts, or None where drift monitoring is off


class ModelWorker:
    """A Predictor in a child process. Batches are answered in the order they were submitted: a sender
    thread writes them to the socket, a receiver thread reads the answers and completes the futures.
    Over ~150 lines: start-up, the two threads, the deadline and close share the socket and the queue of
    futures; apart, each would need the others' locks."""

    def __init__(
        self,
        model_dir: str,
        num_threads: int = 1,
        precision: str = "auto",
        start_timeout_s: float = _START_TIMEOUT_S,
        deadline_s: float | None = None,
        features: bool = False,
        runtime: RuntimeChoice = EAGER,
        device: str = "cpu",
        batch_size: int = 64,
        fork_server: bool = False,
        start_fork_server: bool = True,
    ):
        """`deadline_s`: seconds a batch may take once the child starts it; None derives it per batch
        from the speed measured at start (see the module docstring). `features`: answers carry the
        batch's drift features (computed from the same forward pass). `runtime`: eager PyTorch or the
        version's ONNX export (ray_jobs.onnx_runtime); `self.runtime` says what the child runs. `device`: cpu or
        cuda; the child inherits this process's CUDA_VISIBLE_DEVICES (inside a replica, the GPU Ray assigned
        it), and without a CUDA device it fails to start with that said. `batch_size`: the most texts of one
        forward pass (a larger batch is computed in length-sorted parts). `fork_server`: fork the process
        from serve_app.fork_server, which has imported torch and transformers already (a start costs the
        weights' load instead of ~3 s of imports; on the CPU only, and started the plain way wherever the
        server cannot). `start_fork_server=False`: use a server only where one runs already."""
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the same imports as here
        options = {
            "num_threads": num_threads,
            "precision": precision,
            "features": features,
            "device": device,
            "batch_size": batch_size,
            **runtime._asdict(),
        }
        argv = ["serve_app.model_worker", str(child_sock.fileno()), str(model_dir), json.dumps(options)]
        try:
            self._proc = (
                fork_server and device == "cpu" and _forked(child_sock, argv, start_fork_server)
            ) or subprocess.Popen(
                [sys.executable, "-m", *argv],
                pass_fds=[child_sock.fileno()],
                env=env,
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
            code = self._exit_code()
            kind, payload = "error", "it exited" + (f" (code {code})" if code is not None else "")
        if kind != "ready":
            self._kill()
            raise ModelWorkerError(f"model worker could not load {model_dir}: {payload}")
        # Seconds of one forward pass on a full-length text, measured by the child after its warm-up.
        self.text_s = float(payload["text_s"])
        self.runtime: dict[str, Any] = payload["runtime"]  # ray_jobs.onnx_runtime.runtime_info
        self._deadline_s = deadline_s
        self._lock = threading.Lock()  # keeps `_pending` in the order of the sender's queue
        # (future, number of texts); the head of the queue is the batch the child computes now.
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._head_since = time.monotonic()  # when the child could start the head batch
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._error: str | None = None
        self._sender = threading.Thread(target=self._send_loop, name="model-worker-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="model-worker-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    # ------------------------------------------------------------------ public
    def submit(self, texts: Sequence[str]) -> Future:
        """Queue a batch; the future gives its BatchAnswer (predictions in input order)."""
        future: Future = Future()
        with self._lock:
            if self._stopping or self._error:
                raise ModelWorkerError(self._error or "model worker is closed")
            if not self._pending:
                self._head_since = time.monotonic()
            self._pending.append((future, len(texts)))
            self._outbox.put(("predict", list(texts)))
        return future

    def batch_deadline_s(self, n_texts: int) -> float:
        """Seconds a batch of `n_texts` may take once the child has started it."""
        if self._deadline_s is not None:
            return self._deadline_s
        return DEADLINE_FLOOR_S + DEADLINE_FACTOR * max(1, n_texts) * self.text_s

    def predict(self, texts: Sequence[str]) -> list[dict]:
        return self.submit(texts).result().predictions

    def alive(self) -> bool:
        return self._error is None and self._proc.poll() is None

    def kill(self, reason: str) -> None:
        """Stop the child now (SIGKILL also ends a stopped process); its batches fail with `reason`."""
        with self._lock:
            if self._error is None:
                self._error = reason
        self._kill()

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
        try:
            self._receive()
        except BaseException as err:  # noqa: BLE001 - a dead receiver must not leave requests waiting forever
            self._error = self._error or f"model worker receiver failed: {type(err).__name__}: {err}"
            self._kill()
            self._fail_pending(self._error)
            self._outbox.put(("stop", None))

    def _receive(self) -> None:
        while True:
            self._wait_for_answer()
            try:
                kind, payload, seconds = self._conn.recv()
            except (EOFError, OSError):
                with self._lock:  # before waiting: `alive` must not read a running process meanwhile
                    killed = self._error  # set by kill(): the reason says more than an exit code
                    if not self._stopping and self._error is None:
                        self._error = "model worker exited"
                code = self._exit_code()
                with self._lock:
                    # Without the code: a child asked to stop answers every batch before it leaves, so
                    # a batch still pending means it died.
                    clean = self._stopping and (code == 0 if code is not None else not self._pending)
                if killed:
                    reason = killed
                elif clean:
                    reason = "model worker was closed"
                else:
                    reason = "model worker exited" + (f" (code {code})" if code is not None else "")
                self._fail_pending(reason, head_lost=not clean)
                self._outbox.put(("stop", None))  # lets the sender leave too
                return
            with self._lock:
                future = self._pending.popleft()[0] if self._pending else None
                self._head_since = time.monotonic()
            if future is None:
                continue
            if kind == "ok":
                future.set_result(BatchAnswer(payload[0], seconds, payload[1]))
            else:
                future.set_exception(ModelBatchError(payload))

    def _wait_for_answer(self) -> None:
        """Block until an answer (or end-of-file) can be read. A head batch past its deadline means a
        wedged child: kill it, and the read then sees end-of-file."""
        while True:
            with self._lock:
                head = self._pending[0][1] if self._pending else None
                since = self._head_since
            wait = 1.0 if head is None else since + self.batch_deadline_s(head) - time.monotonic()
            if wait > 0:
                if self._conn.poll(min(wait, 1.0)):
                    return
                continue
            with self._lock:
                still_late = bool(self._pending) and self._head_since == since
            if still_late:
                self.kill(
                    f"model worker wedged: no answer to a batch of {head} within {self.batch_deadline_s(head):.1f}s"
                )
                return

    def _fail_pending(self, reason: str, head_lost: bool = False) -> None:
        """Fail every pending batch with `reason`; `head_lost`: the process died computing the first one,
        which gets ProcessLost (the batches behind it were only queued)."""
        with self._lock:
            if not self._stopping:
                self._error = reason
            pending, self._pending = list(self._pending), collections.deque()
        for i, (future, _) in enumerate(pending):
            if not future.done():
                lost = head_lost and i == 0
                future.set_exception(ProcessLost(reason) if lost else ModelWorkerError(f"{reason} (queued)"))

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.wait()

    def _exit_code(self) -> int | None:
        """Waits for the child to end: its exit code, or None for a forked one (its server reaps it)."""
        code = self._proc.wait()
        return code if self._proc.returncode is not None else None


def _forked(child_sock: socket.socket, argv: list[str], start_server: bool):
    """The model process forked by the fork server, or None (said in the log) where it cannot be."""
    from serve_app.fork_server import ForkServerError, NoForkServer, start_child

    module, _, *rest = argv
    title = " ".join([sys.executable, "-m", module, "<fork>", *rest[:1]])  # ps and pgrep find it as before
    try:
        return start_child([child_sock.fileno()], title, [module, "{fd0}", *rest], start_server)
    except NoForkServer as err:
        log.debug("starting the model process the plain way: %s", err)  # asked for, not a fault
        return None
    except ForkServerError as err:
        log.warning("starting the model process the plain way: %s", err)
        return None


def _poison_predictor(predictor, marker: str, kill: bool) -> None:
    """POISON_ENV's fault: the predictor raises on any batch that holds a text containing `marker`
    (kill: POISON_KILL_ENV's, the process dies of SIGKILL)."""
    for name in ("predict", "predict_features"):
        method = getattr(predictor, name)

        def checked(texts, _method=method):
            if any(marker in t for t in texts):
                if kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("poison marker in the batch (the SENTIMENT_TEST_POISON fault)")
            return _method(texts)

        setattr(predictor, name, checked)


def _child(fd: int, model_dir: str, options: dict[str, Any]) -> int:
    conn = Connection(fd)
    features = bool(options.pop("features"))
    try:
        from ray_jobs.onnx_runtime import load_predictor

        choice = RuntimeChoice(**{k: options[k] for k in RuntimeChoice._fields})
        predictor, runtime = load_predictor(
            model_dir,
            choice,
            options["num_threads"],
            options["precision"],
            batch_size=options["batch_size"],
            device=options["device"],
        )
        for env, kill in ((POISON_ENV, False), (POISON_KILL_ENV, True)):
            if os.environ.get(env):
                _poison_predictor(predictor, os.environ[env], kill)
        predictor.predict(["warm up"])  # the first forward pass allocates; do it before traffic
        # The speed that batch deadlines scale with: one text that fills the model's length.
        full = " ".join(["film"] * predictor.max_length)
        start = time.perf_counter()
        predictor.predict([full])
        text_s = time.perf_counter() - start
    except Exception as err:  # reported to the parent, which raises it where the model was asked for
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready", {"text_s": text_s, "runtime": runtime}))
    while True:
        try:
            kind, texts = conn.recv()
        except (EOFError, OSError):
            return 0  # the parent is gone
        if kind == "stop":
            return 0
        start = time.perf_counter()
        try:
            answer = predictor.predict_features(texts) if features else (predictor.predict(texts), None)
            reply = ("ok", answer, time.perf_counter() - start)
        except Exception as err:
            reply = ("error", f"{type(err).__name__}: {err} (a batch of {len(texts)})", time.perf_counter() - start)
        try:
            conn.send(reply)
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])))

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
would re-run the parent's main module (inside Ray, the Ray worker's own script).

Faults: a batch that the child does not answer by its deadline (the child alive but wedged: stopped,
deadlocked, swapping) kills the child, and its batches fail like those of a child that died.
`SupervisedModel` (below) is what the replica uses: it starts a replacement process and re-runs the
batches the old one lost, so that a dead or wedged model process costs clients latency, not errors.
The deadline is derived from the model's own speed, measured when it starts: one forward pass on a
text of the model's full length, times the texts in the batch, times a safety factor, plus a floor.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
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
from collections.abc import Callable, Sequence
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
POISON_MEMORY = 1024  # digests of texts the model raised on, answered without the model
# A batch whose process was lost this many times is run one text at a time: one loss is usually the
# process's own (killed, out of memory), two on the same batch point at a text.
LOSSES_TO_SUSPECT = 2


class ModelWorkerError(RuntimeError):
    """The worker could not load its model, or it is gone (died, wedged, closed): its batches may be re-run."""


class ModelBatchError(ModelWorkerError):
    """The model raised on this batch (the process is fine): re-running the same batch would fail again."""


class ProcessLost(ModelWorkerError):
    """The process died (or was killed as wedged) while computing this batch: the head of its queue. The
    batches queued behind it fail with a plain ModelWorkerError: they were not what it was doing."""


class BatchDeadly(ModelWorkerError):
    """The model process was lost LOSSES_TO_SUSPECT times while answering this batch: one of its texts
    may be what kills it (a native crash, a hang past the batch deadline)."""


class TextFailed(NamedTuple):
    """In a batch's predictions: the model raised on this text (found by splitting the batch); its request
    gets this reason, the texts batched with it their predictions."""

    reason: str
    digest: str  # sha256 of the text, first 16 hex digits: what logs name (never the text)


# Faults for tests and the chaos benchmark, like ray_jobs.train_steps.FaultInjection: a model process
# started with POISON_ENV set raises on every batch holding a text that contains its value; with
# POISON_KILL_ENV set it dies of SIGKILL on such a batch (as a native crash would).
POISON_ENV = "SENTIMENT_TEST_POISON"
POISON_KILL_ENV = "SENTIMENT_TEST_POISON_KILL"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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
    ):
        """`deadline_s`: seconds a batch may take once the child starts it; None derives it per batch
        from the speed measured at start (see the module docstring). `features`: answers carry the
        batch's drift features (computed from the same forward pass). `runtime`: eager PyTorch or the
        version's ONNX export (ray_jobs.onnx_runtime); `self.runtime` says what the child runs. `device`: cpu or
        cuda; the child inherits this process's CUDA_VISIBLE_DEVICES (inside a replica, the GPU Ray assigned
        it), and without a CUDA device it fails to start with that said. `batch_size`: the most texts of one
        forward pass (a larger batch is computed in length-sorted parts)."""
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
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "serve_app.model_worker", str(child_sock.fileno()), str(model_dir)]
                + [json.dumps(options)],
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
            kind, payload = "error", f"it exited (code {self._proc.wait()})"
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
                code = self._proc.wait()
                if killed:
                    reason = killed
                elif self._stopping and code == 0:
                    reason = "model worker was closed"
                else:
                    reason = f"model worker exited (code {code})"
                self._fail_pending(reason, head_lost=not (self._stopping and code == 0))
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


class SupervisedModel:
    """The replica's model: a ModelWorker that is replaced when it dies or wedges. A batch lost with a
    process is re-run on the replacement (predictions are idempotent), so clients see latency, not
    errors. Async: every method runs on the replica's event loop, and loading happens in a thread.

    Poison texts: a batch on which the model raises (the process is fine) is split in halves until the
    failing texts are found (at most 2 log2(n) more calls for one such text); those get a TextFailed, the
    rest their predictions. No process is replaced and nothing counts against `max_restarts`. Failed
    texts are remembered by digest (the last POISON_MEMORY), so a repeated one is answered at once.

    Deadly texts: a batch whose process died twice while computing it (LOSSES_TO_SUSPECT; batches merely
    queued behind it are not blamed) is run one text at a time on replacements; a text whose process died
    twice on it alone is remembered the same way. When that explains the losses (deadly texts found, the
    other texts answered), the batch's restarts are taken off the restart budget: a deadly text costs four
    process starts of latency, never the replica. Restarts while isolating are bounded (2 x max_restarts),
    so a model that dies on everything still fails.

    States: "ok"; "degraded" while a replacement loads (the reason is kept for /health); "failed" once
    `max_restarts` replacements were needed within `restart_window_s`, or a replacement cannot load:
    then the replica's health check fails and Serve replaces the whole replica."""

    def __init__(
        self,
        start: Callable[[], ModelWorker],
        max_restarts: int = 3,
        restart_window_s: float = 60.0,
        max_attempts: int = 8,
    ):
        # max_attempts: tries of one batch. A batch queued behind another's deadly text loses its process
        # with it each time (four times per deadly text) without being to blame; restarts bound the rest.
        self._start = start
        self.max_restarts, self.restart_window_s, self.max_attempts = max_restarts, restart_window_s, max_attempts
        self.worker: ModelWorker | None = None
        self.state, self.reason = "starting", ""
        self.restarts = 0  # replacements since start (a metric)
        self.poisoned = 0  # texts the model raised on (a metric)
        self._poison: collections.OrderedDict[str, str] = collections.OrderedDict()  # digest -> reason
        self._recent: collections.deque[float] = collections.deque()  # restarts on the budget
        self._isolating = 0  # batches being run one text at a time (see _isolate_deadly)
        self._provisional: list[float] = []  # restarts meanwhile
        self._explained_since: float | None = None  # deadly texts found: restarts since then are theirs
        self._isolation = asyncio.Lock()  # one batch at a time is isolated: its restarts are settled alone
        self._restarting: asyncio.Future | None = None
        self._closed = False  # a process that finishes starting after close() is closed, not kept

    @classmethod
    async def create(cls, start: Callable[[], ModelWorker], **kwargs) -> SupervisedModel:
        """Start the first process; raises ModelWorkerError if the model cannot load."""
        model = cls(start, **kwargs)
        model.worker = await asyncio.to_thread(start)
        model.state = "ok"
        return model

    async def run(self, texts: Sequence[str]) -> BatchAnswer:
        """One batch's answer, re-run on a new process if its process is lost. Texts the model raises on
        or dies on are TextFailed items among the predictions (see the class's docstring)."""
        digests = [text_digest(t) for t in texts]
        known = [self._poison.get(d) for d in digests]
        if not any(known):
            since = time.monotonic()
            try:
                return await self._run_whole(texts)
            except ModelBatchError as err:
                predictions, seconds = await self._isolate(list(texts), digests, str(err))
                return BatchAnswer(predictions, seconds, None)  # drift features skip a split batch
            except BatchDeadly as err:
                if len(texts) == 1:  # nothing else to answer: its restarts stay on the budget
                    return BatchAnswer([self._remember(digests[0], _deadly(err))], 0.0, None)
                predictions, seconds = await self._isolate_deadly(list(texts), digests, since)
                return BatchAnswer(predictions, seconds, None)
        rest = [i for i, reason in enumerate(known) if reason is None]
        answer = await self.run([texts[i] for i in rest]) if rest else BatchAnswer([], 0.0, None)
        predictions: list = [TextFailed(r, d) if r is not None else None for r, d in zip(known, digests, strict=True)]
        for i, prediction in zip(rest, answer.predictions, strict=True):
            predictions[i] = prediction
        return BatchAnswer(predictions, answer.seconds, None)

    def _remember(self, digest: str, reason: str) -> TextFailed:
        self.poisoned += 1
        self._poison[digest] = reason
        while len(self._poison) > POISON_MEMORY:
            self._poison.popitem(last=False)
        log.warning("the model failed on one text (sha256 %s...), answered with an error: %s", digest, reason)
        return TextFailed(reason, digest)

    async def _isolate(self, texts: list[str], digests: list[str], reason: str) -> tuple[list, float]:
        """(predictions with TextFailed items, seconds) of a batch the model raised on, by halves."""
        if len(texts) == 1:
            return [self._remember(digests[0], reason)], 0.0
        mid = len(texts) // 2
        predictions, seconds = [], 0.0
        for part, part_digests in ((texts[:mid], digests[:mid]), (texts[mid:], digests[mid:])):
            try:
                answer = await self._run_whole(part)
                predictions += answer.predictions
                seconds += answer.seconds
            except ModelBatchError as err:
                found, spent = await self._isolate(part, part_digests, str(err))
                predictions += found
                seconds += spent
        return predictions, seconds

    async def _isolate_deadly(self, texts: list[str], digests: list[str], since: float) -> tuple[list, float]:
        """(predictions with TextFailed items, seconds) of a batch whose process was lost twice, one text
        at a time (halves would cost a process per level). Restarts meanwhile are provisional: taken off
        the budget with the batch's own if deadly texts explain them, added to it if not."""
        predictions, seconds, deadly, answered = [], 0.0, 0, 0
        await self._isolation.acquire()
        self._isolating += 1
        try:
            for text, digest in zip(texts, digests, strict=True):
                if digest in self._poison:  # the same text twice in one batch (or found by another isolation)
                    predictions.append(TextFailed(self._poison[digest], digest))
                    continue
                try:
                    answer = await self._run_whole([text])
                except ModelBatchError as err:
                    predictions.append(self._remember(digest, str(err)))
                    continue
                except BatchDeadly as err:
                    predictions.append(self._remember(digest, _deadly(err)))
                    deadly += 1
                    continue
                predictions += answer.predictions
                seconds += answer.seconds
                answered += 1
        finally:
            if deadly and answered:
                log.warning("%d deadly text(s) explain the batch's lost processes: restarts not counted", deadly)
                self._explained_since = min(since, self._explained_since or since)
            self._isolating -= 1
            if self._isolating == 0:  # batches lost together are settled together
                provisional, self._provisional = self._provisional, []
                if self._explained_since is not None:
                    self._recent = collections.deque(t for t in self._recent if t < self._explained_since)
                else:
                    self._recent.extend(provisional)
                self._explained_since = None
            self._isolation.release()
        return predictions, seconds

    async def _run_whole(self, texts: Sequence[str]) -> BatchAnswer:
        losses = 0  # times the process died computing this batch (not merely with it queued)
        for attempt in range(1, self.max_attempts + 1):
            worker = self.worker
            try:
                if worker is None:
                    raise ModelWorkerError(self.reason or "no model process")
                return await asyncio.wrap_future(worker.submit(texts))
            except ModelBatchError:
                raise  # the model itself raised: the same batch would fail again
            except ModelWorkerError as err:
                losses += isinstance(err, ProcessLost)
                if attempt == self.max_attempts or self.state == "failed":
                    raise ModelWorkerError(f"{err} (after {attempt} attempts)") from None
                if losses >= LOSSES_TO_SUSPECT:
                    await self.replace(worker, str(err))  # the next batch finds a process
                    raise BatchDeadly(str(err)) from None
                await self.replace(worker, str(err))
        raise AssertionError("unreachable")

    async def replace(self, worker: ModelWorker | None, reason: str) -> None:
        """Replace `worker` (once, however many batches lost it) and wait until its successor runs or
        replacing has failed. A no-op if `worker` was already replaced."""
        if self.state == "failed":
            raise ModelWorkerError(self.reason)
        if worker is not self.worker and self._restarting is None:
            return
        if self._restarting is None:
            self._restarting = asyncio.ensure_future(self._restart(worker, reason))
        await asyncio.shield(self._restarting)

    async def check(self) -> None:
        """For the health check: a process that died while idle is replaced now, not at the next request."""
        if self.state == "ok" and self.worker is not None and not self.worker.alive() and self._restarting is None:
            self._restarting = asyncio.ensure_future(self._restart(self.worker, "model process exited while idle"))

    async def _restart(self, worker: ModelWorker | None, reason: str) -> None:
        try:
            now = time.monotonic()
            while self._recent and now - self._recent[0] > self.restart_window_s:
                self._recent.popleft()
            if self._isolating:
                if len(self._provisional) >= 2 * self.max_restarts:
                    self.state = "failed"
                    self.reason = f"{reason}; {len(self._provisional)} restarts while isolating texts, giving up"
                    return
                self._provisional.append(now)
            elif len(self._recent) >= self.max_restarts:
                self.state = "failed"
                self.reason = f"{reason}; {len(self._recent)} restarts within {self.restart_window_s:.0f}s, giving up"
                return
            else:
                self._recent.append(now)
            self.state, self.reason = "degraded", f"restarting the model process: {reason}"
            if worker is not None:
                await asyncio.to_thread(worker.kill, reason)
            try:
                worker = await asyncio.to_thread(self._start)
            except Exception as err:  # noqa: BLE001 - the reason goes to /health; Serve replaces the replica
                self.state, self.reason = "failed", f"{reason}; the replacement could not start: {err}"
                return
            if self._closed:  # closed (hot swap, replica stopping) while the replacement started
                await asyncio.to_thread(worker.close)
                self.state, self.reason = "failed", "closed"
                return
            self.worker = worker
            self.restarts += 1
            self.state, self.reason = "ok", ""
        finally:
            self._restarting = None

    @property
    def runtime(self) -> dict[str, Any] | None:
        """What the current process runs (ray_jobs.onnx_runtime.runtime_info)."""
        return self.worker.runtime if self.worker is not None else None

    def close(self) -> None:
        """Blocking (call it from a thread): batches already submitted finish, then the process leaves;
        a replacement still starting is closed as soon as it is up."""
        self._closed = True
        if self.worker is not None:
            self.worker.close()


def _deadly(err: Exception) -> str:
    return f"the model process was lost twice on this text alone ({err})"


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

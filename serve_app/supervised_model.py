"""The replica's model as the replica sees it: a model process (serve_app.model_worker) that is replaced
when it dies or wedges, with the batches it lost re-run, and the texts the model fails or dies on found
and answered with their own error (poison and deadly texts: docs/reliability.md)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from serve_app.model_worker import BatchAnswer, ModelBatchError, ModelWorker, ModelWorkerError, ProcessLost

log = logging.getLogger(__name__)

POISON_MEMORY = 1024  # digests of texts the model raised on, answered without the model
# A batch whose process was lost this many times is run one text at a time: one loss is usually the
# process's own (killed, out of memory), two on the same batch point at a text.
LOSSES_TO_SUSPECT = 2


class BatchDeadly(ModelWorkerError):
    """The model process was lost LOSSES_TO_SUSPECT times while answering this batch: one of its texts
    may be what kills it (a native crash, a hang past the batch deadline)."""


class TextFailed(NamedTuple):
    """In a batch's predictions: the model raised on this text (found by splitting the batch); its request
    gets this reason, the texts batched with it their predictions."""

    reason: str
    digest: str  # sha256 of the text, first 16 hex digits: what logs name (never the text)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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
        self._provisional: list[float] = []  # restarts while a batch is isolated (see _isolate_deadly)
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
        async with self._isolation:  # held while isolating: _restart counts restarts as provisional
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
                provisional, self._provisional = self._provisional, []
                if deadly and answered:
                    log.warning("%d deadly text(s) explain the batch's lost processes: restarts not counted", deadly)
                    self._recent = collections.deque(t for t in self._recent if t < since)
                else:
                    self._recent.extend(provisional)
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
            if self._isolation.locked():
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

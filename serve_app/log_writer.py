"""The live evidence store's write-behind queue to the durable log (ray_jobs.evidence_log): predictions
wait in a bounded queue and are written in one transaction every `serve.feedback.log.flush_s`, off every
response path; a label is written at once and its caller resumes only once the database has it."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable
from typing import Any

from ray_jobs.config import EvidenceLogConfig
from ray_jobs.evidence_log import EvidenceLog, Label, Prediction

log = logging.getLogger(__name__)


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
        self._bound()
        self._start()

    def _bound(self) -> None:
        over = len(self.pending) - self.cfg.max_pending
        if over > 0:
            for _ in range(over):
                self.pending.popleft()
            self.stats["dropped"] += over
            log.warning("evidence log: %d predictions dropped, the database is behind (max_pending)", over)

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
                self._bound()
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(LogUnavailable(self.stats["last_error"]))
                return
            self.stats["written"] += len(preds)
            for _, done in waiting:
                if not done.done():
                    done.set_result(None)

    def report(self) -> dict[str, Any]:
        return {"uri": self.log.uri, "pending": len(self.pending), **self.stats}

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

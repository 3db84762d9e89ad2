"""The live evidence store: one deployment per app that keeps what each version predicted for each
request id, the true labels POST /feedback gives, and live metrics; everything it is told goes to the
durable log (ray_jobs.evidence_log) as well.

- Predictions arrive from the replicas (serve_app.rollout.EvidenceFeed) and are written to the log in
  batches every `serve.feedback.log.flush_s`, off every response path. What cannot be written within
  `log.max_pending` entries (the database down for a long time) is dropped oldest first and counted.
- A label is written before POST /feedback answers: a 200 means it is in the database, with the
  predictions of its request (one transaction). A write that fails answers 503 and keeps nothing.
- GET /challenger/evidence and the `paired` part of GET /challenger read the log, in the order the
  labels came, so a label counts as long as the log keeps it (`retention_s`), whatever the memory held.
- At start the store loads the newest `max_records` predictions and their labels back from the log: a
  killed store, a redeploy or a cluster restart loses no label.
The memory part (bounded by `max_records`) serves what needs no database round trip: agreement,
confidence and latency per version, and counts since the store started.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from ray_jobs.config import FeedbackConfig, evidence_log_uri
from ray_jobs.evidence_log import EvidenceLog, Label, Prediction
from ray_jobs.inference import classification_metrics
from serve_app.log_writer import LogUnavailable, LogWriter
from serve_app.rollout import CHALLENGER, CHAMPION, Entry
from serve_app.schemas import AppArgs, settings_version

log = logging.getLogger(__name__)

_LATENCIES_KEPT = 10_000  # per version and role, for the percentiles /challenger reports


class _Record:
    __slots__ = ("t", "answered_by", "by", "label")

    def __init__(self, t: float):
        self.t = t
        self.answered_by: str | None = None
        self.by: dict[str, tuple[int, float]] = {}  # version -> (label, P(positive))
        self.label: int | None = None

    def scored(self, version: str, label: int, p_positive: float, answered: bool) -> None:
        self.by[version] = (int(label), float(p_positive))
        if answered:
            self.answered_by = version


def _confidence(p_positive: float) -> float:
    return max(p_positive, 1.0 - p_positive)


def _live_metrics(labels: list[int], preds: list[int]) -> dict[str, Any]:
    if not labels:
        return {"labelled": 0, "accuracy": None, "f1": None}
    m = classification_metrics(np.asarray(labels), np.asarray(preds))
    return {"labelled": len(labels), "accuracy": m["accuracy"], "f1": m["f1"]}


def _latency(seconds: collections.deque) -> dict[str, Any]:
    if not seconds:
        return {"n": 0, "mean_s": None, "p50_s": None, "p99_s": None}
    a = np.fromiter(seconds, float)
    return {
        "n": len(a),
        "mean_s": float(a.mean()),
        "p50_s": float(np.quantile(a, 0.5)),
        "p99_s": float(np.quantile(a, 0.99)),
    }


class LiveEvidence:
    """One replica for the app: predictions by request id, true labels from feedback, live metrics, and
    the write-behind queue to the durable log. Over ~150 lines: the memory view and the log it mirrors
    are one state (a label is set in both, or in neither)."""

    def __init__(self, feedback: dict[str, Any], app: str = "sentiment", log_uri: str | None = None):
        """`feedback`: the app's `serve.feedback` section; `log_uri`: the durable log's database (None: no
        log, memory only)."""
        from serve_app.metrics import LiveMetrics

        self.cfg = FeedbackConfig.model_validate(feedback)
        self.records: collections.OrderedDict[str, _Record] = collections.OrderedDict()
        self.metrics = LiveMetrics()
        self.counts: collections.Counter = collections.Counter()  # (version, answered|mirrored) since start
        self.latency: dict[tuple[str, str], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=_LATENCIES_KEPT)
        )
        self.slots: dict[str, str] = {}  # slot -> the version last seen in it
        self.evicted = 0
        self.feedback_total = 0
        self.started_at = time.time()
        self.log, self.writer, self.loaded = None, None, 0
        if log_uri:
            self.log = EvidenceLog(_expand_head_ip(log_uri), app)
            self.writer = LogWriter(self.log, self.cfg.log, self.cfg.retention_s)
            self._load()

    # ------------------------------------------------------------------ calls from the ingress
    async def record(self, entries: list[Entry]) -> None:
        now = time.time()
        for e in entries:
            rec = self.records.get(e.request_id)
            if rec is None:
                rec = self.records[e.request_id] = _Record(now)
            rec.scored(e.version, e.label, e.p_positive, e.answered)
            role = "answered" if e.answered else "mirrored"
            self.counts[(e.version, role)] += 1
            self.latency[(e.version, role)].append(float(e.seconds))
            self.slots[e.slot] = e.version
        if self.writer is not None:
            self.writer.add(
                Prediction(
                    e.request_id,
                    e.version,
                    e.slot,
                    e.answered,
                    int(e.label),
                    float(e.p_positive),
                    float(e.seconds),
                    self.records[e.request_id].t,
                    e.text_digest,
                    e.text,
                )
                for e in entries
            )
        self._evict(now)

    async def feedback(self, request_id: str, label: int) -> dict | None:
        """Record the true label of an answered request: the versions that scored it, None if the id is
        unknown (never answered, or past retention), or {"conflict": label} if it has another label already
        (the same label again is a no-op, so a client may retry). Looked up again for `grace_s` first: the
        replica's record of a request may still be on its way when its client already sends feedback; then
        in the log, which keeps what the memory has let go. Raises LogUnavailable where the log cannot take it."""
        self._evict(time.time())
        deadline = time.monotonic() + self.cfg.grace_s
        while (rec := self.records.get(request_id)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if rec is None and self.log is not None:
            rec = await self._from_log(request_id)
        if rec is None or time.time() - rec.t > self.cfg.retention_s:
            return None
        if rec.label is not None and rec.label != int(label):  # the first label stands: no silent rewrite
            return {"conflict": rec.label}
        if rec.label is None:
            rec.label = int(label)
            try:
                if self.writer is not None:
                    await self.writer.label(Label(request_id, int(label), time.time()))
            except LogUnavailable:
                rec.label = None  # not kept anywhere: the client's retry starts afresh
                raise
            self.feedback_total += 1
        return {"answered_by": rec.answered_by, "versions": sorted(rec.by)}

    async def report(self, champion: str | None, challenger: str | None) -> dict[str, Any]:
        """Per version (the ones the asking replica serves): counts, latency, agreement with the
        champion, confidence difference, live accuracy and F1; and the two on the same requests."""
        self._evict(time.time())
        versions = {CHAMPION: champion, CHALLENGER: challenger}
        out: dict[str, Any] = {
            slot: (self._version_stats(v, champion if slot == CHALLENGER else None) if v else None)
            for slot, v in versions.items()
        }
        out["paired"] = None
        if champion and challenger:
            paired = await self.evidence(champion, challenger)
            ch = _live_metrics(paired["labels"], paired["champion"])
            cl = _live_metrics(paired["labels"], paired["challenger"])
            out["paired"] = {
                "labelled": len(paired["labels"]),
                "champion_f1": ch["f1"],
                "challenger_f1": cl["f1"],
                "delta_f1": None if ch["f1"] is None else cl["f1"] - ch["f1"],
            }
        out["store"] = {
            "records": len(self.records),
            "labelled": sum(r.label is not None for r in self.records.values()),
            "feedback_total": self.feedback_total,
            "evicted": self.evicted,
            "max_records": self.cfg.max_records,
            "retention_s": self.cfg.retention_s,
            "started_at": self.started_at,
            "log": None if self.writer is None else {**self.writer.report(), "loaded": self.loaded},
        }
        self._publish(out)
        return out

    async def evidence(self, champion: str, challenger: str, limit: int | None = None) -> dict[str, Any]:
        """The labelled requests both versions scored, in the order their labels came (the first `limit`):
        ids, labels and each version's labels. From the log where there is one (all it keeps), after
        writing what is pending; else from memory."""
        self._evict(time.time())
        head = {"champion_version": champion, "challenger_version": challenger}
        if self.log is None:
            return {**head, **self._memory_pairs(champion, challenger, limit), "source": "memory"}
        await self.writer.flush()
        since = time.time() - self.cfg.retention_s
        pairs = await asyncio.to_thread(self.log.paired, champion, challenger, since, limit)
        return {**head, **pairs, "source": "log"}

    async def check_health(self) -> None:
        # Ray drops a gauge not set again within two export intervals: re-set them every health check.
        if self.slots:
            await self.report(self.slots.get(CHAMPION), self.slots.get(CHALLENGER))

    # ------------------------------------------------------------------ the durable log
    def _load(self) -> None:
        """The newest predictions and their labels, back from the log (a restarted store)."""
        preds, labels = self.log.recent(time.time() - self.cfg.retention_s, self.cfg.max_records)
        self._remember(preds, labels)
        self.loaded = len(self.records)
        if self.records:
            log.info("evidence store: %d requests (%d labelled) loaded from the log", len(self.records), len(labels))

    async def _from_log(self, request_id: str) -> _Record | None:
        preds, label = await asyncio.to_thread(self.log.find, request_id)
        self._remember(preds, {} if label is None else {request_id: label})
        return self.records.get(request_id)

    def _remember(self, preds: list[Prediction], labels: dict[str, int]) -> None:
        """Predictions and labels read back from the log, into the memory view (every row of one request
        carries the time its record was made)."""
        for p in preds:
            rec = self.records.get(p.request_id)
            if rec is None:
                rec = self.records[p.request_id] = _Record(p.t)
            rec.scored(p.version, p.label, p.p_positive, p.answered)
            rec.label = labels.get(p.request_id)

    # ------------------------------------------------------------------ the memory view
    def _memory_pairs(self, champion: str, challenger: str, limit: int | None) -> dict[str, list]:
        ids, labels, champ, chal = [], [], [], []
        for rid, r in self.records.items():
            if r.label is not None and champion in r.by and challenger in r.by:
                ids.append(rid)
                labels.append(r.label)
                champ.append(r.by[champion][0])
                chal.append(r.by[challenger][0])
        n = len(ids) if limit is None else limit
        return {"request_ids": ids[:n], "labels": labels[:n], "champion": champ[:n], "challenger": chal[:n]}

    def _version_stats(self, version: str, champion: str | None) -> dict[str, Any]:
        labels, preds = [], []
        both = agree = 0
        conf_diff = p_diff = 0.0
        for r in self.records.values():
            mine = r.by.get(version)
            if mine is None:
                continue
            if r.label is not None:
                labels.append(r.label)
                preds.append(mine[0])
            theirs = r.by.get(champion) if champion else None
            if theirs is not None:
                both += 1
                agree += mine[0] == theirs[0]
                conf_diff += _confidence(mine[1]) - _confidence(theirs[1])
                p_diff += abs(mine[1] - theirs[1])
        stats: dict[str, Any] = {
            "version": version,
            "answered": self.counts[(version, "answered")],
            "mirrored": self.counts[(version, "mirrored")],
            "latency": {role: _latency(self.latency[(version, role)]) for role in ("answered", "mirrored")},
            "live": _live_metrics(labels, preds),
        }
        if champion:
            stats["compared_with_champion"] = both
            stats["agreement"] = agree / both if both else None
            stats["confidence_diff"] = conf_diff / both if both else None  # challenger minus champion
            stats["p_positive_abs_diff"] = p_diff / both if both else None
        return stats

    def _evict(self, now: float) -> None:
        while self.records:
            rid, oldest = next(iter(self.records.items()))
            if len(self.records) <= self.cfg.max_records and now - oldest.t <= self.cfg.retention_s:
                return
            del self.records[rid]
            self.evicted += 1

    def _publish(self, report: dict[str, Any]) -> None:
        for slot in (CHAMPION, CHALLENGER):
            stats = report.get(slot)
            if stats is not None:
                self.metrics.set_version(slot, stats)


def _expand_head_ip(uri: str) -> str:
    from ray_jobs.runtime import HEAD_IP, expand_head_ip

    if HEAD_IP not in uri:
        return uri
    import ray

    return expand_head_ip(uri, ray.get_runtime_context().gcs_address)


# Every call is a few dictionary operations on the actor's event loop, except a label that waits (up to
# grace_s) for its record: with Serve's default of 5 calls at a time, five early labels held every slot and
# the records they waited for queued behind them (tests/test_rollout_serve.py). Calls wait in the loop.
STORE_MAX_ONGOING = 1000
LiveEvidenceService = serve.deployment(num_replicas=1, max_ongoing_requests=STORE_MAX_ONGOING)(LiveEvidence)


def evidence_deployment(a: AppArgs):
    """The bound store deployment for the app `a` describes, or None where feedback is off."""
    f, s = a.serve.feedback, a.serve
    if not f.enabled:
        return None
    config = f.model_dump(mode="json")
    log_uri = evidence_log_uri(s, a.registry) if f.log.enabled else None
    return LiveEvidenceService.options(
        name=f"{s.app_name}-evidence",
        ray_actor_options={"num_cpus": f.num_cpus},
        version=settings_version(config, s.app_name, log_uri),  # kept across the app's redeploys
        _internal=True,
    ).bind(config, s.app_name, log_uri)

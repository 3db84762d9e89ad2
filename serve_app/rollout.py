"""Live evidence in the serving path: canary routing, what replicas send, and the store that keeps it.

A replica that serves a challenger beside the champion (ray_jobs.rollout: shadow or canary) answers each
text with one version and, for a `mirror` share of texts, has the other version score it after the
answer has left. Every answer carries a `request_id`. Replicas send what each version predicted for
each request id (`EvidenceFeed`, fire-and-forget) to one `LiveEvidence` replica, which keeps a bounded,
time-limited store of them. POST /feedback adds a request's true label there; GET /challenger reports,
per version, requests, agreement with the champion, confidence difference, latency and live F1, and
GET /challenger/evidence hands the labelled requests both versions scored to `python -m ray_jobs registry promote`.

Nothing here can fail a request: a replica sends one call at a time without waiting for it and drops
what it cannot send (counted); the store being down costs /feedback and /challenger a 503, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from typing import Any, NamedTuple

import numpy as np
from ray import serve

from ray_jobs.config import FeedbackConfig
from ray_jobs.inference import classification_metrics
from serve_app.schemas import AppArgs

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
_SEND_TIMEOUT_S = 30.0
_MAX_BUFFERED = 20_000  # entries a replica holds while it cannot send them; beyond it the oldest are dropped
_LATENCIES_KEPT = 10_000  # per version and role, for the percentiles /challenger reports


def unit_hash(key: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by `key`: the same key always falls on the same side of a share."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def routes_to_challenger(routing_key: str, share: float) -> bool:
    """Canary routing: sticky per key (one client, one version), `share` of keys on average."""
    return unit_hash(routing_key, "canary") < share


def is_mirrored(request_id: str, fraction: float) -> bool:
    """Whether the version that did not answer also scores this request (a hash of its id, independent
    of the canary's)."""
    return fraction >= 1.0 or unit_hash(request_id, "mirror") < fraction


class Entry(NamedTuple):
    """One version's prediction for one request, as a replica sends it."""

    request_id: str
    slot: str  # champion | challenger
    version: str
    answered: bool  # this version's prediction was the answer (else it was mirrored)
    label: int
    p_positive: float
    seconds: float  # the model's time for the batch the text was in


class EvidenceFeed:
    """The replica's side: buffers entries and sends them to the store, one call at a time, at once
    (feedback for a request may follow its answer within milliseconds). Runs on the replica's loop."""

    def __init__(self, store):
        self.store = store
        self._buffer: list[Entry] = []
        self._sending: asyncio.Future | None = None
        self.dropped = 0  # entries never sent (counted, for /challenger and tests)

    def add(self, entries: list[Entry]) -> None:
        self._buffer.extend(entries)
        if len(self._buffer) > _MAX_BUFFERED:
            self.dropped += len(self._buffer) - _MAX_BUFFERED
            del self._buffer[: len(self._buffer) - _MAX_BUFFERED]
        self.flush()

    def flush(self) -> None:
        if self._buffer and (self._sending is None or self._sending.done()):
            self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._buffer:  # what arrived during a send goes in the next one, without waiting for a request
            chunk, self._buffer = self._buffer, []
            try:
                await asyncio.wait_for(self.store.record.remote(chunk), _SEND_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - evidence must never fail a request
                self.dropped += len(chunk)
                log.warning("live evidence store unreachable, %d predictions not kept: %s", len(chunk), err)
                return


class _Record:
    __slots__ = ("t", "answered_by", "by", "label")

    def __init__(self, t: float):
        self.t = t
        self.answered_by: str | None = None
        self.by: dict[str, tuple[int, float]] = {}  # version -> (label, P(positive))
        self.label: int | None = None


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
    """One replica for the app: predictions by request id, true labels from feedback, live metrics."""

    def __init__(self, feedback: dict[str, Any]):
        """`feedback`: the app's `serve.feedback` section."""
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

    # ------------------------------------------------------------------ calls from the ingress
    async def record(self, entries: list[Entry]) -> None:
        now = time.time()
        for e in entries:
            rec = self.records.get(e.request_id)
            if rec is None:
                rec = self.records[e.request_id] = _Record(now)
            rec.by[e.version] = (int(e.label), float(e.p_positive))
            role = "answered" if e.answered else "mirrored"
            if e.answered:
                rec.answered_by = e.version
            self.counts[(e.version, role)] += 1
            self.latency[(e.version, role)].append(float(e.seconds))
            self.slots[e.slot] = e.version
        self._evict(now)

    async def feedback(self, request_id: str, label: int) -> dict | None:
        """Record the true label of an answered request: the versions that scored it, None if the id is
        unknown (never answered, or evicted), or {"conflict": label} if it has another label already (the
        same label again is a no-op, so a client may retry). Looked up again for `grace_s` first: the replica's
        record of a request may still be on its way when its client already sends feedback."""
        self._evict(time.time())
        deadline = time.monotonic() + self.cfg.grace_s
        while (rec := self.records.get(request_id)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if rec is None or time.time() - rec.t > self.cfg.retention_s:
            return None
        if rec.label is not None and rec.label != int(label):  # the first label stands: no silent rewrite
            return {"conflict": rec.label}
        if rec.label is None:
            self.feedback_total += 1
        rec.label = int(label)
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
        paired = self.evidence_arrays(champion, challenger) if champion and challenger else None
        out["paired"] = None
        if paired is not None:
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
        }
        self._publish(out)
        return out

    def evidence_arrays(self, champion: str, challenger: str) -> dict[str, Any]:
        """The labelled requests both versions scored: their ids, labels and each version's labels."""
        ids, labels, champ, chal = [], [], [], []
        for rid, r in self.records.items():
            if r.label is not None and champion in r.by and challenger in r.by:
                ids.append(rid)
                labels.append(r.label)
                champ.append(r.by[champion][0])
                chal.append(r.by[challenger][0])
        return {
            "champion_version": champion,
            "challenger_version": challenger,
            "request_ids": ids,
            "labels": labels,
            "champion": champ,
            "challenger": chal,
        }

    async def evidence(self, champion: str, challenger: str) -> dict[str, Any]:
        self._evict(time.time())
        return self.evidence_arrays(champion, challenger)

    async def check_health(self) -> None:
        # Ray drops a gauge not set again within two export intervals: re-set them every health check.
        if self.slots:
            await self.report(self.slots.get(CHAMPION), self.slots.get(CHALLENGER))

    # ------------------------------------------------------------------ internals
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
    # Every step of a rollout redeploys the app, and `serve.run` gives each deployment a new random
    # version, which replaces its replicas: the store would lose its predictions and labels at every
    # shadow -> canary -> promote. A version fixed by the store's own settings keeps its replica
    # across redeploys (Serve compares versions; `version` is only accepted as an internal option).
    version = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return LiveEvidenceService.options(
        name=f"{s.app_name}-evidence",
        ray_actor_options={"num_cpus": f.num_cpus},
        version=version,
        _internal=True,
    ).bind(config)

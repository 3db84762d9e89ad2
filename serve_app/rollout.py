"""Live evidence in the serving path: canary routing, mirroring, and what replicas send.

A replica that serves a challenger beside the champion (ray_jobs.rollout: shadow or canary) answers each
text with one version and, for a `mirror` share of texts, has the other version score it after the
answer has left. Every answer carries a `request_id`. Replicas send what each version predicted for
each request id (`EvidenceFeed`, fire-and-forget) to the app's live evidence store
(serve_app.evidence_store), which writes it to the durable log (ray_jobs.evidence_log).

Nothing here can fail a request: a replica sends one call at a time without waiting for it, keeps what it
could not send (bounded) and sends it again once the store is back; only what overflows is dropped, counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from ray_jobs.data import unit_hash

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
_SEND_TIMEOUT_S = 30.0
_MAX_BUFFERED = 20_000  # entries a replica holds while it cannot send them; beyond it the oldest are dropped
_RETRY_S = 1.0  # a replica's pause before it sends again to a store that failed (restarting, most likely)


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
    text_digest: str = ""
    text: str | None = None  # only where serve.log_texts is on


class EvidenceFeed:
    """The replica's side: buffers entries and sends them to the store, one call at a time, at once
    (feedback for a request may follow its answer within milliseconds). Runs on the replica's loop."""

    def __init__(self, store):
        self.store = store
        self._buffer: list[Entry] = []
        self._sending: asyncio.Future | None = None
        self.dropped = 0  # entries never sent (counted, for /challenger and tests)
        self.resent = 0  # entries sent again after the store failed them

    def add(self, entries: list[Entry]) -> None:
        self._buffer.extend(entries)
        self._bound()
        self.flush()

    def _bound(self) -> None:
        if len(self._buffer) > _MAX_BUFFERED:
            self.dropped += len(self._buffer) - _MAX_BUFFERED
            del self._buffer[: len(self._buffer) - _MAX_BUFFERED]

    def flush(self) -> None:
        if self._buffer and (self._sending is None or self._sending.done()):
            self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._buffer:  # what arrived during a send goes in the next one, without waiting for a request
            chunk, self._buffer = self._buffer, []
            try:
                await asyncio.wait_for(self.store.record.remote(chunk), _SEND_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - evidence must never fail a request
                # Kept and sent again: a store that was killed comes back within seconds (Serve replaces it),
                # and the log's writes ignore what a timed-out call did write already.
                log.warning("live evidence store unreachable, %d predictions kept to resend: %s", len(chunk), err)
                self._buffer[:0] = chunk
                self.resent += len(chunk)
                self._bound()
                await asyncio.sleep(_RETRY_S)

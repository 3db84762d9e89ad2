"""The models a replica serves: the champion, and a challenger beside it during a shadow or canary.

Each runs in a supervised process of its own (serve_app.model_worker) with a dynamic batch queue of its
own (`@serve.batch`); a swap loads the new model first and changes slots between batches, so requests in
flight finish on the model they started with. A canary answers the texts whose routing key falls in its
share; the version that did not answer scores a `mirror` share after the answer is ready, off the
response path. What each version predicted goes to the live evidence store (serve_app.evidence_store).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from ray import serve

from ray_jobs.config import ServeConfig
from ray_jobs.model import LABELS
from serve_app.drift_monitor import DriftFeed
from serve_app.http import ApiError
from serve_app.loading import load_served_model, resolve_version
from serve_app.metrics import ServeMetrics
from serve_app.model_worker import ModelWorkerError
from serve_app.rollout import CHALLENGER, CHAMPION, Entry, EvidenceFeed, is_mirrored, routes_to_challenger
from serve_app.schemas import AppArgs, ChallengerInfo, FailedSwap, ModelInfo
from serve_app.supervised_model import SupervisedModel, TextFailed, text_digest


def max_ongoing_requests(a: ServeConfig) -> int:
    # Ray's default of 5 would cap a batch at 5. Room for two batches in flight and one gathering
    # behind them, and more: requests beyond it wait in the caller's router, which backs off and
    # retries; measured (serve_load.py, default proxy, 128 clients) 2x the batch collapsed to
    # 13 req/s with batches of 5, 4x the batch gave 168 req/s with batches of 25.
    return a.max_ongoing_requests or 4 * a.max_batch_size


def _tagged(result, version: str, slot: str, seconds: float):
    """A prediction with the version and slot that made it; a TextFailed passes as it is."""
    if isinstance(result, TextFailed):
        return result
    return {**result, "model_version": version, "_slot": slot, "_s": seconds}


def _entry(request_id: str, answer: dict, answered: bool, text: str, keep_text: bool) -> Entry:
    """What the live evidence store keeps (and logs) of one version's answer to one request."""
    return Entry(
        request_id,
        answer["_slot"],
        answer["model_version"],
        answered,
        int(answer["label"] == LABELS[1]),
        float(answer["probabilities"][LABELS[1]]),
        float(answer["_s"]),
        text_digest(text),
        text if keep_text else None,
    )


def _public(answer: dict, request_id: str) -> dict:
    """The answer a client gets: without the replica's bookkeeping, with its request id."""
    return {**{k: v for k, v in answer.items() if not k.startswith("_")}, "request_id": request_id}


class ModelSlots:
    """The champion and, during a rollout, the challenger a replica serves: loading and hot swaps, each
    version's batch queue, canary routing, mirroring, and the admission bound. The replica's endpoints
    (serve_app.app.SentimentModel) build on it. Over ~150 lines because the two batch queues, the swaps
    that replace their models and the mirroring between them share one state: split, each part would
    reach into the others'."""

    def __init__(self, args: dict[str, Any], drift=None, evidence=None):
        """`drift`, `evidence`: handles to the drift monitor and live evidence deployments
        (serve_app.drift_monitor, serve_app.evidence_store), None where off."""
        self.args = AppArgs.model_validate(args)
        d = self.args.serve.drift
        self.drift = drift
        self.drift_feed = DriftFeed(drift, d.send_every, d.window_size) if drift is not None else None
        self.predictor: SupervisedModel | None = None
        self.info: ModelInfo | None = None
        # A challenger beside the champion (shadow or canary; ray_jobs.rollout), in a process of its own.
        self.evidence = evidence
        self.evidence_feed = EvidenceFeed(evidence) if evidence is not None else None
        self.challenger: SupervisedModel | None = None
        self.challenger_info: ChallengerInfo | None = None
        self.challenger_error: str | None = None
        self._mirrored_in_flight = 0
        self._mirror_tasks: set[asyncio.Future] = set()
        self.mirror_skipped = 0  # texts the other version did not score (busy, gone or failed)
        self.canary_fallbacks = 0  # canary texts the champion answered because the challenger failed
        self.load_error: str | None = None
        self.failed_swap: FailedSwap | None = None
        self.metrics = ServeMetrics()
        self._swap_lock = asyncio.Lock()
        self._batches = self._batched_items = 0
        self._forward_total_s = 0.0
        # Texts admitted and not yet answered. Serve bounds requests, and one /batch_predict request
        # can hold max_batch_items texts: the bound that keeps queues short is counted in texts.
        self._texts_in_flight = 0
        self._max_texts = self.args.serve.max_texts_in_flight or 2 * max_ongoing_requests(self.args.serve)
        # The model process computes one batch at a time. Two batches are in flight
        # (`max_concurrent_batches=2`): the next one is already queued there and starts the moment the
        # current one ends, instead of after the event loop has sent the current batch's answers
        # (measured: ~28 ms idle per batch, 13%, with one batch in flight).
        self._in_flight = 0
        self._wait_s = self.args.serve.batch_wait_timeout_s  # the configured wait, for an idle model
        self._forward_s = 0.0  # moving average of one forward pass

    # -------------------------------------------------------------- configuration and health
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings and, if the model changed, load it and swap it in. Requests in
        flight finish on the model they started with; the next batch uses the new one. A swap that
        fails keeps the old model and is reported by /health, /model and a metric."""
        self._predict_batch.set_max_batch_size(int(user_config.get("max_batch_size", self.args.serve.max_batch_size)))
        self._wait_s = float(user_config.get("batch_wait_timeout_s", self.args.serve.batch_wait_timeout_s))
        self._set_wait(self._wait_s)
        uri = user_config.get("model_uri", self.args.model_uri)
        version = str(user_config.get("model_version") or "")
        async with self._swap_lock:
            await self._swap_champion(uri, version)
            await self._swap_challenger(user_config.get("challenger"))

    async def _swap_champion(self, uri: str, version: str) -> None:
        if self.info is not None and self.info.model_uri == uri and self.info.version == version:
            return
        try:
            version = version or await asyncio.to_thread(resolve_version, self.args, uri)
            predictor, info = await load_served_model(self.args, uri, version)
        except Exception as err:
            if self.predictor is None:
                self.load_error = f"{type(err).__name__}: {err}"
                raise
            # Keep serving the model we have: a failed swap must not take the endpoint down.
            self.failed_swap = FailedSwap(
                model_uri=uri, version=version or None, error=f"{type(err).__name__}: {err}", at=time.time()
            )
            self.metrics.count_failed_swap()
            return
        old, self.predictor, self.info = self.predictor, predictor, info
        self.load_error = self.failed_swap = None
        self.metrics.set_model_version(info.version)
        if old is not None:
            # Batches already handed to the old model finish on it (no await lies between a batch
            # taking `self.predictor` and submitting to it), then its process leaves.
            asyncio.get_running_loop().run_in_executor(None, old.close)

    async def _swap_challenger(self, spec: dict | None) -> None:
        """Load, change or drop the challenger. One that cannot load leaves the champion serving alone
        (reported at /model and /challenger): a challenger never takes the endpoint down."""
        current = self.challenger_info
        if spec is not None and current is not None and current.version == spec["version"]:
            self.challenger_info = current.model_copy(update={k: spec[k] for k in ("mode", "share", "mirror")})
            return
        old, self.challenger, self.challenger_info = self.challenger, None, None
        self.challenger_error = None
        if spec is not None:
            try:
                predictor, info = await load_served_model(self.args, spec["model_uri"], spec["version"], features=False)
            except Exception as err:  # noqa: BLE001 - reported; the champion serves alone
                self.challenger_error = f"{type(err).__name__}: {err}"
                self.metrics.count_failed_swap()
            else:
                self.challenger = predictor
                self.challenger_info = ChallengerInfo(**spec, loaded_at=info.loaded_at)
        if old is not None:
            asyncio.get_running_loop().run_in_executor(None, old.close)

    def _set_wait(self, seconds: float) -> None:
        self.current_wait_s = seconds  # what the batch queue uses now (tests read it)
        self._predict_batch.set_batch_wait_timeout_s(seconds)

    def batch_stats(self) -> dict[str, float]:
        """Batches run, texts in them and seconds spent in forward passes since start (exact, for load
        tests through a handle: `serve.get_deployment_handle(...).batch_stats.remote()`; Prometheus
        has the histogram). Forward seconds against wall time tell an idle model from a slow one."""
        return {"batches": self._batches, "items": self._batched_items, "forward_s": self._forward_total_s}

    def status(self) -> tuple[str, str]:
        """("ok" | "degraded" | "unavailable", reason). Degraded still answers: a model process is being
        replaced (requests wait for it), or a hot swap failed and the previous model serves."""
        if self.predictor is None:
            return "unavailable", self.load_error or "no model loaded"
        if self.predictor.state == "failed":
            return "unavailable", self.predictor.reason
        if self.predictor.state == "degraded":
            return "degraded", self.predictor.reason
        if self.failed_swap is not None:
            return (
                "degraded",
                f"serving v{self.info.version}; the swap to {self.failed_swap.model_uri} failed: "
                f"{self.failed_swap.error}",
            )
        return "ok", ""

    async def check_health(self) -> None:
        """Serve replaces a replica whose check raises: only when its model process cannot be brought
        back (restarts keep failing). A process that died is replaced inside the replica."""
        if self.predictor is not None:
            await self.predictor.check()
            self.metrics.set_restarts(self.predictor.restarts, self.predictor.poisoned)
        if self.challenger is not None:
            await self.challenger.check()  # a challenger that cannot come back is skipped, never fatal
        if self.drift_feed is not None:
            self.drift_feed.flush()  # texts of a quiet spell reach the monitor's window too
        if self.evidence_feed is not None:
            self.evidence_feed.flush()
        if self.info is not None:
            # Ray drops a gauge value that is not set again within two metrics export intervals: the
            # served version is re-set on every health check (every 10 s) so that it stays visible.
            self.metrics.set_model_version(self.info.version)
        state, reason = self.status()
        if state == "unavailable":
            raise RuntimeError(reason)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica. (Without it the model process would still leave,
        # on end-of-file, when this process exits.)
        for model in (getattr(self, "predictor", None), getattr(self, "challenger", None)):
            if model is not None:
                model.close()

    # -------------------------------------------------------------- batching
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _predict_batch(self, texts: list[str]) -> list[dict]:
        predictor, info = self.predictor, self.info  # one model for the whole batch, even during a swap
        self.metrics.observe_batch(len(texts))
        self._batches += 1
        self._batched_items += len(texts)
        # While the model computes, the batch behind it may gather requests for most of that time:
        # with the configured short wait it would leave with a handful and keep batches small.
        self._in_flight += 1
        self._set_wait(max(self._wait_s, 0.8 * self._forward_s))
        try:
            # A batch whose process dies or wedges is re-run on a replacement process (SupervisedModel).
            results, seconds, features = await predictor.run(texts)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._set_wait(self._wait_s)
        self._forward_total_s += seconds
        self._forward_s = seconds if not self._forward_s else 0.8 * self._forward_s + 0.2 * seconds
        results = [_tagged(r, info.version, CHAMPION, seconds) for r in results]
        self.metrics.count_labels(r["label"] for r in results if isinstance(r, dict))
        if self.challenger_info is not None:
            self.metrics.observe_version_batch(CHAMPION, info.version, len(texts), seconds)
        if self.drift_feed is not None and features is not None:
            self.drift_feed.add((info.model_uri, info.version, info.loaded_at), features)
        return results

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _challenger_batch(self, texts: list[str]) -> list[dict]:
        """The challenger's own batch queue: canary answers and shadow (mirrored) texts."""
        predictor, info = self.challenger, self.challenger_info
        if predictor is None or info is None:
            raise ModelWorkerError("no challenger is served")
        results, seconds, _ = await predictor.run(texts)
        self.metrics.observe_version_batch(CHALLENGER, info.version, len(texts), seconds)
        return [_tagged(r, info.version, CHALLENGER, seconds) for r in results]

    def _live_challenger(self) -> ChallengerInfo | None:
        """The challenger to route and mirror to now: None where there is none or it cannot come back."""
        if self.challenger is None or self.challenger.state == "failed":
            return None
        return self.challenger_info

    async def _answer(self, text: str, by_challenger: bool) -> dict:
        if by_challenger:
            try:
                answer = await self._challenger_batch(text)
                if isinstance(answer, dict):
                    return answer
            except ModelWorkerError:
                pass
            self.canary_fallbacks += 1  # a failing challenger costs its canary share latency, not errors
        answer = await self._predict_batch(text)
        if isinstance(answer, TextFailed):
            raise ApiError(422, f"the model failed on this text (sha256 {answer.digest}...): {answer.reason}")
        return answer

    def _mirror(self, items: list[tuple[str, str, str]]) -> None:
        """Have the other version score (request_id, text, slot) items after their answers have left,
        as many as `serve.feedback.max_mirrored_in_flight` allows; the rest are skipped and counted."""
        room = max(0, self.args.serve.feedback.max_mirrored_in_flight - self._mirrored_in_flight)
        take = items[:room]
        if len(items) > room:
            self.mirror_skipped += len(items) - room
            self.metrics.count_mirror_skipped(len(items) - room)
        if take:
            self._mirrored_in_flight += len(take)
            task = asyncio.ensure_future(self._run_mirror(take))
            self._mirror_tasks.add(task)  # a reference, so the task is not collected mid-way
            task.add_done_callback(self._mirror_tasks.discard)

    async def _run_mirror(self, items: list[tuple[str, str, str]]) -> None:
        batch = {CHAMPION: self._predict_batch, CHALLENGER: self._challenger_batch}
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(batch[slot](text) for _, text, slot in items), return_exceptions=True),
                self.args.serve.request_timeout_s,
            )
        except Exception as err:  # noqa: BLE001 - a mirror never reaches a client: counted, not raised
            results = [err] * len(items)
        finally:
            self._mirrored_in_flight -= len(items)
        pairs = zip(items, results, strict=True)
        keep = self.args.serve.log_texts
        entries = [_entry(rid, r, False, text, keep) for (rid, text, _), r in pairs if isinstance(r, dict)]
        failed = len(items) - len(entries)
        if failed:
            self.mirror_skipped += failed
            self.metrics.count_mirror_skipped(failed)
        if entries and self.evidence_feed is not None:
            self.evidence_feed.add(entries)

    async def _predict(self, texts: list[str], routing_key: str | None = None) -> list[dict]:
        """Admit `texts` against the replica's text bound, then let each join the dynamic batch on its
        own, so that a big request and many small ones share batches. With a challenger: a canary
        answers the texts whose routing key (else request id) falls in its share; the version that did
        not answer scores a `mirror` share once the answers are ready, off the response path."""
        state, reason = self.status()
        if state == "unavailable":
            raise ApiError(503, reason)
        if self._texts_in_flight + len(texts) > self._max_texts:
            raise ApiError(503, f"replica busy: {self._texts_in_flight} texts in flight, limit {self._max_texts}")
        ids = [uuid.uuid4().hex for _ in texts]
        chal = self._live_challenger()
        canary = [
            chal is not None and chal.mode == "canary" and routes_to_challenger(routing_key or rid, chal.share)
            for rid in ids
        ]
        self._texts_in_flight += len(texts)
        try:
            answers = list(await asyncio.gather(*(self._answer(t, c) for t, c in zip(texts, canary, strict=True))))
        finally:
            self._texts_in_flight -= len(texts)
        keep = self.args.serve.log_texts
        entries = [_entry(rid, a, True, t, keep) for rid, a, t in zip(ids, answers, texts, strict=True)]
        if self.evidence_feed is not None:
            self.evidence_feed.add(entries)
        if chal is not None:
            other = {CHAMPION: CHALLENGER, CHALLENGER: CHAMPION}
            mirrored = [
                (e.request_id, t, other[e.slot])
                for e, t in zip(entries, texts, strict=True)
                if is_mirrored(e.request_id, chal.mirror)
            ]
            if mirrored:
                self._mirror(mirrored)
        return [_public(a, rid) for a, rid in zip(answers, ids, strict=True)]

"""The Ray Serve application: the champion model behind autoscaled replicas with dynamic batching.

    serve.run(build_app({"serve": {"model_uri": "models:/sentiment-distilbert@champion"}}))   # Python session
    serve run serve_app.app:build_app serve.model_uri=models:/sentiment-distilbert@champion      # CLI

Which model a replica serves travels in `user_config`. `serve.run` (ray_jobs.deploy) gives each deploy a
new deployment version, so Serve rolls the replicas over (new ones load the model, old ones drain);
a `serve deploy` of an unchanged config file whose alias moved changes `user_config` only, and Serve
calls `reconfigure` on the running replicas, which swap the model in between batches.
`build_app` trial-loads the model first, so a deploy of a model that cannot load is refused before
anything running changes.

A challenger (ray_jobs.rollout: shadow or canary, recorded in the registry) is loaded beside the champion
in a model process of its own, with a batch queue of its own: a canary answers the texts whose routing
key falls in its share, and the version that did not answer scores a `mirror` share after the answer is
ready. What each version predicted goes to the live evidence store (serve_app.rollout) by request id.

Faults (README, Reliability): the model runs in a supervised process of its own; a dead or wedged
one is replaced inside the replica and its batches re-run. Every request has a deadline (504), a
replica admits a bounded number of texts (503 with Retry-After beyond it), and bad input is a 4xx.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from ray_jobs.config import ServeConfig
from ray_jobs.model import LABELS
from ray_jobs.onnx_runtime import RuntimeChoice, RuntimeInfo
from ray_jobs.registry import Registry, Rollout, parse_model_uri
from serve_app.drift_monitor import DriftFeed, drift_deployment
from serve_app.explainer import explain_deployment
from serve_app.model_worker import ModelWorker, ModelWorkerError, SupervisedModel
from serve_app.rollout import (
    CHALLENGER,
    CHAMPION,
    Entry,
    EvidenceFeed,
    evidence_deployment,
    is_mirrored,
    routes_to_challenger,
)
from serve_app.schemas import (
    AppArgs,
    BatchPrediction,
    BatchPredictRequest,
    ChallengerInfo,
    ErrorBody,
    ExplainRequest,
    Explanation,
    FailedSwap,
    FeedbackRequest,
    ModelInfo,
    Prediction,
    PredictRequest,
)

# Seconds a client is asked to wait before retrying a 503 (Retry-After).
RETRY_AFTER_S = 1
# The request header whose value picks a canary's version: one key, one version (sticky per client).
ROUTING_KEY_HEADER = "x-routing-key"
MAX_ROUTING_KEY_CHARS = 256


class ApiError(Exception):
    """An answer other than 200, with `{"error": message}`. A 503 tells the client when to retry."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


def resolve_version(args: AppArgs, model_uri: str) -> str:
    """The concrete version an alias points to now ('local' for a folder)."""
    return Registry(args.registry).resolve_version(model_uri)


def locate_model(args: AppArgs, model_uri: str, version: str) -> tuple[str, ModelInfo]:
    """(model folder, ModelInfo) for a concrete version, reading metadata from the registry."""
    name, alias, _ = parse_model_uri(model_uri)
    reg = Registry(args.registry)
    model_dir = reg.version_dir(model_uri, version)
    tags = (reg.for_model(name).get_version(version).tags or {}) if name is not None else {}
    f1 = tags.get("test_f1")
    info = ModelInfo(
        name=name or Path(model_uri).name,
        version=version,
        alias=alias,
        model_uri=model_uri,
        test_f1=float(f1) if f1 else None,
        data_digest=tags.get("data_digest.test"),
        loaded_at=time.time(),
    )
    return model_dir, info


def worker_factory(args: AppArgs, model_dir: str, features: bool | None = None):
    """What starts one model process for `model_dir` (the supervisor calls it again to replace one).
    `features`: answers carry drift features (default: where drift monitoring is on)."""
    return functools.partial(
        ModelWorker,
        model_dir,
        num_threads=max(1, int(args.serve.num_cpus)),
        precision=args.serve.precision,
        deadline_s=args.serve.batch_deadline_s,
        features=args.serve.drift.enabled if features is None else features,
        runtime=RuntimeChoice.of(args.serve),
    )


async def load_served_model(
    args: AppArgs, model_uri: str, version: str, features: bool | None = None
) -> tuple[SupervisedModel, ModelInfo]:
    """(SupervisedModel, ModelInfo) for a concrete version. The model runs in a process of its own
    (see serve_app.model_worker for why), replaced if it dies or wedges."""
    model_dir, info = await asyncio.to_thread(locate_model, args, model_uri, version)
    model = await SupervisedModel.create(
        worker_factory(args, model_dir, features), max_restarts=args.serve.max_model_restarts
    )
    return model, info


def challenger_config(model_uri: str, rollout: Rollout | None) -> dict | None:
    """The challenger part of `user_config`: what a replica loads beside the champion."""
    if rollout is None:
        return None
    name, _, _ = parse_model_uri(model_uri)
    return {
        "version": rollout.version,
        "model_uri": f"models:/{name}/{rollout.version}",
        "mode": rollout.mode,
        "share": rollout.share,
        "mirror": rollout.mirror,
    }


def trial_load(args: AppArgs, model_uri: str, version: str) -> None:
    """Load the model once in a throwaway process and answer one text: a model that cannot load or
    predict is refused here, before a deployment changes (ModelWorkerError says why)."""
    model_dir, _ = locate_model(args, model_uri, version)
    worker = worker_factory(args, model_dir, features=False)()
    try:
        worker.predict(["a trial prediction before deploying"])
    finally:
        worker.close()


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, checked in the order that keeps bad input cheap: content type,
    size (413 before anything is parsed), UTF-8, JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json (got '{ctype or 'none'}')")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:
        # Valid JSON that Python refuses: nesting deeper than the recursion limit, integers longer
        # than the int digit limit. Still the client's input, never a 500.
        raise ApiError(400, f"JSON the server will not parse: {type(err).__name__}: {str(err)[:120]}") from None


def _validated(model_cls, data: Any):
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5]]
        raise ApiError(422, "; ".join(parts)) from None


def check_text(text: str, max_chars: int, where: str = "text") -> None:
    if not text.strip():
        raise ApiError(422, f"{where}: must not be empty or whitespace only")
    if len(text) > max_chars:
        raise ApiError(422, f"{where}: {len(text)} characters exceeds the limit of {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{where}: contains invalid Unicode (an unpaired surrogate)") from None


def _body_schema(model_cls) -> dict:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model_cls.model_json_schema()}}}
    }


api = FastAPI(
    title="Sentiment classifier",
    description='DistilBERT sentiment classification served by Ray Serve. Errors answer `{"error": ...}`.',
    version="0.1.0",
)
_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return err.response()


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)


def _entry(request_id: str, answer: dict, answered: bool) -> Entry:
    """What the live evidence store keeps of one version's answer to one request."""
    return Entry(
        request_id,
        answer["_slot"],
        answer["model_version"],
        answered,
        int(answer["label"] == LABELS[1]),
        float(answer["probabilities"][LABELS[1]]),
        float(answer["_s"]),
    )


def _public(answer: dict, request_id: str) -> dict:
    """The answer a client gets: without the replica's bookkeeping, with its request id."""
    return {**{k: v for k, v in answer.items() if not k.startswith("_")}, "request_id": request_id}


class SentimentModel:
    """The replica's logic. Plain class so that tests can await its batched method without a cluster;
    `SentimentService` below is the Serve deployment built from it."""

    def __init__(self, args: dict[str, Any], explainer=None, drift=None, evidence=None):
        """`explainer`, `drift`, `evidence`: handles to the /explain, drift monitor and live evidence
        deployments (serve_app.explainer, serve_app.drift_monitor, serve_app.rollout), None where off."""
        from serve_app.metrics import ServeMetrics

        self.args = AppArgs.model_validate(args)
        self.explainer = explainer
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
            self.metrics.set_restarts(self.predictor.restarts)
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
        results = [{**r, "model_version": info.version, "_slot": CHAMPION, "_s": seconds} for r in results]
        self.metrics.count_labels(r["label"] for r in results)
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
        return [{**r, "model_version": info.version, "_slot": CHALLENGER, "_s": seconds} for r in results]

    def _live_challenger(self) -> ChallengerInfo | None:
        """The challenger to route and mirror to now: None where there is none or it cannot come back."""
        if self.challenger is None or self.challenger.state == "failed":
            return None
        return self.challenger_info

    async def _answer(self, text: str, by_challenger: bool) -> dict:
        if by_challenger:
            try:
                return await self._challenger_batch(text)
            except ModelWorkerError:
                self.canary_fallbacks += 1  # a failing challenger costs its canary share latency, not errors
        return await self._predict_batch(text)

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
        entries = [_entry(rid, r, answered=False) for (rid, _, _), r in pairs if isinstance(r, dict)]
        failed = len(items) - len(entries)
        if failed:
            self.mirror_skipped += failed
            self.metrics.count_mirror_skipped(failed)
        if entries and self.evidence_feed is not None:
            self.evidence_feed.add(entries)

    async def _timed(self, endpoint: str, handler, timeout_s: float | None = None):
        start = time.perf_counter()
        status = 500
        timeout_s = timeout_s or self.args.serve.request_timeout_s
        try:
            # The replica's own deadline, so that no request hangs even where the HTTP layer sets none
            # (`serve run ...:build_app`); the proxy's timeout is set a little longer (ray_jobs.deploy).
            response = await asyncio.wait_for(handler(), timeout_s)
            status = 200
            return response
        except ApiError as err:
            status = err.status
            raise
        except TimeoutError:
            status = 504
            raise ApiError(504, f"no answer within the request deadline of {timeout_s:g}s") from None
        except ModelWorkerError as err:
            # Restarts of the model process did not bring it back (or the model failed on this batch).
            status = 503
            raise ApiError(503, f"model unavailable: {err}") from None
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)

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
        entries = [_entry(rid, a, answered=True) for rid, a in zip(ids, answers, strict=True)]
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

    # -------------------------------------------------------------- endpoints
    @api.get("/health", responses={503: {"model": ErrorBody}})
    async def health(self):
        state, reason = self.status()
        if state == "unavailable":
            return JSONResponse(
                {"status": state, "error": reason}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        body = {"status": state, "model_version": self.info.version}
        if reason:
            body["reason"] = reason
        return body

    @api.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
    async def model(self):
        if self.info is None:
            raise ApiError(503, self.load_error or "no model loaded")
        restarts = self.predictor.restarts if self.predictor is not None else 0
        return self.info.model_copy(
            update={
                "failed_swap": self.failed_swap,
                "model_restarts": restarts,
                # model_copy does not validate: the process's plain dict becomes the schema's model here.
                "runtime": RuntimeInfo(**runtime) if (runtime := self.predictor and self.predictor.runtime) else None,
                "challenger": self.challenger_info,
                "challenger_error": self.challenger_error,
            }
        )

    @api.post("/predict", response_model=Prediction, responses=_ERRORS, openapi_extra=_body_schema(PredictRequest))
    async def predict(self, request: Request):
        async def handle():
            req = _validated(PredictRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            check_text(req.text, self.args.serve.max_text_chars)
            # A ready JSONResponse skips FastAPI's re-validation and re-encoding of an answer our own
            # code built (the schema stays in /docs): less work on the event loop per request.
            return JSONResponse((await self._predict([req.text], routing_key(request)))[0])

        return await self._timed("predict", handle)

    @api.post(
        "/batch_predict",
        response_model=BatchPrediction,
        responses=_ERRORS,
        openapi_extra=_body_schema(BatchPredictRequest),
    )
    async def batch_predict(self, request: Request):
        async def handle():
            req = _validated(BatchPredictRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            if not req.texts:
                raise ApiError(422, "texts: must hold at least one text")
            if len(req.texts) > self.args.serve.max_batch_items:
                raise ApiError(
                    422, f"texts: {len(req.texts)} items exceeds the limit of {self.args.serve.max_batch_items}"
                )
            for i, t in enumerate(req.texts):
                check_text(t, self.args.serve.max_text_chars, where=f"texts[{i}]")
            return JSONResponse({"predictions": await self._predict(req.texts, routing_key(request))})

        return await self._timed("batch_predict", handle)

    @api.post("/explain", response_model=Explanation, responses=_ERRORS, openapi_extra=_body_schema(ExplainRequest))
    async def explain(self, request: Request):
        """Word attributions of the served model's prediction, computed by the explainer deployment."""
        e = self.args.serve.explain

        async def handle():
            if self.explainer is None:
                raise ApiError(404, "explanations are off for this app (serve.explain.enabled: false)")
            req = _validated(ExplainRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            check_text(req.text, self.args.serve.max_text_chars)
            n_steps = req.n_steps or e.n_steps
            if n_steps > e.max_n_steps:
                raise ApiError(422, f"n_steps: {n_steps} exceeds the limit of {e.max_n_steps}")
            info = self.info
            if info is None:
                raise ApiError(503, self.load_error or "no model loaded")
            response = self.explainer.explain.remote(info.model_uri, info.version, req.text, n_steps)
            try:
                result = await response
            except BackPressureError:
                raise ApiError(503, f"explainer busy: {e.max_queued_requests} explanations already wait") from None
            except asyncio.CancelledError:
                response.cancel()  # past the deadline: the explainer drops it if it has not started it
                raise
            return JSONResponse({**result, "model_version": info.version})

        return await self._timed("explain", handle, e.timeout_s)

    @api.get("/drift", responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def drift_report(self):
        """Drift of the served traffic against the served version's reference profile: the open
        window, the last full windows (per test: statistic, p-value, threshold, alarm) and the alarm."""

        async def handle():
            if self.drift is None:
                raise ApiError(404, "drift monitoring is off for this app (serve.drift.enabled: false)")
            info = self.info
            if info is None:
                raise ApiError(503, self.load_error or "no model loaded")
            try:
                report = await self.drift.report.remote(info.model_uri, info.version, info.loaded_at)
            except Exception as err:  # the monitor died or is restarting: Serve brings it back
                raise ApiError(503, f"drift monitor unavailable: {type(err).__name__}") from None
            return JSONResponse({**report, "replica_dropped_texts": self.drift_feed.dropped})

        return await self._timed("drift", handle)

    @api.post(
        "/feedback",
        responses={code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)},
        openapi_extra=_body_schema(FeedbackRequest),
    )
    async def feedback(self, request: Request):
        """The true label of an answered request (by its request_id): live accuracy and F1 per version."""

        async def handle():
            store = self._evidence_store()
            req = _validated(FeedbackRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            label = next(i for i, name in LABELS.items() if name == req.label)
            try:
                found = await store.feedback.remote(req.request_id, label)
            except Exception as err:  # the store died or is restarting: Serve brings it back
                raise ApiError(503, f"live evidence store unavailable: {type(err).__name__}") from None
            if found is None:
                f = self.args.serve.feedback
                raise ApiError(
                    404,
                    f"unknown request_id '{req.request_id[:64]}': never answered, or no longer kept "
                    f"(the last {f.max_records} predictions, for {f.retention_s:g}s)",
                )
            return JSONResponse({"request_id": req.request_id, "label": req.label, **found})

        return await self._timed("feedback", handle)

    @api.get("/challenger", responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def challenger_report(self):
        """The champion and the challenger on live traffic: per version requests answered and mirrored,
        latency, agreement with the champion, confidence difference, live accuracy and F1 on labelled
        requests, and both versions' F1 on the same labelled requests."""

        async def handle():
            store = self._evidence_store()
            chal = self.challenger_info
            try:
                report = await store.report.remote(self.info.version, chal.version if chal else None)
            except Exception as err:
                raise ApiError(503, f"live evidence store unavailable: {type(err).__name__}") from None
            rollout = chal.model_dump() if chal else {"mode": "off"}
            replica = {
                "mirror_skipped": self.mirror_skipped,
                "canary_fallbacks": self.canary_fallbacks,
                "evidence_dropped": self.evidence_feed.dropped,
                "challenger_state": self.challenger.state if self.challenger else None,
            }
            body = {"rollout": rollout, "challenger_error": self.challenger_error, **report, "replica": replica}
            return JSONResponse(body)

        return await self._timed("challenger", handle)

    @api.get("/challenger/evidence", responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    async def challenger_evidence(self):
        """The labelled requests both versions scored (ids, true labels, each version's labels): what
        `python -m ray_jobs.registry promote <version>` decides on."""

        async def handle():
            store = self._evidence_store()
            if self.challenger_info is None:
                raise ApiError(404, f"no challenger is served ({self.challenger_error or 'no shadow or canary runs'})")
            try:
                body = await store.evidence.remote(self.info.version, self.challenger_info.version)
            except Exception as err:
                raise ApiError(503, f"live evidence store unavailable: {type(err).__name__}") from None
            return JSONResponse({**body, "mode": self.challenger_info.mode})

        return await self._timed("challenger_evidence", handle)

    def _evidence_store(self):
        if self.evidence is None:
            raise ApiError(404, "live feedback is off for this app (serve.feedback.enabled: false)")
        if self.info is None:
            raise ApiError(503, self.load_error or "no model loaded")
        return self.evidence


def routing_key(request: Request) -> str | None:
    """The canary routing key a client sends (X-Routing-Key), if any; else each text's request id."""
    key = request.headers.get(ROUTING_KEY_HEADER)
    if key is not None and len(key) > MAX_ROUTING_KEY_CHARS:
        raise ApiError(422, f"{ROUTING_KEY_HEADER}: longer than {MAX_ROUTING_KEY_CHARS} characters")
    return key or None


SentimentService = serve.deployment(ray_actor_options={"num_cpus": 1})(serve.ingress(api)(SentimentModel))


def max_ongoing_requests(a: ServeConfig) -> int:
    # Ray's default of 5 would cap a batch at 5. Room for two batches in flight and one gathering
    # behind them, and more: requests beyond it wait in the caller's router, which backs off and
    # retries; measured (serve_load.py, default proxy, 128 clients) 2x the batch collapsed to
    # 13 req/s with batches of 5, 4x the batch gave 168 req/s with batches of 25.
    return a.max_ongoing_requests or 4 * a.max_batch_size


def user_config(args: AppArgs, model_version: str, rollout: Rollout | None = None) -> dict[str, Any]:
    """What a redeploy may change without restarting replicas (a `serve deploy` of a config file whose
    args are unchanged while the alias moved: Serve calls `reconfigure`)."""
    return {
        "model_uri": args.model_uri,
        "model_version": model_version,
        "challenger": challenger_config(args.model_uri, rollout),
        "max_batch_size": args.serve.max_batch_size,
        "batch_wait_timeout_s": args.serve.batch_wait_timeout_s,
    }


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The typed app builder: validates `args`, resolves the model alias to a concrete version now
    (so that a later redeploy with a new champion is a change Serve applies by `reconfigure`), and
    trial-loads that version (`serve.trial_load`): a model that cannot load or predict raises here,
    and the running app is left as it is."""
    a = (args if isinstance(args, AppArgs) else AppArgs.model_validate(args)).with_absolute_paths()
    s, scaling = a.serve, a.serve.autoscaling
    version = resolve_version(a, a.model_uri)
    # A shadow or canary the registry records (ray_jobs.rollout) for the champion served now.
    rollout = Registry(a.registry).served_rollout(a.model_uri, version)
    challenger = challenger_config(a.model_uri, rollout)
    if s.trial_load:
        for uri, v in [(a.model_uri, version)] + ([(challenger["model_uri"], rollout.version)] if rollout else []):
            try:
                trial_load(a, uri, v)
            except Exception as err:
                raise ModelWorkerError(f"deploy refused: {uri} (version {v}) does not load: {err}") from None
    return SentimentService.options(
        name=f"{s.app_name}-model",
        ray_actor_options={"num_cpus": s.num_cpus, "resources": dict(s.resources)},
        max_ongoing_requests=max_ongoing_requests(s),
        max_queued_requests=s.max_queued_requests,
        # A replica that leaves (downscale, redeploy) stops taking requests, then waits for the ones
        # it holds: up to a request's deadline.
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=s.request_timeout_s + 5,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(1, scaling.min_replicas),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        },
        user_config=user_config(a, version, rollout),
    ).bind(a.model_dump(mode="json"), explain_deployment(a), drift_deployment(a), evidence_deployment(a))

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
ready. What each version predicted goes to the live evidence store (serve_app.evidence_store) by request id.

Faults (README, Reliability): the model runs in a supervised process of its own; a dead or wedged
one is replaced inside the replica and its batches re-run. Every request has a deadline (504), a
replica admits a bounded number of texts (503 with Retry-After beyond it), and bad input is a 4xx.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from ray_jobs.model import LABELS
from ray_jobs.onnx_runtime import RuntimeInfo
from ray_jobs.registry import Registry, Rollout
from serve_app.drift_monitor import drift_deployment
from serve_app.evidence_store import evidence_deployment
from serve_app.explainer import explain_deployment, explainer_room
from serve_app.http import (
    ERRORS,
    RETRY_AFTER_S,
    ApiError,
    api,
    body_schema,
    check_text,
    read_json_body,
    require_bearer,
    routing_key,
    validated,
)
from serve_app.loading import challenger_config, resolve_version, trial_load
from serve_app.model_worker import ModelWorkerError
from serve_app.schemas import (
    AppArgs,
    BatchPrediction,
    BatchPredictRequest,
    ErrorBody,
    ExplainRequest,
    Explanation,
    FeedbackRequest,
    ModelInfo,
    Prediction,
    PredictRequest,
)
from serve_app.slots import ModelSlots, max_ongoing_requests


class SentimentModel(ModelSlots):
    """The replica: its HTTP endpoints over the served models (ModelSlots). Plain class so that tests can
    await its batched method without a cluster; `SentimentService` below is the Serve deployment built
    from it. Over ~150 lines: one short method per endpoint, each a parse -> call -> answer."""

    def __init__(self, args: dict[str, Any], explainer=None, drift=None, evidence=None):
        """`explainer`: a handle to the /explain deployment (serve_app.explainer), None where off;
        `drift`, `evidence`: see ModelSlots."""
        super().__init__(args, drift, evidence)
        self.explainer = explainer
        # /feedback and /challenger/evidence change or reveal other clients' data: a bearer token guards
        # them, read once here (a bad token file fails the replica's start, saying why).
        self.feedback_token = self.args.serve.feedback.token()

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
                "poison_texts": self.predictor.poisoned if self.predictor is not None else 0,
                # model_copy does not validate: the process's plain dict becomes the schema's model here.
                "runtime": RuntimeInfo(**runtime) if (runtime := self.predictor and self.predictor.runtime) else None,
                "challenger": self.challenger_info,
                "challenger_error": self.challenger_error,
            }
        )

    @api.post("/predict", response_model=Prediction, responses=ERRORS, openapi_extra=body_schema(PredictRequest))
    async def predict(self, request: Request):
        async def handle():
            req = validated(PredictRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            check_text(req.text, self.args.serve.max_text_chars)
            # A ready JSONResponse skips FastAPI's re-validation and re-encoding of an answer our own
            # code built (the schema stays in /docs): less work on the event loop per request.
            return JSONResponse((await self._predict([req.text], routing_key(request)))[0])

        return await self._timed("predict", handle)

    @api.post(
        "/batch_predict",
        response_model=BatchPrediction,
        responses=ERRORS,
        openapi_extra=body_schema(BatchPredictRequest),
    )
    async def batch_predict(self, request: Request):
        async def handle():
            req = validated(BatchPredictRequest, await read_json_body(request, self.args.serve.max_body_bytes))
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

    @api.post("/explain", response_model=Explanation, responses=ERRORS, openapi_extra=body_schema(ExplainRequest))
    async def explain(self, request: Request):
        """Word attributions of the served model's prediction, computed by the explainer deployment."""
        e = self.args.serve.explain

        async def handle():
            if self.explainer is None:
                raise ApiError(404, "explanations are off for this app (serve.explain.enabled: false)")
            req = validated(ExplainRequest, await read_json_body(request, self.args.serve.max_body_bytes))
            check_text(req.text, self.args.serve.max_text_chars)
            n_steps = req.n_steps or e.n_steps
            if n_steps > e.max_n_steps:
                raise ApiError(422, f"n_steps: {n_steps} exceeds the limit of {e.max_n_steps}")
            info = self.info
            if info is None:
                raise ApiError(503, self.load_error or "no model loaded")
            room = await asyncio.to_thread(explainer_room, self.args)
            response = self.explainer.explain.remote(info.model_uri, info.version, req.text, n_steps)
            try:
                if room is None:
                    result = await response
                else:
                    # No replica and no room for one: the request waits briefly (Serve and a cluster
                    # autoscaler see the demand meanwhile), then gets 503 instead of a 504 at the deadline.
                    try:
                        result = await asyncio.wait_for(asyncio.ensure_future(response), e.start_wait_s)
                    except TimeoutError:
                        response.cancel()
                        raise ApiError(503, f"{room} (waited {e.start_wait_s:g}s)") from None
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
        responses={code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503, 504)},
        openapi_extra=body_schema(FeedbackRequest),
    )
    async def feedback(self, request: Request):
        """The true label of an answered request (by its request_id): live accuracy and F1 per version."""

        async def handle():
            require_bearer(request, self.feedback_token, "/feedback")
            store = self._evidence_store()
            req = validated(FeedbackRequest, await read_json_body(request, self.args.serve.max_body_bytes))
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
            if "conflict" in found:
                raise ApiError(
                    409,
                    f"request_id '{req.request_id[:64]}' is labelled '{LABELS[found['conflict']]}' already: "
                    "a label is not replaced",
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

    @api.get("/challenger/evidence", responses={code: {"model": ErrorBody} for code in (401, 403, 404, 422, 503, 504)})
    async def challenger_evidence(self, request: Request):
        """The labelled requests both versions scored (ids, true labels, each version's labels), in the
        order their labels came (`?limit=N`: the first N): what `python -m ray_jobs registry promote
        <version>` decides on. Needs the feedback token."""

        async def handle():
            require_bearer(request, self.feedback_token, "/challenger/evidence")
            store = self._evidence_store()
            if self.challenger_info is None:
                raise ApiError(404, f"no challenger is served ({self.challenger_error or 'no shadow or canary runs'})")
            limit = request.query_params.get("limit")
            if limit is not None and not (limit.isdigit() and int(limit) >= 1):
                raise ApiError(422, "limit: a positive integer (the first that many labelled requests)")
            try:
                body = await store.evidence.remote(
                    self.info.version, self.challenger_info.version, int(limit) if limit else None
                )
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


SentimentService = serve.deployment(ray_actor_options={"num_cpus": 1})(serve.ingress(api)(SentimentModel))


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
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "resources": dict(s.resources)},
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

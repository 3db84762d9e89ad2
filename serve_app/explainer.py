"""The deployment behind POST /explain: integrated gradients (ray_jobs.explain) on replicas of their own.

Why apart from the model replicas: one explanation costs `n_steps` forward and backward passes, tens of
/predict batches' worth of compute. In the prediction batches it would hold every request queued
behind it; here it waits only on other explanations. Bounds (serve.explain, ray_jobs/config.py): one
explanation at a time per replica (`max_ongoing_requests=1`: they are compute-bound, two at once only
share the cores), at most `max_queued_requests` waiting (the ingress answers 503 beyond), a deadline
(504; the cancelled explanation stops before its next forward pass), and `min_replicas: 0` by default, so
an app whose /explain is never called pays nothing for it. Where no explainer replica runs and the
cluster has no room to start one, the ingress answers 503 within `serve.explain.start_wait_s` instead of
waiting out the deadline (ModelSlots-side: serve_app.app).

The ingress names the model with every call (its URI and the concrete version it serves), so an
explanation is always of the model that answers /predict, also across a hot swap: a replica loads a
version the first time it is asked for it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ray import serve

from ray_jobs.explain import Explainer, ExplanationCancelled
from ray_jobs.registry import Registry
from serve_app.schemas import AppArgs


class ExplainModel:
    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        self._explainer: Explainer | None = None
        self._loaded: tuple[str, str] | None = None
        # A thread lock, not an asyncio one: a request cancelled at its deadline leaves its thread
        # computing, and the next explanation must wait for it (captum hooks the embedding layer).
        self._lock = threading.Lock()

    async def explain(self, model_uri: str, version: str, text: str, n_steps: int) -> dict[str, Any]:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._explain, model_uri, version, text, n_steps, cancel)
        except asyncio.CancelledError:
            # The request's deadline passed (the ingress cancelled it): its thread stops before its next
            # forward pass instead of computing on while the next request waits for the lock.
            cancel.set()
            raise

    def _explain(self, model_uri: str, version: str, text: str, n_steps: int, cancel: threading.Event) -> dict:
        with self._lock:
            if cancel.is_set():
                raise ExplanationCancelled("explanation cancelled before it started")
            if self._loaded != (model_uri, version):
                self._explainer = self._loaded = None  # the old model's memory goes before the new one loads
                model_dir = Registry(self.args.registry).version_dir(model_uri, version)
                e = self.args.serve.explain
                self._explainer = Explainer(
                    model_dir, max(1, int(e.num_cpus)), precision=e.precision, device="cuda" if e.num_gpus else "cpu"
                )
                self._loaded = (model_uri, version)
            assert self._explainer is not None
            return self._explainer.explain(text, n_steps, cancel)


ExplainService = serve.deployment(max_ongoing_requests=1)(ExplainModel)


def explainer_room(a: AppArgs) -> str | None:
    """Blocking (two calls to Ray): None where an explainer replica runs or the cluster has the resources
    to start one now; else why not, for a 503. An unknown state (another app name, the controller busy)
    is None: the request then waits for a replica as before."""
    import ray

    e, s = a.serve.explain, a.serve
    try:
        states = serve.status().applications[s.app_name].deployments[f"{s.app_name}-explainer"].replica_states
        if states.get("RUNNING", 0):
            return None
        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - no answer is no reason to refuse
        return None
    need = {"CPU": e.num_cpus, "GPU": e.num_gpus, **s.resources}
    short = {k: v for k, v in need.items() if v and free.get(k, 0.0) < v}
    if not short:
        return None
    wanted = ", ".join(f"{v:g} {k} ({free.get(k, 0.0):g} free)" for k, v in short.items())
    return (
        f"no explainer replica runs and the cluster has no room to start one (it needs {wanted}); "
        "reserve one with serve.explain.min_replicas"
    )


def explain_deployment(a: AppArgs):
    """The bound explainer deployment for the app `a` describes, or None where explanations are off."""
    e, s = a.serve.explain, a.serve
    if not e.enabled:
        return None
    return ExplainService.options(
        name=f"{s.app_name}-explainer",
        ray_actor_options={"num_cpus": e.num_cpus, "num_gpus": e.num_gpus, "resources": dict(s.resources)},
        max_queued_requests=e.max_queued_requests,
        autoscaling_config={
            "min_replicas": e.min_replicas,
            "initial_replicas": e.min_replicas,
            "max_replicas": e.max_replicas,
            # One explanation at a time per replica: a second one waiting asks for another replica.
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": e.downscale_delay_s,
        },
    ).bind(a.model_dump(mode="json"))

"""The deployment behind POST /explain: integrated gradients (ray_jobs.explain) on replicas of their own.

Why apart from the model replicas: one explanation costs `n_steps` forward and backward passes, tens of
/predict batches' worth of compute. In the prediction batches it would hold every request queued
behind it; here it waits only on other explanations. Bounds (serve.explain, ray_jobs/config.py): one
explanation at a time per replica (`max_ongoing_requests=1`: they are compute-bound, two at once only
share the cores), at most `max_queued_requests` waiting (the ingress answers 503 beyond), a deadline
(504), and `min_replicas: 0` by default, so an app whose /explain is never called pays nothing for it.

The ingress names the model with every call (its URI and the concrete version it serves), so an
explanation is always of the model that answers /predict, also across a hot swap: a replica loads a
version the first time it is asked for it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ray import serve

from ray_jobs.explain import Explainer
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
        return await asyncio.to_thread(self._explain, model_uri, version, text, n_steps)

    def _explain(self, model_uri: str, version: str, text: str, n_steps: int) -> dict[str, Any]:
        with self._lock:
            if self._loaded != (model_uri, version):
                self._explainer = self._loaded = None  # the old model's memory goes before the new one loads
                model_dir = Registry(self.args.registry).version_dir(model_uri, version)
                e = self.args.serve.explain
                self._explainer = Explainer(
                    model_dir, max(1, int(e.num_cpus)), precision=e.precision, device="cuda" if e.num_gpus else "cpu"
                )
                self._loaded = (model_uri, version)
            assert self._explainer is not None
            return self._explainer.explain(text, n_steps)


ExplainService = serve.deployment(max_ongoing_requests=1)(ExplainModel)


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

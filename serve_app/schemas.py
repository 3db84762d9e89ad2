"""Request/response bodies of the HTTP API, and the typed arguments of the Serve app builder."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from ray_jobs.config import RegistryConfig, ServeConfig, nest_dotted, served_model_uri
from ray_jobs.onnx_runtime import RuntimeInfo


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="the review to classify (non-empty; at most max_text_chars characters)")


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="reviews to classify (1..max_batch_items), answered in the same order")


class Prediction(BaseModel):
    label: Literal["positive", "negative"]
    score: float
    probabilities: dict[str, float]
    model_version: str = Field(description="the registered version that produced this answer")
    request_id: str = Field(description="names this prediction in POST /feedback")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(description="the request_id of an answer")
    label: Literal["negative", "positive"] = Field(description="the true label of that answer's text")


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="the review to explain (non-empty; at most max_text_chars characters)")
    n_steps: int | None = Field(
        None, ge=1, description="integration steps (default serve.explain.n_steps, at most serve.explain.max_n_steps)"
    )


class WordAttribution(BaseModel):
    word: str = Field(description="the word as it appears in the text: text[start:end]")
    start: int
    end: int
    score: float = Field(description="> 0 pushed toward the predicted label, < 0 against it")


class Explanation(BaseModel):
    label: Literal["positive", "negative"]
    score: float
    probabilities: dict[str, float]
    words: list[WordAttribution] = Field(description="every word the model saw, in the order of the text")
    method: Literal["integrated_gradients"]
    target: str = Field(description="what the word scores add up to: the predicted label's logit margin")
    n_steps: int
    convergence_delta: float = Field(description="|sum of scores - change of the target from the baseline|")
    tokens: int
    truncated: bool = Field(description="the text was cut to the model's max_length: later words have no score")
    seconds: float
    model_version: str


class FailedSwap(BaseModel):
    """A hot swap this replica could not make: it kept serving the model it had."""

    model_uri: str
    version: str | None
    error: str
    at: float


class ChallengerInfo(BaseModel):
    """The challenger a replica serves beside the champion (ray_jobs.rollout)."""

    version: str
    model_uri: str
    mode: Literal["shadow", "canary"]
    share: float = Field(description="canary: the share of routing keys it answers")
    mirror: float = Field(description="the share of requests the version that did not answer also scores")
    loaded_at: float


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    model_uri: str
    test_f1: float | None
    data_digest: str | None
    loaded_at: float
    failed_swap: FailedSwap | None = None
    model_restarts: int = Field(0, description="model processes replaced in this replica (died or wedged)")
    poison_texts: int = Field(0, description="texts this replica's model raised on, answered 422 (digests: the log)")
    runtime: RuntimeInfo | None = None
    challenger: ChallengerInfo | None = None
    challenger_error: str | None = Field(None, description="why the configured challenger is not served")


class ErrorBody(BaseModel):
    error: str


class AppArgs(BaseModel):
    """Arguments of `build_app`: the pipeline config's `serve` and `registry` sections, so a setting
    has one declaration (ray_jobs/config.py) whichever way the app is deployed.

    Nested (`{"serve": {"port": 8001}}`, a Serve config file's `args`) or dotted
    (`serve run serve_app.app:build_app serve.model_uri=... registry.root=runs/mlflow`)."""

    model_config = ConfigDict(extra="forbid")

    serve: ServeConfig = ServeConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, data: Any) -> Any:
        return nest_dotted(data) if isinstance(data, dict) else data

    @property
    def model_uri(self) -> str:
        return served_model_uri(self.serve, self.registry)

    def with_absolute_paths(self) -> AppArgs:
        """Replicas may run in another working directory: pin relative paths to where the app is built."""
        return self.model_copy(
            update={"serve": self.serve.with_absolute_paths(), "registry": self.registry.with_absolute_paths()}
        )


def settings_version(*parts: Any) -> str:
    """A Serve deployment version fixed by the settings a deployment's replica reads (JSON-able `parts`).
    Every rollout step redeploys the app, and `serve.run` gives each deployment a new random version,
    which replaces its replicas: a stateful helper (the evidence store, the drift monitor) would lose
    what it holds at every shadow -> canary -> promote. With a fixed version Serve keeps its replica
    until those settings change (`version` is only accepted with `_internal=True`)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]

"""Request/response bodies of the HTTP API, and the typed arguments of the Serve app builder."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr


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
    model_version: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


class FailedSwap(BaseModel):
    """A hot swap this replica could not make: it kept serving the model it had."""

    model_uri: str
    version: str | None
    error: str
    at: float


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


class ErrorBody(BaseModel):
    error: str


class AppArgs(BaseModel):
    """Arguments of `build_app`; `serve run serve_app.app:build_app key=value` fills them from strings."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = "models:/sentiment-distilbert@champion"
    tracking_uri: str | None = None
    registry_root: str = "runs/mlflow"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_cpus: float = Field(1, gt=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    max_text_chars: int = Field(20000, ge=1)
    max_batch_items: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # Faults (README, Reliability).
    request_timeout_s: float = Field(30, gt=0, description="a request not answered by then gets 504")
    max_texts_in_flight: int | None = Field(None, ge=1, description="texts a replica admits at once; default 2 x max_ongoing_requests")
    batch_deadline_s: float | None = Field(None, gt=0, description="a batch the model process has not answered by then "
                                           "means a wedged process; default: derived from the model's measured speed")
    max_model_restarts: int = Field(3, ge=0, description="model-process replacements per minute before the replica is unhealthy")
    trial_load: bool = Field(True, description="build_app loads the model once first and refuses a deploy it cannot load")
    name: str = "sentiment"

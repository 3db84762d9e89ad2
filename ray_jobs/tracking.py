"""MLflow tracking: the store's client, experiments, runs, their parameters, metrics, tags and artifacts.

`Tracking` is the base of ray_jobs.registry.Registry, which adds the model registry on the same client.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_jobs.config import PipelineConfig, RegistryConfig, absolute_path
from ray_jobs.errors import RegistryError, SentimentError


def resolve_tracking_uri(cfg: RegistryConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{absolute_path(cfg.root)}/mlflow.db"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ray", "torch", "transformers", "mlflow", "pydantic", "datasets", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Tracking:
    """An MLflow tracking store (the registry's `tracking_uri`, else the embedded sqlite store under
    `root`). The client is created on first use, so constructing one touches nothing."""

    def __init__(self, cfg: RegistryConfig):
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg)
        self.name = cfg.model_name
        self._client = None
        self._experiment_id: str | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def client(self):
        if self._client is None:
            import mlflow
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            self._client = MlflowClient(self.uri, self.uri)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        """Run an MLflow call, turning any failure into a RegistryError that says what failed."""
        try:
            return fn(*args, **kwargs)
        except SentimentError:
            raise
        except Exception as err:
            raise RegistryError(f"MLflow {what} failed at {self.uri}: {type(err).__name__}: {str(err)[:300]}") from None

    def ping(self) -> None:
        """Fail fast (RegistryError) if the tracking server / registry cannot be reached."""
        if self.uri.startswith(("http://", "https://")):
            # MLflow's HTTP client retries for minutes on a closed port; one quick probe decides.
            import httpx

            try:
                httpx.get(self.uri.rstrip("/") + "/health", timeout=5).raise_for_status()
            except Exception as err:
                raise RegistryError(f"MLflow server {self.uri} unreachable: {type(err).__name__}: {err}") from None
        self._call("search", self.client.search_registered_models, max_results=1)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self._call("get_experiment", self.client.get_experiment_by_name, self.cfg.experiment)
            if exp is None:
                location = None
                if self.cfg.tracking_uri is None:  # embedded store: artifacts beside the database
                    location = Path(absolute_path(self.cfg.root), "artifacts").as_uri()
                self._experiment_id = self._call(
                    "create_experiment", self.client.create_experiment, self.cfg.experiment, artifact_location=location
                )
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # ------------------------------------------------------------------ tracking
    def start_run(self, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._call("create_run", self.client.create_run, self.experiment_id(), run_name=run_name, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("set_terminated", self.client.set_terminated, run_id, status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            self._call("log_batch", self.client.log_batch, run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        self._call("log_dict", self.client.log_dict, run_id, data, name)

    def load_dict(self, run_id: str, name: str) -> Any | None:
        """A JSON artifact of the run (as log_dict wrote it); None where the run has none by that name."""
        folder = name.rpartition("/")[0] or None
        names = {a.path for a in self._call("list_artifacts", self.client.list_artifacts, run_id, folder)}
        if name not in names:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = self._call("download_artifacts", self.client.download_artifacts, run_id, name, tmp)
            return json.loads(Path(path).read_text())

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._call("log_text", self.client.log_text, run_id, text, name)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self._call("log_figure", self.client.log_figure, run_id, figure, name)

    def start_pipeline_run(
        self, cfg: PipelineConfig, digests: dict[str, str], counts: dict[str, int], run_name: str
    ) -> str:
        """The parent run of one pipeline run: config (artifact + hash), data digests, versions, commit."""
        import yaml

        tags = {
            "pipeline": cfg.name,
            "config_digest": cfg.digest(),
            **{f"data_digest.{k}": v for k, v in digests.items()},
            **{f"version.{k}": v for k, v in package_versions().items()},
        }
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        run_id = self.start_run(run_name, tags)
        record = cfg.for_the_record()
        flat = _flatten(record)
        self.log_params(run_id, {k: v for k, v in flat.items() if not k.startswith("tune.search_space")})
        self.log_text(run_id, yaml.safe_dump(record, sort_keys=False), "config.yaml")
        self.log_metrics(run_id, {f"n_{k}": v for k, v in counts.items()})
        return run_id

    def log_trial(
        self, parent_run_id: str, name: str, hparams: dict, history: list[dict], status: str, error: str | None = None
    ) -> str:
        """A nested run for one Tune trial: its hyper-parameters, each report's metrics (step = report
        index), and its final status."""
        run_id = self.start_run(name, {"trial_status": status}, parent_run_id=parent_run_id)
        self.log_params(run_id, hparams)
        for step, row in enumerate(history, start=1):
            self.log_metrics(
                run_id, {k: v for k, v in row.items() if k.startswith(("val_", "train_")) or k == "epoch"}, step=step
            )
        if error:
            self.set_tags(run_id, {"error": error[:4000]})
        self.end_run(run_id, "FINISHED" if status in ("TERMINATED", "STOPPED_EARLY") else "FAILED")
        return run_id

    def pipeline_runs(self, limit: int) -> list:
        """The newest `limit` pipeline runs (parent runs only: trials are nested runs), newest first."""
        runs = self._call(
            "search_runs",
            self.client.search_runs,
            [self.experiment_id()],
            filter_string="tags.pipeline != ''",
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
        return [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

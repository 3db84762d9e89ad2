"""The MLflow model registry: registering versions, aliases and the rollout record. With ray_jobs.tracking
(runs) and ray_jobs.registry_lock (the gate's lock), the only code that talks to MLflow.

Its command is `python -m ray_jobs registry` (ray_jobs.cli.registry); the gate's lock is ray_jobs.registry_lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ray_jobs.errors import RegistryError
from ray_jobs.registry_lock import GateLease, Writes, does_not_exist
from ray_jobs.tracking import Tracking

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
ROLLOUT_TAG = "rollout"
LOCK_SUFFIX = ".gate-lock"

_MODELS_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9_.\-]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, alias, version) of models:/<name>@<alias> or models:/<name>/<version>; (None, None, None)
    for a local folder. Anything else is a RegistryError."""
    m = _MODELS_URI.match(uri)
    if m:
        return m["name"], m["alias"], m["version"]
    if Path(uri).is_dir():
        return None, None, None
    raise RegistryError(
        f"model reference '{uri}' is neither models:/<name>@<alias>, models:/<name>/<version> nor a local folder"
    )


class Rollout(BaseModel):
    """A challenger on live traffic beside the champion (ray_jobs.rollout), as the registry records it
    (alias `challenger`, registered-model tag `rollout`) and the Serve app reads it when it is built.

    shadow: the champion answers every request; the challenger scores a `mirror` fraction of them
    after the answer has left. canary: requests whose routing key falls in `share` are answered by the
    challenger, the rest by the champion; the version that did not answer scores a `mirror` fraction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["shadow", "canary"]
    version: str = Field(pattern=r"^\d+$")
    champion: str = Field(pattern=r"^\d+$", description="the champion the challenger is compared with")
    share: float = Field(0.0, ge=0, le=1, description="canary: the share of routing keys the challenger answers")
    mirror: float = Field(1.0, ge=0, le=1, description="the share of requests the other version also scores")
    started_at: float = 0.0
    sample_size: int | None = Field(
        None,
        ge=1,
        description="the labelled requests the live decision is taken on, fixed when the rollout starts "
        "(gate.live_min_labelled then): the first that many, in the order their labels came",
    )


class Registry(Tracking):
    """The model registry for one registered model (versions, aliases, the rollout record, the gate's
    lock), on the tracking store of ray_jobs.tracking. Over ~150 lines: a facade with one short method
    per registry operation, each an MLflow call behind `_call`'s error handling."""

    @property
    def lock_name(self) -> str:
        return f"{self.name}{LOCK_SUFFIX}"

    @contextlib.contextmanager
    def lock(self, timeout_s: float = 3600, lease_s: float = 60, name: str | None = None) -> Iterator[GateLease]:
        """An exclusive lease on this model's aliases, held in the registry itself so that it holds for
        every driver that shares the registry: on other nodes, in other clusters. A heartbeat renews it
        every lease_s/4; a holder that died (SIGKILL, a lost node) stops renewing, and a waiter that sees
        no renewal for lease_s of its own clock takes it over. Yields a GateLease: write aliases and the
        rollout through `lease.fenced()` (or pass it to set_aliases & co.), which refuses the writes of a
        holder that lost its lease. Exact on a database store; ray_jobs.registry_lock says what holds where.
        `name`: another lock of the same kind on this model (retrain: one retraining at a time)."""
        lease = GateLease(self, lease_s, f"{self.name}.{name}-lock" if name else self.lock_name)
        lease.acquire(timeout_s)
        try:
            yield lease
        finally:
            lease.release()

    @contextlib.contextmanager
    def _writes(self, w: Writes | None) -> Iterator[Writes]:
        """`w` itself, or (None) writes under a lock taken for them alone."""
        if w is not None:
            yield w
            return
        with self.lock() as lease, lease.fenced() as own:
            yield own

    # ------------------------------------------------------------------ registry
    def register(
        self,
        run_id: str,
        model_dir: str,
        tags: dict[str, Any],
        extra_files: dict[str, bytes] | None = None,
        exclude: tuple[str, ...] = (),
    ) -> str:
        """Log the Hugging Face folder as the run's `model` artifacts and register it as a new version.
        `extra_files` (name: content) join the model folder first, so the version holds them from its
        start (the drift reference): the checkpoint folder itself is not written to. Files named in
        `exclude` are left out (a training checkpoint's resume state: optimizer moments, raw weights)."""
        import shutil

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            folder = model_dir
            if any((Path(model_dir) / name).exists() for name in exclude):
                folder = str(Path(tmp) / "model")
                shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(*exclude))
            self._call("log_artifacts", self.client.log_artifacts, run_id, folder, "model")
        if extra_files:
            self._log_model_files(run_id, extra_files)
        try:
            self.client.create_registered_model(
                self.name, description="DistilBERT sentiment classifier (Hugging Face folder, safetensors)"
            )
        except MlflowException as err:
            # Exists already: the usual case, and the loser of two first registrations at once.
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise RegistryError(f"MLflow create_registered_model failed at {self.uri}: {err}") from None
        run = self._call("get_run", self.client.get_run, run_id)
        mv = self._call(
            "create_model_version",
            self.client.create_model_version,
            self.name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
        )
        return str(mv.version)

    def _log_model_files(self, run_id: str, files: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(content)
            self._call("log_artifacts", self.client.log_artifacts, run_id, tmp, "model")

    def add_version_files(self, version: str, files: dict[str, bytes]) -> None:
        """Add files to a registered version's model folder after its registration (an ONNX export).
        Only where the version's files are its run's `model` artifacts, as `register` logs them."""
        mv = self.get_version(version)
        run = self._call("get_run", self.client.get_run, mv.run_id) if mv.run_id else None
        if run is None or mv.source.rstrip("/") != f"{run.info.artifact_uri}/model":
            raise RegistryError(
                f"version {version} of '{self.name}' keeps its files at {mv.source}, not in its run's model "
                "artifacts: files cannot be added to it"
            )
        self._log_model_files(mv.run_id, files)

    def get_version(self, version: str | int):
        return self._call(f"get_model_version {version}", self.client.get_model_version, self.name, str(version))

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as err:
            if does_not_exist(err):
                return None
            raise RegistryError(f"MLflow alias lookup failed at {self.uri}: {err}") from None
        except Exception as err:
            raise RegistryError(f"MLflow alias lookup failed at {self.uri}: {type(err).__name__}: {err}") from None

    def champion(self) -> str | None:
        return self.alias_version(CHAMPION)

    def model_dir(self, version: str | int) -> str:
        """A local folder holding the version's files (downloaded if the artifact store is remote)."""
        import mlflow

        mv = self._call(f"get_model_version {version}", self.client.get_model_version, self.name, str(version))
        return self._call(
            "download_artifacts", mlflow.artifacts.download_artifacts, artifact_uri=mv.source, tracking_uri=self.uri
        )

    def version_dir(self, model_uri: str, version: str) -> str:
        """A local folder holding `version` of the model `model_uri` names (a local folder: itself)."""
        name, _, _ = parse_model_uri(model_uri)
        return model_uri if name is None else self.for_model(name).model_dir(version)

    def for_model(self, name: str | None) -> Registry:
        """This registry for another registered model name (a models:/ URI may name any)."""
        if name is None or name == self.name:
            return self
        return Registry(self.cfg.model_copy(update={"model_name": name}))

    def resolve_version(self, model_uri: str) -> str:
        """The concrete version a models:/ URI names now ('local' for a folder)."""
        name, alias, version = parse_model_uri(model_uri)
        if name is None:
            return "local"
        if version:
            return version
        resolved = self.for_model(name).alias_version(alias)
        if resolved is None:
            raise RegistryError(
                f"registered model '{name}' has no alias '{alias}' (has the gate promoted a model yet?)"
            )
        return resolved

    def resolve_model_dir(self, ref: str) -> str:
        """`ref` is a local folder, a version number, models:/<name>/<version> or models:/<name>@<alias>."""
        if ref.isdigit() and not Path(ref).is_dir():
            return self.model_dir(ref)
        name, _, _ = parse_model_uri(ref)
        if name is None:
            return ref
        return self.for_model(name).model_dir(self.resolve_version(ref))

    def test_digest(self, ref: str) -> str | None:
        """The test split's digest recorded for the version `ref` names (see resolve_model_dir); None for a
        local folder or a version without one."""
        if not ref.isdigit() or Path(ref).is_dir():
            name, _, _ = parse_model_uri(ref)
            if name is None:
                return None
            target, version = self.for_model(name), self.resolve_version(ref)
        else:
            target, version = self, ref
        return (target.get_version(version).tags or {}).get("data_digest.test")

    def set_version_tags(self, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._call(
                "set_model_version_tag", self.client.set_model_version_tag, self.name, str(version), k, str(v)[:5000]
            )

    def record_history(self, event: dict[str, Any]) -> None:
        """Append a decision to the registered model's history (one tag per event, keyed by time)."""
        key = "history." + time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}"
        self._call(
            "set_registered_model_tag",
            self.client.set_registered_model_tag,
            self.name,
            key,
            json.dumps(event, default=str)[:5000],
        )

    def set_aliases(self, champion: str, previous: str | None, w: Writes | None = None) -> None:
        """Point `champion` (and `previous`) at versions: through `w` (GateLease.fenced()), else under a
        lock taken for this write."""
        with self._writes(w) as w:
            # `previous` first: where writes are not one transaction (an MLflow server) and the second
            # fails, the champion is unchanged (fail closed).
            if previous is not None and previous != champion:
                self._call("set alias", w.set_alias, PREVIOUS, str(previous))
            self._call("set alias", w.set_alias, CHAMPION, str(champion))

    def rollout(self) -> Rollout | None:
        """The challenger on live traffic, or None."""
        rm = self._registered_model()
        raw = None if rm is None else (rm.tags or {}).get(ROLLOUT_TAG)
        if not raw:
            return None
        try:
            return Rollout.model_validate_json(raw)
        except ValueError as err:
            raise RegistryError(f"registered model '{self.name}': unreadable '{ROLLOUT_TAG}' tag: {err}") from None

    def served_rollout(self, model_uri: str, version: str) -> Rollout | None:
        """The rollout an app serving `model_uri` (resolved to `version`) runs: only an app that follows
        the champion alias runs one, and only against the champion it was started beside (a champion
        moved since, by the gate or by hand, makes it stale)."""
        name, alias, _ = parse_model_uri(model_uri)
        if name is None or alias != CHAMPION:
            return None
        rollout = self.for_model(name).rollout()
        if rollout is None or rollout.champion != version or rollout.version == version:
            return None
        return rollout

    def set_rollout(self, rollout: Rollout, w: Writes | None = None) -> None:
        with self._writes(w) as w:
            # The alias first: `models:/<name>@challenger` then names the version the tag is about.
            self._call("set alias", w.set_alias, CHALLENGER, rollout.version)
            self._call("set_registered_model_tag", w.set_tag, ROLLOUT_TAG, rollout.model_dump_json())

    def clear_rollout(self, w: Writes | None = None) -> None:
        with self._writes(w) as w:
            # The tag first: without it the app serves the champion alone, whatever the alias says.
            self._call("delete tag", w.delete_tag, ROLLOUT_TAG)
            self._call("delete alias", w.delete_alias, CHALLENGER)

    def versions(self) -> list:
        return sorted(
            self._call("search_model_versions", self.client.search_model_versions, f"name='{self.name}'"),
            key=lambda v: int(v.version),
        )

    def _registered_model(self):
        """The registered model, or None before its first version is registered."""
        from mlflow.exceptions import MlflowException

        def get():
            try:
                return self.client.get_registered_model(self.name)
            except MlflowException as err:
                if does_not_exist(err):
                    return None
                raise

        return self._call("get_registered_model", get)

    def aliases(self) -> dict[str, str]:
        rm = self._registered_model()
        return {} if rm is None else {a: str(v) for a, v in (rm.aliases or {}).items()}

    def move_champion_by_hand(self, version: str, kind: str, reason: str) -> str | None:
        """Make `version` the champion outside the gate (`kind`: rollback, manual), under the gate's lock,
        recorded as a version tag and in the history. Returns the champion before."""
        with self.lock() as lease:
            old = self.champion()
            self.get_version(version)  # must exist
            with lease.fenced() as w:
                self.set_aliases(version, old, w)
            now = time.time()
            self.set_version_tags(version, {"gate.decision": kind, "gate.reason": reason, "gate.timestamp": now})
            self.record_history(
                {
                    "event": kind,
                    "champion": version,
                    "previous": old,
                    "reason": reason,
                    "timestamp": now,
                    "user": os.environ.get("USER", ""),
                }
            )
        return old


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.registry is no command: run `python -m ray_jobs registry`")

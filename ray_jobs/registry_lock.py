"""The gate's lock: an exclusive lease on a registered model's aliases, held in the MLflow registry itself,
so that it holds for every driver that shares the registry (Registry.lock says how it works)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from ray_jobs.errors import RegistryError

log = logging.getLogger(__name__)


class GateLease:
    """The registry-held lock of `Registry.lock` (see there)."""

    def __init__(self, reg, lease_s: float):
        # reg: the ray_jobs.registry.Registry whose lock this is (not imported: that module imports this one)
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.reg, self.lease_s = reg, lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._lost: str | None = None
        self._beat: threading.Thread | None = None

    def _tags(self) -> dict[str, str] | None:
        """The lock's tags, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.reg.client.get_registered_model(self.reg.lock_name).tags or {})
        except MlflowException as err:
            if does_not_exist(err):
                return None
            raise

    def _try_create(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.reg.client.create_registered_model(
                self.reg.lock_name,
                tags={"owner": self.owner, "heartbeat": "0"},
                description=f"gate lock of {self.reg.name}: exists while a driver decides (ray_jobs.registry_lock)",
            )
            return True
        except MlflowException as err:
            # Taken (or released between the insert and MLflow's look-up of the existing one): wait.
            if "RESOURCE_ALREADY_EXISTS" in str(err.error_code) or does_not_exist(err):
                return False
            raise

    def acquire(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen: tuple[str, str] | None = None  # (owner, heartbeat) last seen, and since when it has not moved
        seen_since = time.monotonic()
        waited = False
        while True:
            if self.reg._call("create the gate lock", self._try_create):
                break
            tags = self.reg._call("read the gate lock", self._tags)
            now = time.monotonic()
            if tags is not None:
                current = (tags.get("owner", ""), tags.get("heartbeat", ""))
                if current != seen:
                    seen, seen_since = current, now
                elif now - seen_since > self.lease_s:
                    log.warning("gate lock of %s not renewed for %.0f s: taking it over", seen[0], now - seen_since)
                    self._take_over(seen[0])
                    seen = None
                    continue
                if not waited:
                    log.info("waiting for the gate lock on %s (held by %s)", self.reg.name, current[0])
                    waited = True
            if now > deadline:
                raise RegistryError(
                    f"timed out after {timeout_s:.0f} s waiting for the gate lock {self.reg.lock_name} "
                    f"(held by {seen[0] if seen else 'nobody'})"
                )
            time.sleep(0.2 + 0.3 * (uuid.uuid4().int % 100) / 100)  # jitter: waiters do not poll in step
        self._beat = threading.Thread(target=self._heartbeat, name="gate-lock-heartbeat", daemon=True)
        self._beat.start()

    def _take_over(self, stale_owner: str) -> None:
        """Delete a dead holder's lock, unless it changed hands since we looked."""
        from mlflow.exceptions import MlflowException

        tags = self.reg._call("read the gate lock", self._tags)
        if tags is None or tags.get("owner") != stale_owner:
            return
        try:
            self.reg.client.delete_registered_model(self.reg.lock_name)
        except MlflowException as err:
            if not does_not_exist(err):
                raise RegistryError(f"MLflow delete of a stale gate lock failed at {self.reg.uri}: {err}") from None

    def _heartbeat(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.reg.uri, self.reg.uri)  # its own client: the driver's is busy elsewhere
        beat = 0
        while not self._stop.wait(self.lease_s / 4):
            beat += 1
            try:
                tags = client.get_registered_model(self.reg.lock_name).tags or {}
                if tags.get("owner") != self.owner:
                    self._lost = f"taken over by {tags.get('owner')}"
                    return
                client.set_registered_model_tag(self.reg.lock_name, "heartbeat", str(beat))
            except Exception as err:  # noqa: BLE001 - one missed beat is not a lost lease; check() decides
                log.warning("gate lock heartbeat failed: %s: %s", type(err).__name__, str(err)[:200])

    def check(self) -> None:
        """Raise RegistryError unless this process still holds the lock (call before writing aliases)."""
        tags = self.reg._call("read the gate lock", self._tags)
        if self._lost or tags is None or tags.get("owner") != self.owner:
            why = self._lost or f"now held by {(tags or {}).get('owner')}"
            raise RegistryError(f"lost the gate lock {self.reg.lock_name} ({why})")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        try:
            tags = self._tags()
            if tags is not None and tags.get("owner") == self.owner:
                self.reg.client.delete_registered_model(self.reg.lock_name)
        except Exception as err:  # noqa: BLE001 - the lease expires by itself; say so and go on
            log.warning("could not release the gate lock (it expires in %.0f s): %s", self.lease_s, err)


def does_not_exist(err: Exception) -> bool:
    text = f"{getattr(err, 'error_code', '')} {err}".lower()
    return "resource_does_not_exist" in text or "not found" in text or "does not exist" in text

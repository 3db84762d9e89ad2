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
    cfg = load_config(ROOT / "tune_configs/quickstart.yaml", ["train.lr=3e-5", "train.num_workers=2", "tune.search_space={}"])
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
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"  # the user's shell says otherwise: an error, not an override
    with pytest.raises(ConfigError, match="RAY_SERVE_THROUGHPUT_OPTIMIZED=1"):
        apply_serve_ingress("direct")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    with pytest.raises(ConfigError, match="ray.serve_ingress"):
        load_config(ROOT / "tune_configs/quickstart.yaml", ["ray.serve_ingress=nginx"])

"""Ray Train on a real local Ray cluster: DDP over 2 workers, checkpoints, resume after a worker dies, time budget."""

from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.integration


def _initial_val_loss(cfg, model=None) -> float:
    """Validation loss of `model` (default: the model a run starts from) on the config's validation split."""
    import torch

    from ray_jobs.data import encode, load_splits, pad_batch
    from ray_jobs.model import build_model

    built, tok = build_model(cfg.model, seed=cfg.train.seed)
    model = model or built
    model.eval()
    val = load_splits(cfg.data).val
    ids, mask = pad_batch(encode(tok, val.texts, cfg.model.max_length, cfg.model.truncation), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits, torch.tensor(val.labels)).item()


def test_ddp_training_learns_and_checkpoints_load(trained_tiny):
    from transformers import AutoModelForSequenceClassification

    cfg, result, path, metrics = trained_tiny
    assert result.metrics["epoch"] == cfg.train.epochs
    # loss goes down (against the same model before training, on the same validation split) and the task is learnt
    assert result.metrics["val_loss"] < 0.6 * _initial_val_loss(cfg)
    assert result.metrics["train_loss"] < 0.5
    assert metrics["val_f1"] > 0.9, metrics
    folder = Path(path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert (folder / "sentiment_meta.json").is_file() and (folder / "training_state.pt").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    assert model.config.model_type == "distilbert" and model.config.num_labels == 2
    # num_to_keep is honoured and the best checkpoint (by train.select_by) is kept
    assert len(result.best_checkpoints) <= cfg.train.num_to_keep


def _fit_with_fault(tmp_path, max_failures, *overrides):
    from ray_jobs.data import load_splits
    from ray_jobs.train import fit, prepare_data, system_settings
    from ray_jobs.train_steps import FaultInjection

    cfg = tiny_config(
        tmp_path,
        "train.num_workers=2",
        "train.epochs=3",
        f"train.max_failures={max_failures}",
        "data.synthetic.n_samples=1200",
        *overrides,
    )
    splits = load_splits(cfg.data)
    marker = tmp_path / "killed"
    data = prepare_data(cfg, splits)
    result = fit(cfg, system_settings(cfg, data, callbacks=[FaultInjection(str(marker), at_epoch=0)]))
    return result, marker, cfg, data


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    from ray_jobs.train import fit, system_settings

    result, marker, cfg, data = _fit_with_fault(tmp_path, max_failures=1)
    assert marker.exists(), "the fault was not injected"
    m = result.metrics
    assert m["epoch"] == 3
    steps_per_epoch = m["step"] // 3
    # The restarted workers continued after epoch 1 (global step of its checkpoint), not from step 0.
    assert m["resumed_from_step"] == steps_per_epoch

    # Run again under the same name, as a resumed search reruns a trial whose end its driver did not
    # record: restored after the last epoch, it reports its last checkpoint again instead of nothing.
    again = fit(cfg, system_settings(cfg, data), run_name=Path(result.path).name)
    assert again.metrics["resumed_from_step"] == m["step"] and again.metrics["val_f1"] == m["val_f1"]
    assert again.metrics["epoch"] == 3 and (Path(again.checkpoint.path) / "model.safetensors").is_file()


def test_an_averaged_run_validates_its_average_and_resumes_with_it(ray_cluster, tmp_path):
    """train.ema_decay: a checkpoint's model folder is the average (what is validated and registered),
    beside the weights the optimizer steps; a killed worker's replacement continues both."""
    import torch
    from safetensors.torch import load_file
    from transformers import DistilBertForSequenceClassification

    from ray_jobs.train_worker import STATE_FILE, TRAIN_WEIGHTS_FILE

    result, marker, cfg, _ = _fit_with_fault(tmp_path, 1, "train.ema_decay=0.9")
    assert marker.exists(), "the fault was not injected"
    m = result.metrics
    assert m["epoch"] == 3 and m["resumed_from_step"] == m["step"] // 3
    assert m["val_loss"] < 0.8 * _initial_val_loss(cfg), m  # the average learnt too
    folder = Path(result.checkpoint.path)
    # The average's update count ran on from the checkpoint: it was restored, not started again.
    assert torch.load(folder / STATE_FILE, weights_only=True)["ema_updates"] == m["step"]
    average, raw = load_file(str(folder / "model.safetensors")), load_file(str(folder / TRAIN_WEIGHTS_FILE))
    assert not torch.equal(average["classifier.weight"], raw["classifier.weight"])
    # The reported validation loss is the average's, not the raw weights'.
    served = DistilBertForSequenceClassification.from_pretrained(str(folder), use_safetensors=True)
    assert _initial_val_loss(cfg, served) == pytest.approx(m["val_loss"], rel=1e-3)
    served.load_state_dict(raw, strict=False)
    assert _initial_val_loss(cfg, served) != pytest.approx(m["val_loss"], rel=1e-3)


def test_killed_worker_fails_the_run_without_retries(ray_cluster, tmp_path):
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        _fit_with_fault(tmp_path, max_failures=0)


def test_time_budget_stops_early_and_keeps_a_checkpoint(ray_cluster, tmp_path):
    """On a content split built on the cluster (data.split=content): the workers read shards of its
    hash-ordered rows."""
    from ray_jobs.ingest import StreamedSplits
    from ray_jobs.train import best_checkpoint, fit, load_data, prepare_data, system_settings

    cfg = tiny_config(tmp_path, "train.epochs=50", "train.time_budget_s=4", "data.split=content")
    splits = load_data(cfg)
    assert isinstance(splits, StreamedSplits)
    result = fit(cfg, system_settings(cfg, prepare_data(cfg, splits)))
    assert result.metrics["stopped_by_budget"] is True
    assert result.metrics["epoch"] < 50
    path, _ = best_checkpoint(result, cfg.train.select_by)
    assert (Path(path) / "model.safetensors").is_file()


def test_training_starts_from_the_champion_or_a_model_folder(ray_cluster, tmp_path, trained_tiny, caplog):
    """train.init_from: "champion" is the backbone while there is none, then the champion's weights (with
    lr 0 the run keeps them: its validation loss is the trained model's); a folder is taken as it is; a
    folder without weights and weights of another shape are refused with the reason."""
    from ray_jobs.config import ModelConfig, TinyModelConfig
    from ray_jobs.data import load_splits
    from ray_jobs.errors import SentimentError
    from ray_jobs.model import build_model
    from ray_jobs.registry import Registry
    from ray_jobs.train import fit, initial_weights, prepare_data, system_settings
    from ray_jobs.train_steps import load_initial_weights

    _, _, trained_path, trained_metrics = trained_tiny
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.lr=0", "train.init_from=champion")
    with caplog.at_level("INFO", logger="ray_jobs.train"):
        assert initial_weights(cfg) is None
    assert "no champion yet" in caplog.text

    reg = Registry(cfg.registry)
    version = reg.register(reg.start_run("init-from-test"), trained_path, {"test_f1": "0.9"})
    reg.set_aliases(version, None)
    splits = load_splits(cfg.data)
    system = system_settings(cfg, prepare_data(cfg, splits))
    assert system["meta"]["init_from"] == f"models:/{cfg.registry.model_name}/{version}"
    result = fit(cfg, system)
    assert result.metrics["val_loss"] == pytest.approx(trained_metrics["val_loss"], abs=1e-3), result.metrics
    assert result.metrics["val_f1"] > 0.9

    folder = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": trained_path})})
    assert initial_weights(folder)[1] == trained_path
    empty = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(tmp_path)})})
    with pytest.raises(SentimentError, match="no model.safetensors"):
        initial_weights(empty)
    wider = ModelConfig(source="tiny", tiny=TinyModelConfig(dim=cfg.model.tiny.dim * 2))
    with pytest.raises(SentimentError, match="do not fit"):
        load_initial_weights(build_model(wider)[0], *initial_weights(folder))

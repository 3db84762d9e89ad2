"""Retraining's pieces without a cluster: production texts join the train split only, the triggers count
what is new since the last run, the production data is deduplicated with a stable holdout, and nothing
starts while another run or a rollout is in flight. Real sqlite MLflow registries and evidence logs.
(tests/test_retrain_integration.py runs the whole loop on a Serve app.)"""

from __future__ import annotations

import time

import pandas as pd
import pytest

from ray_jobs.config import load_config
from ray_jobs.data import load_splits
from ray_jobs.evidence_log import EvidenceLog, Label, Prediction


def _cfg(tmp_path, *sets):
    return load_config(
        None,
        [
            f"registry.root={tmp_path}/mlflow",
            f"retrain.data_dir={tmp_path}/retrain",
            "data.synthetic.n_samples=400",
            "serve.port=1",  # nothing listens there: the drift trigger cannot reach an app
            *sets,
        ],
    )


def _log(cfg) -> EvidenceLog:
    from ray_jobs.config import evidence_log_uri

    return EvidenceLog(evidence_log_uri(cfg.serve, cfg.registry), cfg.serve.app_name)


def _labelled(log: EvidenceLog, ids: list[str], texts: list[str | None], labels: list[int], t: float | None = None):
    t = time.time() if t is None else t
    preds = [
        Prediction(i, "1", "champion", True, 1, 0.9, 0.01, t, f"d-{i}", text)
        for i, text in zip(ids, texts, strict=True)
    ]
    log.write(preds, [Label(i, y, t) for i, y in zip(ids, labels, strict=True)])


def test_extra_texts_join_the_train_or_the_validation_split_never_the_test_split(tmp_path):
    cfg = _cfg(tmp_path)
    base = load_splits(cfg.data)
    new = [f"an unheard-of review number {i}" for i in range(20)]
    leaked = [base.test.texts[0], base.test.texts[1], base.val.texts[0], base.train.texts[0]]
    texts = new + new[:2] + leaked
    path = tmp_path / "extra.parquet"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]}).to_parquet(path)

    splits = load_splits(cfg.data.model_copy(update={"extra_train": str(path)}))
    assert splits.test.digest() == base.test.digest() and splits.val.digest() == base.val.digest()
    assert splits.train.texts == base.train.texts + new  # repeats and texts of any split dropped
    assert splits.train.labels[len(base.train) :] == [i % 2 for i in range(20)]

    val_path = tmp_path / "extra-val.parquet"
    val_new = [f"a validation review of a new kind {i}" for i in range(5)]
    pd.DataFrame({"text": [*val_new, new[0], base.test.texts[2]], "label": [1] * 7}).to_parquet(val_path)
    both = load_splits(cfg.data.model_copy(update={"extra_train": str(path), "extra_val": str(val_path)}))
    assert both.test.digest() == base.test.digest()
    assert both.val.texts == base.val.texts + [*val_new, new[0]]  # a test text never moves
    assert new[0] not in both.train.texts  # a text validated on is not also trained on
    assert both.train.texts == base.train.texts + new[1:]


def test_the_label_trigger_counts_labels_since_the_last_run(tmp_path):
    from ray_jobs.registry import Registry
    from ray_jobs.retrain import RETRAIN_TAG, triggers

    cfg = _cfg(tmp_path, "retrain.min_new_labels=5")
    reg, log = Registry(cfg.registry), _log(cfg)
    _labelled(log, [f"a{i}" for i in range(4)], [None] * 4, [1] * 4)
    assert triggers(cfg, reg, log) == []  # 4 < 5; the drift trigger cannot reach the app: no reason, no error
    _labelled(log, ["a4"], [None], [0])
    assert triggers(cfg, reg, log) == ["5 new labelled predictions since the start"]

    run = reg.start_run("retrain-earlier", {RETRAIN_TAG: "finished"})
    reg.set_tags(run, {"retrain.labels_until": f"{time.time():.6f}"})
    assert triggers(cfg, reg, log) == []  # what the last run gathered does not count again
    time.sleep(0.01)
    _labelled(log, [f"b{i}" for i in range(5)], [None] * 5, [1] * 5)
    assert triggers(cfg, reg, log)[0].startswith("5 new labelled predictions since ")

    scheduled = _cfg(tmp_path, "retrain.min_new_labels=null", "retrain.every_s=3600")
    assert triggers(scheduled, reg, log) == []  # the last run started a moment ago
    fresh = _cfg(tmp_path / "other", "retrain.min_new_labels=null", "retrain.every_s=3600")
    assert triggers(fresh, Registry(fresh.registry), _log(fresh))[0].startswith("schedule: every 3600 s")


def test_production_data_is_deduplicated_with_a_stable_holdout(tmp_path):
    from ray_jobs.retrain import production_data

    cfg = _cfg(tmp_path)
    log = _log(cfg)
    ids = [f"r{i}" for i in range(400)]
    texts = [f"production review {i % 300}" for i in range(400)]  # 100 repeats
    texts[150] = None  # served without serve.log_texts (and not repeated): nothing to train on
    _labelled(log, ids, texts, [i % 2 for i in range(400)])

    prod = production_data(log, time.time(), 0.25, 0.2)
    assert len(prod.train) + len(prod.val) + len(prod.holdout) == 299  # 300 distinct texts, one without its text
    assert 0.15 < len(prod.holdout) / 299 < 0.35 and 0.1 < len(prod.val) / 299 < 0.3
    again = production_data(log, time.time(), 0.25, 0.2)
    assert again.digests() == prod.digests()  # the same requests held out every time
    parts = [set(prod.train.texts), set(prod.val.texts), set(prod.holdout.texts)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # The holdout does not move when the validation share changes: scores stay comparable across runs.
    assert production_data(log, time.time(), 0.25, 0.0).holdout.digest() == prod.holdout.digest()
    assert production_data(log, time.time() - 3600, 0.25, 0.2).train.texts == []  # labels up to `until` only


def test_nothing_starts_while_another_run_holds_the_lock_or_a_rollout_runs(tmp_path):
    from ray_jobs import rollout
    from ray_jobs.errors import ConfigError
    from ray_jobs.registry import Registry
    from ray_jobs.retrain import retrain

    cfg = _cfg(tmp_path, "retrain.lock_lease_s=0.5", "gate.live_min_labelled=10")
    reg = Registry(cfg.registry)
    reg.client.create_registered_model(reg.name)
    for i in range(2):
        reg.client.create_model_version(reg.name, source=str(tmp_path), run_id=reg.start_run(f"v{i + 1}"))
    reg.set_aliases("1", None)

    with reg.lock(timeout_s=5, lease_s=0.5, name="retrain"):  # another driver's run, alive
        busy = retrain(cfg, force=True)
    assert not busy.started and "in flight" in busy.message and busy.reasons == ["forced by hand (--force)"]

    rollout.start(cfg, "shadow", "2", deploy_app=False)
    undecided = retrain(cfg, force=True)
    assert not undecided.started and undecided.message.startswith("version 2 is in shadow")

    with pytest.raises(ConfigError, match="serve.feedback.log.enabled"):
        retrain(_cfg(tmp_path, "serve.feedback.log.enabled=false"), force=True)

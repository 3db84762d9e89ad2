"""Retraining that runs itself, end to end on a real Serve app, a sqlite MLflow registry and the durable
log: v1 serves; reviews in words it has never seen arrive with labels; the trigger fires once;
`ray_jobs.retrain` trains v2 on the base data plus those labels (a concurrent firing starts nothing); v2
goes into shadow; fresh live labels promote it, with zero failed requests; MLflow shows why the run
fired and what it trained on."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import FEEDBACK_AUTH, ROOT, TINY, http, request_stream, small_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "/rt"
SAMPLE = 30
PRODUCTION = 240

# A new domain: two made-up verdict words the base data never has. v1 cannot know them; labelled
# production reviews teach them to v2.
WORDS = {1: "zorbly", 0: "blicketty"}


def _review(i: int, label: int, tag: str) -> str:
    w = WORDS[label]
    return f"The {tag} film number {i} was {w}, truly {w} from start to end."


@pytest.fixture(scope="module")
def rt(serve_port, ray_cluster, tmp_path_factory, trained_tiny):
    from ray import serve

    from ray_jobs.cli import deploy
    from ray_jobs.config import load_config
    from ray_jobs.registry import Registry

    tmp = tmp_path_factory.mktemp("retrain")
    sets = [
        *TINY,
        f"train.storage_path={tmp}/ray",
        f"tune.storage_path={tmp}/tune",
        f"registry.root={tmp}/mlflow",
        "registry.model_name=rt-model",
        f"retrain.data_dir={tmp}/retrain",
        "retrain.min_new_labels=200",
        "retrain.on_drift_alarm=false",  # the label trigger alone: one reason, known in advance
        "retrain.lock_lease_s=4",
        "tune.num_samples=1",
        # Offline, a tolerance: v2 is one trial where v1 was the best of two, and its training data moves
        # with the holdout (a hash of each request id, new every run): five runs gave test F1 0.90, 0.93,
        # 0.97, 0.977 and 0.98 against v1's 0.983. The live decision is what this test is about; the gate
        # blocking a worse model offline is tested in test_gate.py and the pipeline tests.
        "gate.min_delta=-0.1",
        f"gate.live_min_labelled={SAMPLE}",
        *small_app(serve_port, PREFIX, "rt"),
        "serve.log_texts=true",
    ]
    cfg = load_config(ROOT / "tune_configs/quickstart.yaml", sets).with_absolute_paths()
    reg = Registry(cfg.registry)
    reg.set_aliases(reg.register(reg.start_run("v1"), trained_tiny[2], {}), None)
    args = ["--config", str(ROOT / "tune_configs/quickstart.yaml"), *[x for kv in sets for x in ("--set", kv)]]
    assert deploy.main(args) == 0
    yield {"cfg": cfg, "reg": reg, "args": args, "url": f"http://127.0.0.1:{serve_port}{PREFIX}"}
    serve.delete("rt")


def _answer_and_label(url: str, texts: list[str], labels: list[int]) -> list[dict]:
    answers = []
    for i in range(0, len(texts), 16):
        r = http.post(f"{url}/batch_predict", json={"texts": texts[i : i + 16]}, timeout=60)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    for a, y in zip(answers, labels, strict=True):
        body = {"request_id": a["request_id"], "label": "positive" if y else "negative"}
        assert http.post(f"{url}/feedback", json=body, headers=FEEDBACK_AUTH).status_code == 200
    return answers


def test_a_trigger_retrains_on_production_labels_into_shadow_and_live_labels_promote(rt):
    from ray_jobs.cli import registry
    from ray_jobs.retrain import RETRAIN_TAG, retrain

    cfg, reg, url = rt["cfg"], rt["reg"], rt["url"]
    quiet = retrain(cfg)
    assert not quiet.started and quiet.reasons == [] and "no trigger fired" in quiet.message

    labels = [i % 2 for i in range(PRODUCTION)]
    answers = _answer_and_label(url, [_review(i, y, "production") for i, y in enumerate(labels)], labels)
    v1_right = sum((a["label"] == "positive") == bool(y) for a, y in zip(answers, labels, strict=True))
    assert v1_right < 0.75 * PRODUCTION  # v1 does not know the new words (about half right)

    # A second firing while the run is in flight starts nothing (forced: its trigger has been consumed).
    second: dict = {}

    def fire_again_once_running() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            runs = reg.client.search_runs([reg.experiment_id()], filter_string=f"tags.{RETRAIN_TAG} = 'running'")
            if runs:
                second["quiet"] = retrain(cfg)
                second["forced"] = retrain(cfg, force=True)
                return
            time.sleep(0.5)

    t = threading.Thread(target=fire_again_once_running)
    t.start()
    result = retrain(cfg)
    t.join()
    assert result.started and result.shadowed and result.version == "2", result
    assert result.reasons == [f"{PRODUCTION} new labelled predictions since the start"]
    assert not second["quiet"].started and "no trigger fired" in second["quiet"].message
    assert not second["forced"].started and "in flight" in second["forced"].message

    # MLflow: why it fired, when its data ends, what it trained on and held out; the scores on the holdout.
    run = reg.client.get_run(result.run_id)
    tags = run.data.tags
    assert tags[RETRAIN_TAG] == "finished" and tags["retrain.version"] == "2" and tags["retrain.gate"] == "shadow"
    assert "new labelled predictions" in tags["retrain.reasons"]
    n_train, n_val, n_hold = (int(tags[f"retrain.n_production_{p}"]) for p in ("train", "val", "holdout"))
    assert n_train + n_val + n_hold == PRODUCTION and 0 < n_hold < PRODUCTION / 2 and 0 < n_val < PRODUCTION / 4
    assert all(len(tags[f"retrain.digest.production_{p}"]) == 16 for p in ("train", "val", "holdout"))
    assert run.data.metrics["holdout_f1.challenger"] > run.data.metrics["holdout_f1.champion"]
    assert retrain(cfg, force=True).message.startswith("version 2 is in shadow")  # v2 is decided first

    # Live: fresh reviews of the new domain, labelled; v2 (in shadow) is right where v1 is not.
    model = http.get(f"{url}/model").json()
    assert model["version"] == "1" and model["challenger"]["version"] == "2"
    fresh = [i % 2 for i in range(SAMPLE)]
    _answer_and_label(url, [_review(i, y, "live") for i, y in enumerate(fresh)], fresh)
    deadline = time.time() + 60
    while time.time() < deadline:
        paired = http.get(f"{url}/challenger", timeout=30).json()["paired"]
        if paired and paired["labelled"] >= SAMPLE:
            break
        time.sleep(0.5)
    with request_stream(url, "promoted while this stream runs", "model_version") as (served, failures):
        assert registry.main([*rt["args"], "promote", "2"]) == 0
        time.sleep(1.0)
    assert failures == [] and served[-1] == "2"
    assert reg.aliases() == {"champion": "2", "previous": "1"} and reg.rollout() is None
    assert reg.get_version("2").tags["live.decision"] == "promote"

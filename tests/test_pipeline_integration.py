"""The whole job on a real local Ray cluster, a real sqlite MLflow registry and real HTTP:
tune -> register -> gate -> deploy / hot-swap, the registry CLI, fail-closed behaviour and races."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import http, request_stream, tiny_config

from ray_jobs.drift import REFERENCE_FILE
from ray_jobs.errors import GateError, SentimentError
from ray_jobs.train_worker import STATE_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A grid (not a random choice) so that the two trials are sure to differ.
RUN = [
    "data.synthetic.n_samples=2000",
    "train.epochs=2",
    "tune.num_samples=1",
    "tune.search_space={lr: {type: grid, values: [0.001, 0.002]}}",
    "tune.max_concurrent_trials=2",  # side by side: their start-up costs overlap
    "gate.floor=0.6",
    "serve.num_cpus=0.5",
    "serve.app_name=pipe",
    "serve.route_prefix=/",
    "serve.autoscaling.min_replicas=1",
    "serve.autoscaling.max_replicas=1",
]


def _pipeline_args(tmp, port, *extra):
    paths = [f"train.storage_path={tmp}/ray", f"tune.storage_path={tmp}/tune", f"registry.root={tmp}/mlflow"]
    from conftest import ROOT, TINY

    sets = [x for kv in [*TINY, *paths, *RUN, f"serve.port={port}", *extra] for x in ("--set", kv)]
    return ["--config", str(ROOT / "tune_configs/quickstart.yaml"), *sets]


_args = _pipeline_args


def _registry(tmp):
    from ray_jobs.config import RegistryConfig
    from ray_jobs.registry import Registry

    return Registry(RegistryConfig(root=f"{tmp}/mlflow"))


@pytest.fixture
def pipe_app(serve_port):
    """Serve's port for the app the pipeline deploys, deleted afterwards (the replica would otherwise
    keep a share of the 2 cores busy for the rest of the session)."""
    from ray import serve

    yield serve_port
    serve.delete("pipe")


# Served by ONNX Runtime: each version is exported at registration and guarded against the gate's own
# fp32 predictions (which the fp32 export matches to 1e-4 in its logits).
ONNX = ("serve.runtime=onnx", "gate.precision=fp32")
ONNX_SERVED = {"runtime": "onnx", "quantization": "none", "precision": "fp32", "device": "cpu", "fallback": None}


def test_pipeline_promotes_blocks_and_hot_swaps(pipe_app, tmp_path, capsys, caplog):
    from ray_jobs import onnx_runtime
    from ray_jobs.cli import onnx, pipeline, registry

    serve_port = pipe_app

    url = f"http://127.0.0.1:{serve_port}"

    def _args(tmp, port, *extra):
        return _pipeline_args(tmp, port, *ONNX, *extra)

    # 1. First run: promoted over the floor, deployed, answers.
    assert pipeline.main(_args(tmp_path, serve_port)) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "answer" in out
    # Two trials, one tokenization: the workers read the token ids the driver's Ray Data map made.
    assert caplog.text.count("texts once for every worker and trial") == 1
    assert http.get(f"{url}/model").json()["version"] == "1"
    r = http.post(f"{url}/predict", json={"text": "The acting was wonderful and I loved it."})
    assert r.status_code == 200 and r.json()["model_version"] == "1"

    reg = _registry(tmp_path)
    client = reg.client
    parents = [r for r in client.search_runs([reg.experiment_id()]) if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in client.search_runs([reg.experiment_id()]) if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(len(client.get_metric_history(c.info.run_id, "val_f1")) >= 1 for c in children)
    assert {c.data.params["lr"] for c in children} == {"0.001", "0.002"}
    p = parents[0]
    assert p.data.tags["data_digest.test"] and p.data.tags["config_digest"] and p.data.tags["version.ray"]
    artifacts = {a.path for a in client.list_artifacts(p.info.run_id)}
    assert {"config.yaml", "gate_decision.json", "tune_trials.png", "confusion_matrix.png", "model"} <= artifacts
    assert "behaviour.json" in artifacts and "behaviour.MFT_failure_rate" in p.data.metrics
    assert reg.champion() == "1"
    v1_f1 = float(reg.get_version("1").tags["test_f1"])
    assert 0 <= float(reg.get_version("1").tags["behaviour.INV_failure_rate"]) <= 1  # the suite ran on it
    # The drift reference was profiled on the test split at registration and is part of the version;
    # the checkpoint's resume state (optimizer moments) is not.
    assert (Path(reg.model_dir("1")) / REFERENCE_FILE).exists()
    assert not (Path(reg.model_dir("1")) / STATE_FILE).exists()
    drift = http.get(f"{url}/drift").json()
    assert drift["model_version"] == "1" and drift["reference"]["n"] == int(reg.get_version("1").tags["test_n"])
    # So was the ONNX export with its accuracy guard, which passed: the replica serves the export.
    v1_folder = Path(reg.model_dir("1"))
    assert (v1_folder / "model.onnx").exists() and onnx_runtime.read_guard(v1_folder, "none").agreement == 1.0
    assert reg.get_version("1").tags["onnx.none.guard"] == "passed"
    assert http.get(f"{url}/model").json()["runtime"] == ONNX_SERVED
    assert "the replica serves with onnx (fp32)" in caplog.text  # the deploy step says so too

    # 2. A deliberately worse model (lr=0): blocked, exit code 3, champion and endpoint unchanged.
    worse = _args(tmp_path, serve_port, "train.lr=0", "train.epochs=1", "tune.search_space={}", "tune.num_samples=1")
    assert pipeline.main(worse) == 3
    assert "BLOCKED" in capsys.readouterr().out
    assert reg.champion() == "1"
    v2 = reg.get_version("2")
    assert v2.tags["gate.decision"] == "block" and float(v2.tags["gate.champion_f1"]) == pytest.approx(v1_f1, abs=1e-6)
    assert http.get(f"{url}/model").json()["version"] == "1"

    # 3. A better config, promoted and hot-swapped while requests keep flowing: no request fails.
    with request_stream(url, "a dull and lifeless film", "model_version") as (answers, failures):
        code = pipeline.main(
            _args(tmp_path, serve_port, "train.epochs=5", "tune.search_space={}", "tune.num_samples=1")
        )
        time.sleep(1.0)
    assert code == 0, capsys.readouterr()
    assert failures == []
    assert "1" in answers and answers[-1] == "3", answers[-5:]
    assert http.get(f"{url}/model").json()["version"] == "3"
    assert http.get(f"{url}/model").json()["runtime"] == ONNX_SERVED  # v3's own export
    assert reg.aliases() == {"champion": "3", "previous": "1"}
    drift = http.get(f"{url}/drift").json()  # the monitor follows the swap to v3's own reference
    assert drift["model_version"] == "3" and drift["reference"] is not None and drift["reference_error"] is None

    # 4. Registry CLI: status shows the decisions, rollback restores the previous champion (recorded).
    capsys.readouterr()
    assert registry.main(["--config", _args(tmp_path, serve_port)[1], *_args(tmp_path, serve_port)[2:], "status"]) == 0
    status = capsys.readouterr().out
    assert "champion" in status and "block" in status
    assert registry.main([*_args(tmp_path, serve_port), "compare", "1", "3"]) == 0
    assert "test_f1" in capsys.readouterr().out
    assert registry.main([*_args(tmp_path, serve_port), "rollback"]) == 0
    assert reg.champion() == "1" and reg.alias_version("previous") == "3"
    assert reg.get_version("1").tags["gate.decision"] == "rollback"
    # The rollback moved the alias only; `--deploy-only` hot-swaps the running app to that champion.
    assert http.get(f"{url}/model").json()["version"] == "3"
    assert pipeline.main([*_args(tmp_path, serve_port), "--deploy-only"]) == 0
    assert http.get(f"{url}/model").json()["version"] == "1"
    assert http.get(f"{url}/drift").json()["model_version"] == "1"  # a rollback is a newer load: followed
    capsys.readouterr()
    assert registry.main([*_args(tmp_path, serve_port), "promote", "3", "--force", "--reason", "test"]) == 0
    assert reg.champion() == "3"
    assert registry.main([*_args(tmp_path, serve_port), "experiments"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert len(rows) == 3, rows  # one parent run per pipeline run, with its version and gate decision
    assert (
        sum(line.rstrip().endswith("promote") for line in rows) == 2
        and sum(line.rstrip().endswith("block") for line in rows) == 1
    ), rows

    # 5. An int8 export added to version 2 after its registration, guarded on the config's test split:
    # exit 0 (passed) or 3 (refused: replicas would serve v2 eagerly), the files in the version either way.
    capsys.readouterr()
    code = onnx.main([*_args(tmp_path, serve_port), "--model", "2", "--quantization", "int8", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == (0 if report["refusal"] is None else 3) and report["stored_in"] == f"version 2 of '{reg.name}'"
    v2_folder = Path(reg.model_dir("2"))
    assert onnx_runtime.read_guard(v2_folder, "int8").onnx_sha256 == onnx_runtime.sha256(v2_folder / "model.int8.onnx")
    assert report["n"] == int(reg.get_version("2").tags["test_n"])  # the version's own test split


def test_unreachable_registry_fails_closed(tmp_path, capsys):
    from ray_jobs.cli import pipeline

    start = time.time()
    assert pipeline.main(_args(tmp_path, 1, "registry.tracking_uri=http://127.0.0.1:1")) == 1
    assert time.time() - start < 60  # fails before any training


def test_bad_config_exit_code(tmp_path):
    from ray_jobs.cli import pipeline

    assert pipeline.main(_args(tmp_path, 1, "train.epochs=zero")) == 2


def test_a_pipeline_interrupted_before_its_gate_decision_leaves_a_pending_version(
    ray_cluster, tmp_path, trained_tiny, monkeypatch, caplog
):
    """Ctrl-C or SIGTERM (`ray job stop`) between registering and deciding: exit 130, no alias, the MLflow
    run KILLED, and the version says gate.decision=pending rather than look like a gated model. (The
    search is the session's trained model: this test is about what happens after it.)"""
    from ray_jobs import pipeline as library
    from ray_jobs.cli import pipeline
    from ray_jobs.tune import CHECKPOINT_KEY, SearchOutcome, TrialRecord

    _, _, path, metrics = trained_tiny
    trial = TrialRecord("t0", {"lr": 0.001}, "TERMINATED", history=[{**metrics, CHECKPOINT_KEY: path}])
    assert trial.best is not None and trial.best["val_loss"] == metrics["val_loss"]
    monkeypatch.setattr(library, "run_search", lambda *a, **k: SearchOutcome([trial], str(tmp_path / "tune")))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(library, "run_gate", interrupted)
    assert pipeline.main([*_args(tmp_path, 1), "--no-deploy"]) == 130
    assert "nothing promoted" in caplog.text
    reg = _registry(tmp_path)
    assert reg.aliases() == {}
    [version] = reg.versions()
    assert version.tags["gate.decision"] == "pending"
    [run] = [r for r in reg.client.search_runs([reg.experiment_id()]) if "mlflow.parentRunId" not in r.data.tags]
    assert run.info.status == "KILLED"


def _registered(reg, run_name, model_dir, f1_tag="0"):
    run_id = reg.start_run(run_name)
    return reg.register(run_id, model_dir, {"test_f1": f1_tag})


def test_gate_race_ends_with_the_better_model(ray_cluster, tmp_path, trained_tiny, untrained_tiny):
    """Two gate decisions racing on one registry (threads): whatever the order, the better model
    ends as champion, because decisions are serialised and re-read the champion."""
    from ray_jobs.data import load_splits
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.pipeline import run_gate

    cfg = tiny_config(tmp_path, "gate.floor=0.0")
    reg = _registry(tmp_path)
    test = load_splits(cfg.data).test
    good_dir, bad_dir = trained_tiny[2], untrained_tiny
    good_v, bad_v = _registered(reg, "good", good_dir), _registered(reg, "bad", bad_dir)
    evals = {good_v: evaluate_dir(good_dir, test), bad_v: evaluate_dir(bad_dir, test)}
    assert evals[good_v].f1 > evals[bad_v].f1
    errors = []
    barrier = threading.Barrier(2)

    def gate(v):
        try:
            barrier.wait()
            run_gate(_registry(tmp_path), cfg, v, evals[v], test)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=gate, args=(v,)) for v in (bad_v, good_v)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert reg.champion() == good_v


def test_champion_is_reevaluated_on_a_new_test_split(ray_cluster, tmp_path, trained_tiny, untrained_tiny):
    """The gate never trusts a stored F1: with another test split, the champion is evaluated again."""
    from ray_jobs.data import load_splits
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.pipeline import run_gate

    cfg = tiny_config(tmp_path, "gate.floor=0.0")
    reg = _registry(tmp_path)
    good_dir = trained_tiny[2]
    champ = _registered(reg, "champ", good_dir, f1_tag="0.999")  # a stale, wrong stored score
    reg.set_aliases(champ, None)
    other_test = load_splits(tiny_config(tmp_path, "data.split_seed=99", "gate.floor=0.0").data).test
    challenger_v = _registered(reg, "chal", untrained_tiny)
    challenger = evaluate_dir(untrained_tiny, other_test)
    decision, before = run_gate(reg, cfg, challenger_v, challenger, other_test)
    assert before == champ
    expected = evaluate_dir(good_dir, other_test).f1
    assert decision.champion_f1 == pytest.approx(expected) and decision.champion_f1 != pytest.approx(0.999)
    assert decision.test_digest == other_test.digest()


def test_unloadable_champion_fails_closed(ray_cluster, tmp_path, trained_tiny, untrained_tiny):
    import shutil

    from ray_jobs.data import load_splits
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.pipeline import run_gate

    cfg = tiny_config(tmp_path, "gate.floor=0.0")
    reg = _registry(tmp_path)
    champ = _registered(reg, "champ", untrained_tiny)
    reg.set_aliases(champ, None)
    shutil.rmtree(reg.model_dir(champ))  # the champion's files are gone
    test = load_splits(cfg.data).test
    chal = _registered(reg, "chal", trained_tiny[2])
    with pytest.raises(SentimentError):
        run_gate(reg, cfg, chal, evaluate_dir(trained_tiny[2], test), test)
    assert reg.champion() == champ and reg.alias_version("previous") is None


def test_a_passed_gate_with_on_pass_shadow_starts_a_shadow_and_a_later_promotion_ends_it(
    ray_cluster, tmp_path, trained_tiny, untrained_tiny
):
    """gate.on_pass: shadow: a challenger that passes stays beside the champion (the alias does not
    move) as a recorded shadow rollout; a plain promotion later ends a rollout that no longer applies."""
    from ray_jobs.data import load_splits
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.pipeline import run_gate

    reg = _registry(tmp_path)
    cfg = tiny_config(tmp_path, "gate.floor=0.0", "gate.on_pass=shadow")
    test = load_splits(cfg.data).test
    champ = _registered(reg, "champ", untrained_tiny)
    reg.set_aliases(champ, None)
    chal = _registered(reg, "chal", trained_tiny[2])
    better = evaluate_dir(trained_tiny[2], test)
    decision, before = run_gate(reg, cfg, chal, better, test)
    assert decision.promote and before == champ
    assert reg.champion() == champ and reg.alias_version("previous") is None  # nothing promoted
    assert reg.get_version(chal).tags["gate.decision"] == "shadow"
    rollout = reg.rollout()
    assert (rollout.mode, rollout.version, rollout.champion, rollout.mirror) == ("shadow", chal, champ, 1.0)
    assert reg.alias_version("challenger") == chal
    assert reg.served_rollout(cfg.registry.champion_uri, champ) == rollout
    assert rollout.sample_size == cfg.gate.live_min_labelled

    # Another version that passes while this shadow runs does not replace it: refused, with the reason.
    second = _registered(reg, "second", trained_tiny[2])
    with pytest.raises(GateError, match=f"passed the gate but is not shadowed: version {chal} is in shadow"):
        run_gate(reg, cfg, second, better, test)
    assert reg.rollout() == rollout and reg.champion() == champ
    assert reg.get_version(second).tags["gate.decision"] == "passed, not shadowed"

    other = _registered(reg, "other", trained_tiny[2])
    decision, _ = run_gate(reg, tiny_config(tmp_path, "gate.floor=0.0"), other, better, test)
    assert decision.promote and reg.champion() == other
    assert reg.rollout() is None and reg.alias_version("challenger") is None

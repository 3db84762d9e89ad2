"""ONNX Runtime serving (ray_jobs.onnx_export, ray_jobs.onnx_runtime): the export computes what the eager
model computes, int8 stays close, the accuracy guard refuses an export that disagrees, and a model process
serves eager with the reason whenever the export is missing, refused, replaced or broken."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import http

from ray_jobs.config import ServeConfig
from ray_jobs.data import generate_reviews
from ray_jobs.inference import Predictor
from ray_jobs.onnx_export import build
from ray_jobs.onnx_runtime import (
    GUARD_FILES,
    MODEL_FILES,
    GuardReport,
    OnnxError,
    OnnxPredictor,
    RuntimeChoice,
    load_predictor,
    unservable,
)

# Lengths from one token to past the model's 64: padding, truncation and the mask all take part.
TEXTS = ["ok", "A wonderful, moving film.", "Dull and far too long. " * 3, "the worst acting I have seen " * 20]
# serve.runtime: onnx with int8 and the default guard thresholds
ONNX_INT8 = RuntimeChoice.of(ServeConfig(runtime="onnx", quantization="int8"))


@pytest.fixture(scope="module")
def exported(untrained_tiny, tmp_path_factory):
    """A copy of the tiny model folder with both exports and their guards, made as the CLI makes them."""
    folder = shutil.copytree(untrained_tiny, tmp_path_factory.mktemp("onnx") / "model")
    split = generate_reviews(200, seed=3)
    reports = {}
    for q in ("none", "int8"):
        files, reports[q] = build(folder, split, q, precision="fp32", batch_size=32)
        for name, content in files.items():
            (folder / name).write_bytes(content)
    return str(folder), reports


def _logits_and_cls(predictor: Predictor, texts):
    logits, cls = predictor.forward(predictor.encode(texts), embeddings=True)
    return logits.numpy(), cls.numpy()


def test_the_fp32_export_computes_the_eager_logits_and_cls_vectors_on_padded_batches(exported):
    folder, reports = exported
    eager = Predictor(folder, precision="fp32", batch_size=3)  # rows of mixed lengths share batches
    onnx = OnnxPredictor(folder, "none", batch_size=3)
    want, got = _logits_and_cls(eager, TEXTS), _logits_and_cls(onnx, TEXTS)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-3)
    assert onnx.embedding_dim == eager.embedding_dim
    # Same answers through the same API, drift features included.
    assert [p["label"] for p in onnx.predict(TEXTS)] == [p["label"] for p in eager.predict(TEXTS)]
    preds, features = onnx.predict_features(TEXTS)
    assert len(preds) == len(TEXTS) and features.embedding.shape == (len(TEXTS), eager.embedding_dim)
    assert reports["none"].agreement == 1.0 and reports["none"].refusal(0.003, 0.99) is None


def test_the_int8_export_stays_close_to_eager_and_its_guard_records_the_comparison(exported):
    folder, reports = exported
    eager = Predictor(folder, precision="fp32").predict_proba(TEXTS)
    int8 = OnnxPredictor(folder, "int8").predict_proba(TEXTS)
    assert np.abs(int8 - eager).max() < 0.05  # weights in int8: close, not equal
    report = reports["int8"]
    assert report.n == 200 and report.quantization == "int8" and report.eager_precision == "fp32"
    assert 0 <= report.agreement <= 1 and report.onnx_sha256 and report.data_digest
    assert unservable(folder, ONNX_INT8) == report.refusal(*ONNX_INT8[2:])  # the replica reads the same verdict


def _guard(**fields) -> GuardReport:
    """A guard report as an int8 export's, with `fields` changed."""
    base = {
        "quantization": "int8",
        "onnx_sha256": "x",
        "n": 1000,
        "data_digest": "d",
        "eager_precision": "bf16",
        "f1_eager": 0.920,
        "f1_onnx": 0.918,
        "agreement": 0.992,
        "created_at": 0,
    }
    return GuardReport(**{**base, **fields})


def test_guard_thresholds():
    report = _guard()
    assert report.refusal(0.003, 0.99) is None
    assert "0.0020 below" in report.refusal(0.001, 0.99)
    assert "agree with eager on 99.20%" in report.refusal(0.003, 0.995)
    better = report.model_copy(update={"f1_onnx": 0.93})
    assert better.refusal(0.0, 0.99) is None  # a gain is no drop


def test_an_export_that_disagrees_with_eager_is_refused_and_eager_is_served(exported, tmp_path):
    folder, _ = exported
    split = generate_reviews(100, seed=5)
    eager_labels = Predictor(folder, precision="fp32").predict_proba(split.texts).argmax(axis=1)
    # As if eager had answered the opposite: the export then agrees on no text and loses F1.
    files, report = build(folder, split, "int8", eager_labels=(1 - eager_labels).tolist(), precision="fp32")
    assert report.agreement == 0.0
    bad = shutil.copytree(folder, tmp_path / "refused")
    for name, content in files.items():
        (bad / name).write_bytes(content)
    predictor, info = load_predictor(bad, ONNX_INT8, precision="fp32")
    assert type(predictor) is Predictor
    assert info["runtime"] == "torch" and "failed its accuracy guard" in info["fallback"]
    assert "agree with eager on 0.00%" in info["fallback"]
    # Looser thresholds of the replica's own config accept the same guard file without re-scoring.
    predictor, info = load_predictor(bad, RuntimeChoice("onnx", "int8", 1.0, 0.0), precision="fp32")
    assert isinstance(predictor, OnnxPredictor) and info == {
        "runtime": "onnx",
        "quantization": "int8",
        "precision": "int8",
        "device": "cpu",
        "fallback": None,
    }


@pytest.mark.parametrize("damage", ["no export", "no guard", "replaced file", "corrupt file"])
def test_a_missing_or_altered_export_falls_back_to_eager_with_the_reason(exported, tmp_path, damage):
    folder, _ = exported
    model = shutil.copytree(folder, tmp_path / "m")
    onnx_file = model / MODEL_FILES["int8"]
    if damage == "no export":
        onnx_file.unlink()
    elif damage == "no guard":
        (model / GUARD_FILES["int8"]).unlink()
    elif damage == "replaced file":  # another valid model under the name the guard scored
        shutil.copy(model / MODEL_FILES["none"], onnx_file)
    else:
        onnx_file.write_bytes(b"not an onnx model")
    reason = {
        "no export": "no model.int8.onnx",
        "no guard": "no accuracy guard",
        "replaced file": "not the file its accuracy guard scored",
        "corrupt file": "not the file its accuracy guard scored",
    }[damage]
    predictor, info = load_predictor(model, RuntimeChoice("onnx", "int8", 1.0, 0.0), precision="fp32")
    assert type(predictor) is Predictor and info["runtime"] == "torch" and reason in info["fallback"]
    assert predictor.predict(TEXTS)  # and it answers


def test_an_export_that_cannot_load_is_served_eagerly(exported, tmp_path):
    """A file that passed its guard but that ONNX Runtime cannot open (a newer opset, a truncated copy
    whose guard was rewritten): eager, with ONNX Runtime's reason."""
    from ray_jobs.onnx_runtime import read_guard, sha256

    model = shutil.copytree(exported[0], tmp_path / "m")
    onnx_file = model / MODEL_FILES["none"]
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    guard = read_guard(model, "none").model_copy(update={"onnx_sha256": sha256(onnx_file)})
    (model / GUARD_FILES["none"]).write_text(guard.model_dump_json())
    with pytest.raises(OnnxError, match="ONNX Runtime cannot load"):
        OnnxPredictor(model, "none")
    predictor, info = load_predictor(model, RuntimeChoice("onnx", "none", 1.0, 0.0), precision="fp32")
    assert type(predictor) is Predictor and "ONNX Runtime cannot load" in info["fallback"]


def test_eager_is_what_the_default_choice_runs(untrained_tiny):
    predictor, info = load_predictor(untrained_tiny, precision="fp32")
    assert type(predictor) is Predictor
    assert info == {
        "runtime": "torch",
        "quantization": "none",
        "precision": "fp32",
        "device": "cpu",
        "fallback": None,
    }


def test_an_empty_guard_split_is_refused(untrained_tiny):
    from ray_jobs.data import Split

    with pytest.raises(OnnxError, match="non-empty"):
        build(untrained_tiny, Split([], []), "none")


@pytest.mark.integration
def test_a_model_process_runs_the_export_and_reports_it(exported, untrained_tiny):
    """serve_app's model process: the runtime it runs is what the parent reports, and its answers and
    drift features are the export's."""
    from serve_app.model_worker import ModelWorker

    folder, _ = exported
    choice = RuntimeChoice("onnx", "int8", 1.0, 0.0)
    worker = ModelWorker(folder, num_threads=1, precision="fp32", features=True, runtime=choice)
    try:
        assert worker.runtime == {
            "runtime": "onnx",
            "quantization": "int8",
            "precision": "int8",
            "device": "cpu",
            "fallback": None,
        }
        answer = worker.submit(TEXTS).result(timeout=60)
        want = OnnxPredictor(folder, "int8").predict(TEXTS)
        assert [p["score"] for p in answer.predictions] == pytest.approx([p["score"] for p in want], abs=1e-5)
        assert answer.features.embedding.shape[0] == len(TEXTS)
    finally:
        worker.close()
    fallback = ModelWorker(untrained_tiny, num_threads=1, precision="fp32", runtime=choice)  # no export there
    try:
        assert fallback.runtime["runtime"] == "torch" and "no model.int8.onnx" in fallback.runtime["fallback"]
        eager = Predictor(untrained_tiny, precision="fp32").predict(TEXTS)
        assert [p["score"] for p in fallback.predict(TEXTS)] == pytest.approx([p["score"] for p in eager], abs=1e-5)
    finally:
        fallback.close()


def test_an_export_leaves_the_processes_logging_as_it_was(untrained_tiny, tmp_path):
    """ORT's quantizer configures the root logger when imported; the export undoes that, or every later
    line of a pipeline driver would be printed twice. A fresh interpreter, as a command starts."""
    import subprocess
    import sys

    from conftest import ROOT

    code = f"""
import logging
from ray_jobs.onnx_export import export
export({untrained_tiny!r}, __import__("pathlib").Path({str(tmp_path / "m.onnx")!r}), "int8")
print(len(logging.getLogger().handlers), logging.getLogger().level)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == f"0 {logging.WARNING}"


def test_the_command_exports_a_folder_and_exits_3_when_the_guard_refuses(untrained_tiny, tmp_path, capsys):
    import json

    from ray_jobs import onnx_runtime
    from ray_jobs.cli import onnx

    model = shutil.copytree(untrained_tiny, tmp_path / "m")
    data = tmp_path / "test.jsonl"
    split = generate_reviews(60, seed=8)
    rows = zip(split.texts, split.labels, strict=True)
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    # 60 texts: under serve.min_guard_texts' default (200) the guard is refused as proving nothing.
    code = onnx.main(["--model", str(model), "--data", str(data), "--quantization", "int8", "--json"])
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["refusal"]
    assert code == 3 and "scored 60 texts, fewer than the 200 required" in refused
    args = ["--model", str(model), "--data", str(data), "--quantization", "int8", "--json"]
    args += ["--set", "serve.min_guard_texts=50"]
    code = onnx.main([*args, "--set", "serve.runtime=onnx", "--set", "serve.min_label_agreement=0"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["refusal"] is None and report["n"] == 60 and report["stored_in"] == str(model)
    assert unservable(model, RuntimeChoice("onnx", "int8", 1.0, 0.0)) is None
    # The strictest guard (F1 may not drop at all, every label must agree): refused exactly when the
    # int8 export changed any label, and then exit 3 with the files still written.
    code = onnx.main([*args, "--set", "serve.max_f1_drop=0", "--set", "serve.min_label_agreement=1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    perfect = report["agreement"] == 1.0 and report["f1_onnx"] >= report["f1_eager"]
    assert (report["refusal"] is None) == perfect and code == (0 if perfect else 3)
    assert (model / "model.int8.onnx").exists() and onnx_runtime.read_guard(model, "int8").n == 60
    assert onnx.main(["--model", str(tmp_path / "missing"), "--data", str(data)]) == 2


@pytest.mark.integration
def test_a_deploy_whose_export_is_refused_serves_eagerly_and_says_why(exported, serve_port, tmp_path, caplog):
    """`ray_jobs.deploy` with serve.runtime: onnx and int8 on a real Serve app, where the guard refuses
    (the replica's own threshold: every label must agree; the guard file is rewritten to report 99.5%):
    the app serves eager PyTorch, /model and the deploy log say why, and the answers are eager's."""
    from conftest import ROOT, TINY
    from ray import serve

    from ray_jobs.cli import deploy
    from ray_jobs.onnx_runtime import read_guard

    model = shutil.copytree(exported[0], tmp_path / "m")
    guard = read_guard(model, "int8").model_copy(update={"agreement": 0.995})
    (model / GUARD_FILES["int8"]).write_text(guard.model_dump_json())
    sets = [
        *TINY,
        f"serve.model_uri={model}",
        "serve.runtime=onnx",
        "serve.quantization=int8",
        "serve.min_label_agreement=1",
        "serve.precision=fp32",
        "serve.app_name=onnx-refused",
        "serve.route_prefix=/onnx-refused",
        "serve.num_cpus=0.5",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1",
        f"serve.port={serve_port}",
        f"registry.root={tmp_path}/mlflow",
    ]
    try:
        args = ["--config", str(ROOT / "tune_configs/quickstart.yaml"), *[x for kv in sets for x in ("--set", kv)]]
        assert deploy.main(args) == 0
        url = f"http://127.0.0.1:{serve_port}/onnx-refused"
        runtime = http.get(f"{url}/model", timeout=30).json()["runtime"]
        assert runtime["runtime"] == "torch" and "agree with eager on 99.50%" in runtime["fallback"]
        assert "replica serves eager PyTorch" in caplog.text and "99.50%" in caplog.text
        answer = http.post(f"{url}/predict", json={"text": TEXTS[1]}, timeout=30).json()
        assert answer["score"] == pytest.approx(
            Predictor(model, precision="fp32").predict([TEXTS[1]])[0]["score"], abs=1e-5
        )
    finally:
        serve.delete("onnx-refused")


def test_a_guard_on_too_few_texts_or_on_another_split_is_refused():
    """serve.min_guard_texts, and the version's recorded test split: a guard that scored a handful of
    texts, or a split other than the version's test split, proves nothing about the version."""
    guard = _guard(quantization="none", n=1, data_digest="abc", f1_eager=1.0, f1_onnx=1.0, agreement=1.0)
    assert guard.refusal(0.003, 0.99) is None  # the old rule: thresholds only
    assert "scored 1 texts, fewer than the 200 required" in guard.refusal(0.003, 0.99, 200)
    assert "another split (digest abc) than the version's test split (def)" in guard.refusal(0.003, 0.99, 1, "def")
    assert guard.refusal(0.003, 0.99, 1, "abc") is None


def test_the_served_guard_must_cover_the_versions_test_split(exported, tmp_path):
    folder, reports = exported
    model = shutil.copytree(folder, tmp_path / "model")
    choice = RuntimeChoice.of(ServeConfig(runtime="onnx", max_f1_drop=1.0, min_label_agreement=0.0))
    assert choice.min_guard_texts == 200 and unservable(model, choice) is None  # 200 texts scored
    assert "fewer than the 201 required" in unservable(model, choice._replace(min_guard_texts=201))
    other = choice._replace(test_digest="not-the-split-it-scored")
    predictor, info = load_predictor(model, other, precision="fp32")
    assert type(predictor) is Predictor and "another split" in info["fallback"]
    assert unservable(model, choice._replace(test_digest=reports["none"].data_digest)) is None


def test_concurrent_exports_into_one_folder_leave_a_consistent_pair(tmp_path):
    """Two writers storing their own export and guard into one folder at once: whenever the pair is read
    between two stores (under the stores' lock), the guard names the model file's sha256; no partial file
    is left behind."""
    import fcntl
    import hashlib
    import threading

    from ray_jobs.onnx_export import EXPORT_LOCK, store

    def files(tag: str) -> dict[str, bytes]:
        content = (tag * 200_000).encode()
        guard = {"onnx_sha256": hashlib.sha256(content).hexdigest(), "writer": tag}
        return {"model.onnx": content, "onnx_guard.json": json.dumps(guard).encode()}

    folder = tmp_path / "model"
    folder.mkdir()
    store(None, str(folder), str(folder), files("a"))
    stop, seen, bad = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            with open(folder / EXPORT_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                model, guard = (
                    (folder / "model.onnx").read_bytes(),
                    json.loads((folder / "onnx_guard.json").read_text()),
                )
            seen.append(guard["writer"])
            if hashlib.sha256(model).hexdigest() != guard["onnx_sha256"]:
                bad.append(guard["writer"])

    def writer(tag: str) -> None:
        for _ in range(30):
            store(None, str(folder), str(folder), files(tag))

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    check = threading.Thread(target=reader)
    check.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    check.join()
    assert not bad and {"a", "b"} <= set(seen)
    assert not list(folder.glob("*.partial"))

import asyncio
import json

import numpy as np
import pandas as pd
import pytest

from ray_jobs.config import ModelConfig
from ray_jobs.inference import Predictor
from ray_jobs.model import build_model, save_model

TEXTS = [
    "Great film.",
    "The plot was dull, the acting was wooden, and the ending made no sense at all after two long hours.",
    "not bad",
    "I loved every minute of it, the soundtrack was wonderful and the cast was charming.",
    "Awful.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_model(ModelConfig(source="tiny"), seed=5)
    return str(
        save_model(model, tok, tmp_path_factory.mktemp("m") / "model", {"max_length": 64, "truncation": "head_tail"})
    )


def test_order_preserved_and_batch_equals_one_by_one(model_dir):
    p = Predictor(model_dir, batch_size=2)
    batch = p.predict_proba(TEXTS)
    singles = np.stack([p.predict_proba([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    shuffled = p.predict_proba(TEXTS[::-1])
    np.testing.assert_allclose(shuffled[::-1], batch, atol=1e-5)


def test_padding_does_not_change_predictions(model_dir):
    p = Predictor(model_dir, batch_size=64)
    alone = p.predict_proba(["not bad"])[0]
    with_long_neighbour = p.predict_proba(["not bad", "word " * 200])[0]
    np.testing.assert_allclose(alone, with_long_neighbour, atol=1e-5)


def test_predict_shape(model_dir):
    out = Predictor(model_dir).predict(TEXTS)
    assert [set(r) for r in out] == [{"label", "score", "probabilities"}] * len(TEXTS)
    for r in out:
        assert r["label"] in ("positive", "negative")
        assert r["score"] == pytest.approx(max(r["probabilities"].values()))
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert Predictor(model_dir).predict_proba([]).shape == (0, 2)


def test_long_text_is_truncated_not_rejected(model_dir):
    p = Predictor(model_dir)
    [ids] = p.encode(["word " * 100_000])
    assert len(ids) == 64


def test_batched_method_awaited_directly_with_concurrent_calls(model_dir, replica_context):
    """The @serve.batch method, without a cluster: concurrent callers are grouped into batches and
    each gets the answer for its own text."""
    from serve_app.app import SentimentModel

    svc = SentimentModel(
        {
            "serve.model_uri": model_dir,
            "serve.precision": "fp32",
            "serve.max_batch_size": 8,
            "serve.batch_wait_timeout_s": 0.05,
        }
    )
    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(40)]
    expected = Predictor(model_dir).predict(texts)
    from unittest.mock import MagicMock

    observed = svc.metrics.observe_batch = MagicMock()

    async def run():
        await svc.reconfigure(
            {"model_uri": model_dir, "model_version": "local", "max_batch_size": 8, "batch_wait_timeout_s": 0.05}
        )
        return await asyncio.gather(*(svc._predict_batch(t) for t in texts))

    got = asyncio.run(run())
    sizes = [c.args[0] for c in observed.call_args_list]
    assert sum(sizes) == len(texts) and max(sizes) > 1 and max(sizes) <= 8, sizes
    stats = svc.batch_stats()
    assert (stats["batches"], stats["items"]) == (len(sizes), len(texts))
    # Forward passes were timed (they size the wait of a batch queued behind a running one), and with
    # the model idle again the configured wait is in force.
    assert 0 < stats["forward_s"] and svc._forward_s > 0 and svc._in_flight == 0
    assert svc.current_wait_s == pytest.approx(0.05)
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e["label"] and g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert g["model_version"] == "local"


def test_evaluate_cli_known_metrics_and_errors(model_dir, tmp_path, capsys, caplog):
    from ray_jobs.cli import evaluate

    preds = Predictor(model_dir, precision="fp32").predict(TEXTS)
    pred_labels = [1 if r["label"] == "positive" else 0 for r in preds]
    # Labels chosen so that the model is right on the first 3 and wrong on the last 2.
    labels = pred_labels[:3] + [1 - y for y in pred_labels[3:]]
    f = tmp_path / "eval.jsonl"
    pd.DataFrame({"review": TEXTS, "y": labels}).to_json(f, orient="records", lines=True)
    columns = ["--set", "data.text_column=review", "--set", "data.label_column=y"]
    code = evaluate.main(["--model", model_dir, "--data", str(f), *columns, "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 5 and out["accuracy"] == pytest.approx(0.6)
    tp = sum(1 for p, y in zip(pred_labels, labels, strict=True) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(pred_labels, labels, strict=True) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(pred_labels, labels, strict=True) if p == 0 and y == 1)
    expected_f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert out["f1"] == pytest.approx(expected_f1, abs=1e-6)
    assert len(out["data_digest"]) == 16

    assert evaluate.main(["--model", model_dir, "--data", str(f), "--set", "data.text_column=nope"]) == 2
    assert "missing column" in caplog.text
    assert evaluate.main(["--model", model_dir, "--data", str(tmp_path / "missing.csv")]) == 2
    assert (
        evaluate.main(
            [
                "--model",
                str(tmp_path / "no-model"),
                "--data",
                str(f),
                *columns,
                "--set",
                f"registry.root={tmp_path}/mlflow",
            ]
        )
        == 2
    )


def test_bf16_asked_for_on_a_cpu_without_it_is_honoured_with_one_warning(monkeypatch, caplog):
    import logging

    import torch

    from ray_jobs import inference

    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    inference._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ray_jobs.inference"):
        assert inference.autocast_dtype("bf16", "cpu") == torch.bfloat16  # asked for by name: honoured
        assert inference.autocast_dtype("bf16", "cpu") == torch.bfloat16
        assert inference.autocast_dtype("auto", "cpu") is None  # auto picks fp32 on such a CPU
    assert sum("emulated" in r.getMessage() for r in caplog.records) == 1  # once per process
    caplog.clear()
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    inference._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ray_jobs.inference"):
        assert inference.autocast_dtype("bf16", "cpu") == torch.bfloat16
        assert inference.autocast_dtype("auto", "cpu") == torch.bfloat16
    assert not any("emulated" in r.getMessage() for r in caplog.records)
    inference._warn_emulated_bf16.cache_clear()


def test_a_gpu_predictor_on_a_machine_without_cuda_fails_at_once_saying_what_it_saw(untrained_tiny, monkeypatch):
    """The model process of a GPU replica builds its Predictor when it starts: without CUDA it must fail
    there, naming the devices Ray assigned, not at the first request (nor silently compute on the CPU)."""
    import torch

    from ray_jobs.errors import ModelError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check is of machines without it (GPU runs: benchmarks/gpu_train.py)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ModelError, match=r"sees no CUDA device \(CUDA_VISIBLE_DEVICES='0'"):
        Predictor(untrained_tiny, precision="auto", device="cuda")


def test_the_runtime_says_where_it_computes(untrained_tiny):
    from ray_jobs.onnx_runtime import RuntimeInfo, load_predictor

    predictor, runtime = load_predictor(untrained_tiny, precision="fp32", batch_size=8)
    assert RuntimeInfo(**runtime).device == "cpu" == predictor.device_name and predictor.batch_size == 8

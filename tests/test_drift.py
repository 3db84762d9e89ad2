"""Drift: the tests on windows of features, the features from the forward pass, the monitor's windows,
versions and report, and the replica's feed. No Ray cluster (the Serve app is in test_drift_serve.py)."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from ray_jobs.drift import REFERENCE_FILE, TESTS, Detector, Features, Reference, empty_features


def synthetic(n: int, seed: int, pos_share=0.5, conf_shift=0.0, length_scale=1.0, emb_shift=0.0, dim=16) -> Features:
    """Features with known distributions: the null is the default arguments."""
    rng = np.random.default_rng(seed)
    length = np.maximum(3, rng.lognormal(5.0, 0.5, n) * length_scale).astype(np.int32)
    emb = rng.normal(0, 1, (n, dim))
    emb[:, 0] += emb_shift
    return Features(
        label=(rng.random(n) < pos_share).astype(np.int8),
        confidence=np.clip(rng.beta(8, 2, n) * 0.5 + 0.5 - conf_shift, 0.5, 1.0).astype(np.float32),
        length=length,
        unk=np.zeros(n, np.float32),
        truncated=length > 510,
        embedding=emb.astype(np.float16),
    )


REF = Reference.from_features(synthetic(1500, seed=1))


def test_the_false_alarm_rate_of_unshifted_windows_stays_within_alpha():
    det = Detector(REF, alpha=0.05, permutations=199)
    alarms = [det.test(synthetic(200, seed=100 + i)).alarm for i in range(40)]
    # Bonferroni over 4 tests keeps a window's false-alarm rate <= 5%: 2 of 40 expected at most.
    assert sum(alarms) <= 4
    assert det.threshold == pytest.approx(0.05 / len(TESTS))


@pytest.mark.parametrize(
    "shift, test",
    [
        ({"pos_share": 0.1}, "label"),
        ({"conf_shift": 0.1}, "confidence"),
        ({"length_scale": 0.3}, "length"),
        ({"emb_shift": 1.0}, "embedding"),
    ],
)
def test_each_kind_of_shift_alarms_its_own_test(shift, test):
    det = Detector(REF, permutations=199)
    result = det.test(synthetic(300, seed=7, **shift))
    assert result.alarm and result.tests[test].alarm, result.to_dict()
    assert result.tests[test].p_value < det.threshold
    body = result.to_dict()
    assert body["tests"][test]["alarm"] is True and set(body["tests"]) == set(TESTS)


def test_only_the_configured_tests_run_and_unknown_ones_are_refused():
    det = Detector(REF, tests=["label", "length"])
    assert set(det.test(synthetic(100, seed=3)).tests) == {"label", "length"}
    assert det.threshold == pytest.approx(0.025)
    with pytest.raises(ValueError, match="subset"):
        Detector(REF, tests=["label", "vibes"])
    with pytest.raises(ValueError, match="subset"):
        Detector(REF, tests=[])


def test_a_label_missing_from_both_samples_is_no_alarm_and_an_empty_window_no_error():
    ref = Reference.from_features(synthetic(200, seed=1, pos_share=0.0))
    result = Detector(ref, tests=["label"]).test(synthetic(50, seed=2, pos_share=0.0))
    assert not result.alarm and result.tests["label"].p_value == 1.0
    assert Detector(REF).test(empty_features(16)).to_dict() == {"n": 0, "alarm": False, "tests": {}, "summary": {}}


def test_a_reference_round_trips_without_pickle_and_keeps_a_bounded_embedding_sample(tmp_path):
    big = Reference.from_features(synthetic(2500, seed=5), {"data_digest": "abc"})
    assert len(big.features.embedding) == 1000 and len(big.features.label) == 2500
    path = big.save(tmp_path / REFERENCE_FILE)
    back = Reference.load(path)
    assert back.meta == {"n": 2500, "data_digest": "abc"}
    for field in ("label", "confidence", "length", "unk", "truncated", "embedding"):
        assert np.array_equal(getattr(back.features, field), getattr(big.features, field))
    with np.load(path, allow_pickle=False) as z:  # plain arrays: no object (pickled) entry
        assert all(z[k].dtype != object for k in z.files)


def test_features_come_from_the_same_forward_pass_in_input_order(untrained_tiny):
    import torch

    from ray_jobs.inference import Predictor

    p = Predictor(untrained_tiny, precision="fp32", batch_size=2)  # several length-sorted batches
    texts = ["a fine film " * 40, "bad", "great acting, dull plot", "ok", "x" * 5 + " qqq zzz"]
    predictions, f = p.predict_features(texts)
    assert predictions == p.predict(texts)
    assert [int(x) for x in f.label] == [int(r["label"] == "positive") for r in predictions]
    assert f.confidence == pytest.approx([r["score"] for r in predictions], abs=1e-6)
    raw = [len(p.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert f.length.tolist() == raw
    assert f.truncated.tolist() == [n > p.max_length - 2 for n in raw] and f.truncated[0]
    # The [CLS] vector the head reads, recomputed text by text without the hook.
    for i, t in enumerate(texts):
        ids = torch.tensor([p.encode([t])[0]])
        with torch.inference_mode():
            hidden = p.model.distilbert(input_ids=ids).last_hidden_state[0, 0]
        assert f.embedding[i].astype(np.float32) == pytest.approx(hidden.numpy(), abs=2e-2)
    assert len(p.predict_features([])[1]) == 0


# ------------------------------------------------------------------------------------ the monitor


@pytest.fixture(scope="module")
def profiled_models(untrained_tiny, tmp_path_factory):
    """Two local model folders with a drift reference each (the second a copy: another 'version')."""
    from ray_jobs.data import generate_reviews
    from ray_jobs.evaluate import evaluate_and_profile

    root = tmp_path_factory.mktemp("profiled")
    a, b = root / "a", root / "b"
    shutil.copytree(untrained_tiny, a)
    _, reference = evaluate_and_profile(str(a), generate_reviews(300, seed=11))
    reference.save(a / REFERENCE_FILE)
    shutil.copytree(a, b)
    return str(a), str(b)


def monitor(root, **drift):
    from serve_app.drift_monitor import DriftMonitor

    return DriftMonitor(
        {
            "registry.root": str(root),
            "serve.drift.window_size": drift.pop("window_size", 40),
            "serve.drift.alpha": 0.001,
            **{f"serve.drift.{k}": v for k, v in drift.items()},
        }
    )


def features_of(model_dir: str, texts: list[str]) -> Features:
    from ray_jobs.inference import Predictor

    return Predictor(model_dir, precision="fp32").predict_features(texts)[1]


def test_the_monitor_windows_tests_and_follows_a_newer_version(profiled_models, tmp_path, caplog):
    from ray_jobs.data import generate_reviews

    a, b = profiled_models
    same = features_of(a, generate_reviews(100, seed=99).texts)
    shifted = features_of(a, ["Dreadful."] * 40)

    async def scenario():
        m = monitor(tmp_path)
        empty = await m.report(a, "local", 1.0)
        assert empty["current"]["n"] == 0 and empty["windows"] == [] and empty["alarm"] is False
        assert empty["reference"]["n"] == 300 and empty["reference_error"] is None
        await m.add(a, "local", 1.0, same.take(slice(0, 25)))
        assert (await m.report())["current"]["n"] == 25  # no full window yet
        await m.add(a, "local", 1.0, same.take(slice(25, 50)))  # 50: one window of 40 and 10 open
        r = await m.report()
        assert r["windows_completed"] == 1 and r["current"]["n"] == 10
        assert r["windows"][0]["alarm"] is False and r["alarm"] is False, r["windows"][0]
        await m.add(a, "local", 1.0, shifted.take(slice(0, 30)))  # closes a mixed window: 10 + 30
        await m.add(a, "local", 1.0, shifted.take(slice(0, 40)).take(slice(0, 40)))
        r = await m.report()
        assert r["windows_completed"] == 3 and r["windows"][0]["alarm"] and r["alarm"]
        assert r["windows"][0]["tests"]["length"]["alarm"] and r["windows"][0]["index"] == 3
        # A newer version: fresh windows against its own reference; the old version's texts are stale.
        await m.add(b, "local", 2.0, same.take(slice(0, 5)))
        await m.add(a, "local", 1.0, same.take(slice(0, 7)))
        r = await m.report()
        assert r["model_uri"] == b and r["current"]["n"] == 5 and r["windows"] == [] and r["alarm"] is False
        assert r["stale_texts"] == 7

    with caplog.at_level("WARNING", logger="serve_app.drift_monitor"):
        asyncio.run(scenario())
    assert "drift alarm started" in caplog.text and "drift alarm ended" in caplog.text


def test_a_version_without_reference_is_reported_not_fatal(untrained_tiny, tmp_path):
    async def scenario():
        m = monitor(tmp_path)
        f = features_of(untrained_tiny, ["fine"] * 50)
        await m.add(untrained_tiny, "local", 1.0, f)
        return await m.report()

    r = asyncio.run(scenario())
    assert r["reference"] is None and REFERENCE_FILE in r["reference_error"]
    assert r["texts_seen"] == 50 and r["windows"] == [] and r["alarm"] is False


class _Monitor:
    """The monitor's handle as the replica sees it: `add.remote(...)` is awaitable."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail
        self.add = self

    def remote(self, uri, version, loaded_at, features):
        async def call():
            await asyncio.sleep(0.01)
            if self.fail:
                raise ConnectionError("monitor gone")
            self.calls.append((uri, version, len(features)))

        return call()


def test_the_feed_sends_per_version_one_call_at_a_time_and_counts_what_it_drops():
    from serve_app.drift_monitor import DriftFeed

    one = synthetic(10, seed=1)

    async def scenario(handle):
        feed = DriftFeed(handle, send_every=20, window_size=20)
        for _ in range(3):
            feed.add(("m", "1", 1.0), one)  # 30 texts: one send of 20 starts at the second add
        await asyncio.sleep(0.05)
        feed.add(("m", "2", 2.0), one)  # a new version: the 10 of version 1 are sent first
        await asyncio.sleep(0.05)
        for _ in range(6):
            feed.add(("m", "2", 2.0), one)
            await asyncio.sleep(0.03)
        feed.flush()
        await asyncio.sleep(0.05)
        return feed

    ok = _Monitor()
    feed = asyncio.run(scenario(ok))
    assert ok.calls[:3] == [("m", "1", 20), ("m", "1", 10), ("m", "2", 20)]
    assert sum(c[2] for c in ok.calls) == 100 and feed.dropped == 0
    failing = _Monitor(fail=True)
    feed = asyncio.run(scenario(failing))
    assert failing.calls == [] and feed.dropped == 100  # every text counted, no request touched


def test_the_feed_holds_at_most_four_windows_while_a_send_is_in_flight():
    from serve_app.drift_monitor import DriftFeed

    async def scenario():
        feed = DriftFeed(_Monitor(), send_every=20, window_size=20)
        for _ in range(12):  # never yields: the first send of 20 stays in flight
            feed.add(("m", "1", 1.0), synthetic(10, seed=1))
        return feed

    assert asyncio.run(scenario()).dropped == 20  # 100 buffered, the oldest 20 beyond 4 x 20 dropped


def test_drift_off_is_a_404_and_costs_the_model_process_nothing(untrained_tiny):
    from serve_app.app import SentimentModel
    from serve_app.http import ApiError
    from serve_app.loading import worker_factory

    model = SentimentModel({"serve.model_uri": untrained_tiny, "serve.drift.enabled": False})
    assert model.drift is None and model.drift_feed is None
    with pytest.raises(ApiError) as err:
        asyncio.run(model.drift_report())
    assert err.value.status == 404 and "serve.drift.enabled" in err.value.message
    assert worker_factory(model.args, untrained_tiny).keywords["features"] is False

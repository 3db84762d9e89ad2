"""Faults inside one replica, without a cluster: the replica's own deadline, its text bound, failed hot
swaps, and JSON that Python refuses. Real model processes, real signals; Serve's batching runs as in a
replica (only the replica context it reads max_ongoing_requests from is filled in)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal

import pytest

from serve_app.app import SentimentModel
from serve_app.http import ApiError, read_json_body

pytestmark = pytest.mark.integration  # real model processes, real signals


@pytest.fixture
def replica(replica_context):
    """A factory of SentimentModel replicas that are closed after the test."""
    made = []

    def make(model_dir: str, **args) -> SentimentModel:
        svc = SentimentModel(
            {
                "serve.model_uri": model_dir,
                "serve.precision": "fp32",
                "serve.trial_load": False,
                **{f"serve.{k}": v for k, v in args.items()},
            }
        )
        made.append(svc)
        return svc

    yield make
    for svc in made:
        if svc.predictor is not None:
            svc.predictor.close()


def _predict(svc: SentimentModel, texts: list[str]):
    return svc._timed("batch_predict", lambda: svc._predict(texts))


async def _one(svc: SentimentModel, text: str):
    """One text's prediction, or the ApiError it got."""
    try:
        return (await _predict(svc, [text]))[0]
    except ApiError as err:
        return err


def test_a_request_past_its_deadline_gets_504_not_a_hang(replica, untrained_tiny):
    """The model process wedged (SIGSTOP) with a batch deadline longer than the request's: the request
    is answered 504 at its deadline, and the replica then replaces the wedged process as usual."""
    svc = replica(untrained_tiny, request_timeout_s=1.0, batch_deadline_s=3.0)

    async def run():
        await svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"})
        assert len(await _predict(svc, ["fine"])) == 1
        os.kill(svc.predictor.worker.pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ApiError) as err:
            await _predict(svc, ["this one waits"])
        took = loop.time() - start
        assert err.value.status == 504 and "deadline" in err.value.message and 0.9 < took < 2.5
        # The wedged process misses its 3 s batch deadline and is killed; Serve's periodic health check
        # has it replaced, and the next request is answered.
        for _ in range(300):
            await svc.check_health()
            if svc.predictor.restarts == 1 and svc.status()[0] == "ok":
                break
            await asyncio.sleep(0.1)
        got = await _predict(svc, ["answered by the replacement"])
        return got, svc.predictor.restarts

    got, restarts = asyncio.run(run())
    assert len(got) == 1 and restarts == 1


def test_a_poison_text_gets_its_own_error_and_takes_nothing_down(replica, untrained_tiny, monkeypatch):
    """A model that raises on any batch holding a marker text (model_worker.POISON_ENV). Under concurrent
    requests batched together, the marker request gets its own 422 naming the text's digest and every
    other request its prediction; ten more marker texts within the minute leave the model process, the
    restart budget and the replica's health untouched; a repeated marker text never reaches the model."""
    from serve_app.model_worker import POISON_ENV

    monkeypatch.setenv(POISON_ENV, "POISON-MARKER")  # the replica's model process inherits it
    svc = replica(untrained_tiny, max_batch_size=16, batch_wait_timeout_s=0.2, max_model_restarts=1)

    async def run():
        await svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"})
        pid = svc.predictor.worker.pid
        first = [f"a fine film, number {i}" for i in range(7)] + ["POISON-MARKER in a review"]
        first += [f"a dull film, number {i}" for i in range(8)]
        batches = svc._batches
        answers = await asyncio.gather(*(_one(svc, t) for t in first))
        shared = svc._batches - batches < len(first)  # the marker shared a batch with other requests
        more = [t for i in range(10) for t in (f"POISON-MARKER number {i}", f"a good text, number {i}")]
        answers += await asyncio.gather(*(_one(svc, t) for t in more))
        calls = []
        submit = svc.predictor.worker.submit
        svc.predictor.worker.submit = lambda texts: (calls.append(list(texts)), submit(texts))[1]
        again = await _one(svc, "POISON-MARKER in a review")
        good = await _one(svc, "still answered")
        await svc.check_health()
        return first + more, answers, shared, again, good, calls, pid

    texts, answers, shared, again, good, calls, pid = asyncio.run(run())
    assert shared
    for text, answer in zip(texts, answers, strict=True):
        if "POISON-MARKER" in text:
            assert isinstance(answer, ApiError) and answer.status == 422, answer
            assert "the model failed on this text (sha256 " in answer.message and "poison marker" in answer.message
        else:
            assert isinstance(answer, dict) and answer["label"] in ("positive", "negative"), answer
    assert isinstance(again, ApiError) and again.status == 422 and calls == [["still answered"]]
    assert isinstance(good, dict)
    assert svc.predictor.worker.pid == pid and svc.predictor.restarts == 0 and svc.predictor.poisoned == 11
    assert svc.status()[0] == "ok"


def test_a_text_that_kills_the_model_process_costs_its_own_request_only(replica, untrained_tiny, monkeypatch):
    """A model process that dies of SIGKILL on any batch holding a marker text (model_worker.POISON_KILL_ENV,
    as a native crash would). The marker's batch loses its process twice, is run one text at a time, and
    the marker is found: its request gets 422, the seven batched with it their predictions. The four
    restarts are explained by it and leave the budget (3 a minute) untouched: an ordinary crash right after
    is still replaced. A repeated deadly text never reaches the model."""
    from serve_app.model_worker import POISON_KILL_ENV

    monkeypatch.setenv(POISON_KILL_ENV, "DEADLY-MARKER")  # the replica's model process inherits it
    svc = replica(untrained_tiny, max_batch_size=8, batch_wait_timeout_s=0.5, max_model_restarts=3)

    async def run():
        await svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"})
        rounds = []
        for marker in ("DEADLY-MARKER one",):
            texts = [f"a fine film, number {i}" for i in range(3)] + [marker] + [f"a dull one {i}" for i in range(4)]
            batches = svc._batches
            rounds.append((texts, await asyncio.gather(*(_one(svc, t) for t in texts)), svc._batches - batches))
        restarts = svc.predictor.restarts
        calls = []
        submit = svc.predictor.worker.submit
        svc.predictor.worker.submit = lambda texts: (calls.append(list(texts)), submit(texts))[1]
        again = await _one(svc, "DEADLY-MARKER one")
        # The budget is whole: an ordinary crash now is replaced as usual, not the end of the replica.
        os.kill(svc.predictor.worker.pid, signal.SIGKILL)
        for _ in range(300):
            await svc.check_health()
            if svc.predictor.restarts == restarts + 1 and svc.status()[0] == "ok":
                break
            await asyncio.sleep(0.1)
        return rounds, restarts, again, calls

    rounds, restarts, again, calls = asyncio.run(run())
    for texts, answers, batches in rounds:
        assert batches < len(texts)  # the marker shared a batch with other requests
        for text, answer in zip(texts, answers, strict=True):
            if "DEADLY-MARKER" in text:
                assert isinstance(answer, ApiError) and answer.status == 422, answer
                assert "the model process was lost twice on this text alone" in answer.message
            else:
                assert isinstance(answer, dict) and answer["label"] in ("positive", "negative"), answer
    assert restarts == 4  # two losses of the batch, two of the marker alone
    assert isinstance(again, ApiError) and again.status == 422 and calls == []
    assert svc.status()[0] == "ok" and svc.predictor.restarts == restarts + 1, svc.status()


def test_texts_count_against_the_replica_bound_and_the_overflow_gets_503_with_retry_after(replica, untrained_tiny):
    svc = replica(untrained_tiny, max_texts_in_flight=8, max_batch_items=8, batch_deadline_s=30)

    async def run():
        await svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"})
        pid = svc.predictor.worker.pid
        os.kill(pid, signal.SIGSTOP)  # hold the first request's 8 texts in flight
        first = asyncio.ensure_future(_predict(svc, [f"text {i}" for i in range(8)]))
        while svc._texts_in_flight < 8:
            await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as err:
            await _predict(svc, ["one more"])
        os.kill(pid, signal.SIGCONT)
        return err.value, await first, await _predict(svc, ["room again"])

    err, first, again = asyncio.run(run())
    assert err.status == 503 and "8 texts in flight" in err.message
    assert err.response().headers["retry-after"] == "1"
    assert len(first) == 8 and len(again) == 1


def test_a_failed_hot_swap_keeps_the_model_and_says_so(replica, untrained_tiny, tmp_path):
    """A swap to a model that cannot load: the replica keeps answering with its model, and /health,
    /model and the failed-swap metric say which swap failed; a later good swap clears it."""
    good = str(shutil.copytree(untrained_tiny, tmp_path / "good"))
    broken = shutil.copytree(untrained_tiny, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    svc = replica(untrained_tiny)
    counted = []
    svc.metrics.count_failed_swap = lambda: counted.append(1)

    async def run():
        await svc.reconfigure({"model_uri": untrained_tiny, "model_version": "local"})
        await svc.reconfigure({"model_uri": str(broken), "model_version": "local-2"})
        after_bad = (
            svc.status(),
            (await svc.model()).model_dump(),
            await svc.health(),
            await _predict(svc, ["still served"]),
        )
        await svc.check_health()  # degraded is not unhealthy: Serve must not replace this replica
        await svc.reconfigure({"model_uri": good, "model_version": "local-3"})
        return after_bad, svc.status(), (await svc.model()).model_dump()

    (status, info, health, answered), status_after, info_after = asyncio.run(run())
    assert status[0] == "degraded" and "broken" in status[1]
    assert (
        info["version"] == "local"
        and info["failed_swap"]["version"] == "local-2"
        and info["failed_swap"]["model_uri"] == str(broken)
    )
    assert health["status"] == "degraded" and health["model_version"] == "local" and "failed" in health["reason"]
    assert answered[0]["model_version"] == "local" and counted == [1]
    assert status_after == ("ok", "") and info_after["version"] == "local-3" and info_after["failed_swap"] is None


class _Body:
    """A real Starlette request carrying `body` (the ASGI receive channel is a plain coroutine)."""

    def __new__(cls, body: bytes):
        from starlette.requests import Request

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/predict",
            "headers": [(b"content-type", b"application/json")],
        }
        return Request(scope, receive)


@pytest.mark.parametrize(
    "body,why",
    [
        ("[" * 5000 + "]" * 5000, "RecursionError"),  # nesting past Python's recursion limit
        ('{"text": ' + "9" * 5000 + "}", "ValueError"),  # an integer past Python's int digit limit
    ],
)
def test_json_that_python_refuses_is_a_400(body, why):
    with pytest.raises(ApiError) as err:
        asyncio.run(read_json_body(_Body(body.encode()), max_bytes=1_000_000))
    assert err.value.status == 400 and why in err.value.message
    json.dumps(err.value.message)  # the error body itself is plain JSON

"""Word attributions (ray_jobs.explain) and the explainer deployment's logic (serve_app.explainer),
outside Serve. Over HTTP: tests/test_serve_integration.py."""

from __future__ import annotations

import asyncio
import time
import unicodedata

import pytest

from ray_jobs.config import ModelConfig
from ray_jobs.data import encode
from ray_jobs.explain import Explainer, encode_with_spans, merge_words
from ray_jobs.model import build_model, load_tokenizer, minilm_path, save_model

TEXTS = [
    "The plot was dull, but the acting was wonderful.",
    "Not bad at all<br /><br />I'd watch it again!!",
    "  leading spaces, UPPER case and numbers 1984 ",
    "émigré café naïveté — unicode “quotes” 😀",
]
LONG = " ".join(f"word{i} was great." for i in range(200))  # well past max_length: cut head and tail


def _plain(s: str) -> str:
    """As BERT's normalizer sees it: lower case, accents stripped."""
    return "".join(c for c in unicodedata.normalize("NFD", s.lower()) if unicodedata.category(c) != "Mn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    model, tok = build_model(ModelConfig(source="tiny"), seed=3)
    meta = {"max_length": 48, "truncation": "head_tail"}
    return str(save_model(model, tok, tmp_path_factory.mktemp("explain") / "model", meta))


@pytest.mark.parametrize("tokenizer", ["tiny", "minilm"])
def test_the_explained_tokens_are_those_predict_sees_and_spans_index_the_text(model_dir, tokenizer):
    tok = load_tokenizer(model_dir if tokenizer == "tiny" else minilm_path())
    for text in [*TEXTS, LONG]:
        for truncation in ("head", "head_tail"):
            ids, spans, words, truncated = encode_with_spans(tok, text, 48, truncation)
            assert ids == encode(tok, [text], 48, truncation)[0]
            assert truncated == (text == LONG) and len(ids) == len(spans) == len(words)
            for (start, end), token in zip(spans[1:-1], tok.convert_ids_to_tokens(ids[1:-1]), strict=True):
                piece = _plain(text[start:end])
                assert token in ("[UNK]", piece) or token.removeprefix("##") in piece, (token, piece)


def test_sub_word_scores_are_summed_per_word_with_its_span():
    text = "unbelievably good"
    spans = [None, (0, 2), (2, 7), (7, 12), (13, 17), None]
    words = [None, 0, 0, 0, 1, None]
    merged = merge_words(text, spans, words, [9.0, 0.5, 0.25, 0.25, -1.0, 9.0])
    assert merged == [
        {"word": "unbelievably", "start": 0, "end": 12, "score": 1.0},
        {"word": "good", "start": 13, "end": 17, "score": -1.0},
    ]


def test_the_scores_add_up_to_the_margin_and_more_steps_converge(model_dir):
    explainer = Explainer(model_dir, num_threads=1)
    coarse, fine = (explainer.explain(TEXTS[0], n_steps=n) for n in (2, 64))
    assert coarse["convergence_delta"] > fine["convergence_delta"]
    assert fine["convergence_delta"] < 0.02 * max(1.0, abs(sum(w["score"] for w in fine["words"])))
    assert [w["word"] for w in fine["words"]] == ["The", "plot", "was", "dull", ",", "but", "the", "acting", "was"] + [
        "wonderful",
        ".",
    ]
    assert fine["label"] in ("positive", "negative") and fine["method"] == "integrated_gradients"
    long = explainer.explain(LONG, n_steps=4)
    assert long["truncated"] and long["tokens"] == 48
    assert long["words"][0]["word"] == "word0" and long["words"][-1]["word"] == "."


def test_the_deployment_explains_the_version_it_is_asked_for(model_dir, tmp_path):
    """serve_app.explainer.ExplainModel, awaited directly: the model follows the (uri, version) of each
    call, as the ingress passes it across a hot swap."""
    from serve_app.explainer import ExplainModel

    model, tok = build_model(ModelConfig(source="tiny"), seed=11)
    other = str(save_model(model, tok, tmp_path / "other", {"max_length": 48, "truncation": "head_tail"}))
    deployment = ExplainModel({"registry": {"root": str(tmp_path / "mlflow")}})

    async def calls():
        first = await deployment.explain(model_dir, "local", TEXTS[0], 8)
        second = await deployment.explain(other, "local", TEXTS[0], 8)
        again = await deployment.explain(model_dir, "local", TEXTS[0], 8)
        return first, second, again

    first, second, again = asyncio.run(calls())
    assert first["probabilities"] != second["probabilities"] and first["probabilities"] == again["probabilities"]
    assert first["words"] == again["words"]


def test_a_cancelled_explanation_stops_at_its_next_forward_pass_and_frees_the_explainer(model_dir, tmp_path):
    """The ingress cancels an explanation at its deadline: the deployment's thread stops before its next
    forward pass (it does not compute on), so the next explanation does not wait behind it."""
    import threading

    from serve_app.explainer import ExplainModel

    deployment = ExplainModel({"registry": {"root": str(tmp_path / "mlflow")}})
    passes, outcome = [], []

    async def calls():
        await deployment.explain(model_dir, "local", TEXTS[0], 2)  # loads the model
        explainer = deployment._explainer
        margin = explainer._margin

        def counted(*args):
            passes.append((time.monotonic(), threading.get_ident()))
            time.sleep(0.05)  # a slower model: the long explanation takes ~6 s
            return margin(*args)

        explainer._margin = counted
        explainer._ig.forward_func = counted
        long = asyncio.ensure_future(deployment.explain(model_dir, "local", LONG, 2048))
        await asyncio.sleep(0.5)
        long.cancel()
        cancelled_at = time.monotonic()
        try:
            await long
        except asyncio.CancelledError:
            outcome.append("cancelled")
        short = await deployment.explain(model_dir, "local", TEXTS[0], 4)
        return cancelled_at, short, time.monotonic()

    cancelled_at, short, _ = asyncio.run(calls())
    assert outcome == ["cancelled"] and short["n_steps"] == 4
    long_thread = passes[0][1]
    before = [t for t, thread in passes if thread == long_thread and t < cancelled_at]
    after = [t for t, thread in passes if thread == long_thread and t >= cancelled_at]
    # The long explanation (~130 forward passes) had run a few when cancelled; it then finished at most
    # the pass in flight, and the short one ran on its own.
    assert 0 < len(before) < 30 and len(after) <= 1
    assert any(thread != long_thread for _, thread in passes)


def test_an_explanation_with_its_cancel_flag_set_raises_before_computing(model_dir):
    import threading

    from ray_jobs.explain import ExplanationCancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ExplanationCancelled):
        Explainer(model_dir).explain(TEXTS[0], 8, cancel)


@pytest.mark.integration
def test_the_top_words_of_clear_reviews_are_sentiment_words(trained_tiny):
    """On the model trained on the synthetic reviews: in each clear case the sentiment word is one of
    the two words with the highest score, and it pushes toward the predicted label (a random ranking
    of these 4-8 word texts would put it there about a third of the time)."""
    explainer = Explainer(trained_tiny[2], num_threads=1)
    cases = {
        "The plot was terrible.": ("terrible", "negative"),
        "The story was boring and the ending was awful.": ("awful", "negative"),
        "The acting was wonderful.": ("wonderful", "positive"),
        "I loved it. The script was brilliant.": ("loved", "positive"),
        "The dialogue was clumsy and lazy.": ("clumsy", "negative"),
        "The soundtrack was superb.": ("superb", "positive"),
    }
    for text, (word, label) in cases.items():
        result = explainer.explain(text, n_steps=32)
        ranked = sorted(result["words"], key=lambda w: -w["score"])
        assert result["label"] == label and word in [w["word"] for w in ranked[:2]], (text, result["words"])
        assert next(w["score"] for w in ranked if w["word"] == word) > 0

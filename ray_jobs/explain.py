"""Why the model said what it said: integrated gradients (Sundararajan et al., 2017) over the input
word embeddings, with captum's LayerIntegratedGradients, merged from sub-word tokens to the words of
the input with their character offsets.

    explainer = Explainer(model_dir, num_threads=1)
    explainer.explain("The plot was dull, but the acting was wonderful.", n_steps=20)
    # -> {"label": "positive", "score": 0.97, "words": [{"word": "dull", "start": 13, "end": 17,
    #     "score": -0.8}, ...], "method": "integrated_gradients", "convergence_delta": 0.01, ...}

What is attributed: the predicted class's logit margin (its logit minus the other one's), whose
change from the baseline the word scores add up to; `convergence_delta` is how far they miss that
total (the integral's approximation error: more `n_steps`, smaller delta). The baseline keeps [CLS]
and [SEP] and puts [PAD] in place of every other token. A positive score pushed toward the predicted
label, a negative one against it. The model sees exactly the tokens that /predict gives it (same
truncation); words past the truncation get no score and `truncated` says so.

Plain Python and PyTorch: no Ray, no Serve (serve_app.explainer serves it).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ray_jobs.data import HTML_BREAK, truncate_ids
from ray_jobs.errors import SentimentError
from ray_jobs.inference import Predictor, autocast
from ray_jobs.model import LABELS

METHOD = "integrated_gradients"


def encode_with_spans(
    tokenizer, text: str, max_length: int, truncation: str = "head_tail", head_fraction: float = 0.25
) -> tuple[list[int], list[tuple[int, int] | None], list[int | None], bool]:
    """(token ids as ray_jobs.data.encode gives them, each token's character span in `text` (None for
    [CLS]/[SEP]), each token's word index (None likewise), whether tokens were cut). HTML line breaks
    become spaces of the same length, so that spans index the original text."""
    clean = HTML_BREAK.sub(lambda m: " " * len(m.group()), text)
    enc = tokenizer(clean, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False)
    raw, offsets, words = enc["input_ids"], enc["offset_mapping"], enc.word_ids()
    kept = truncate_ids(list(range(len(raw))), max_length - 2, truncation, head_fraction)
    ids = [tokenizer.cls_token_id] + [raw[i] for i in kept] + [tokenizer.sep_token_id]
    spans = [None] + [tuple(offsets[i]) for i in kept] + [None]
    word_ids = [None] + [words[i] for i in kept] + [None]
    return ids, spans, word_ids, len(kept) < len(raw)


def merge_words(text: str, spans, word_ids, token_scores) -> list[dict[str, Any]]:
    """Sub-word scores summed per word of the input, in order, with the word's character span."""
    merged: dict[int, dict[str, Any]] = {}
    for span, word, score in zip(spans, word_ids, token_scores, strict=True):
        if word is None or span is None:
            continue
        entry = merged.setdefault(word, {"start": span[0], "end": span[1], "score": 0.0})
        entry["start"], entry["end"] = min(entry["start"], span[0]), max(entry["end"], span[1])
        entry["score"] += float(score)
    return [
        {"word": text[w["start"] : w["end"]], "start": w["start"], "end": w["end"], "score": round(w["score"], 6)}
        for w in sorted(merged.values(), key=lambda w: w["start"])
    ]


class ExplanationCancelled(SentimentError):
    """The caller gave up on the explanation (Explainer.explain's `cancel` was set)."""


class Explainer:
    """A model folder's predictions with word attributions. Not thread-safe: one explanation at a time
    (the serving deployment bounds its queue)."""

    def __init__(
        self,
        model_dir: str,
        num_threads: int | None = None,
        precision: str = "fp32",
        internal_batch_size: int = 16,
        device: str = "cpu",
    ):
        """`precision`: as the Predictor's; bf16 autocast (auto, on CPUs with AVX-512 BF16/AMX) explains a
        128-token review in about half the time, with the same top words and convergence delta
        (benchmarks/explain.py)."""
        from captum.attr import LayerIntegratedGradients

        # fp32 weights under autocast on a GPU too: the attributions are gradients, summed over steps.
        self.predictor = Predictor(
            model_dir, num_threads=num_threads, precision=precision, device=device, cast_weights=False
        )
        self.model = self.predictor.model.eval()
        self.tokenizer = self.predictor.tokenizer
        self.internal_batch_size = internal_batch_size
        self._cancel: threading.Event | None = None
        self._ig = LayerIntegratedGradients(self._margin, self.model.get_input_embeddings())

    def _margin(self, input_ids, attention_mask, target: int):
        if self._cancel is not None and self._cancel.is_set():
            raise ExplanationCancelled("explanation cancelled (its request's deadline passed)")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits[:, target] - logits[:, 1 - target]

    def explain(self, text: str, n_steps: int = 20, cancel: threading.Event | None = None) -> dict[str, Any]:
        """`cancel`: once set, the explanation stops before its next forward pass (one internal batch of
        integration steps) with ExplanationCancelled, so that the next one starts at once."""
        self._cancel = cancel
        try:
            return self._explain(text, n_steps)
        finally:
            self._cancel = None

    def _explain(self, text: str, n_steps: int) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        p = self.predictor
        ids, spans, word_ids, truncated = encode_with_spans(
            self.tokenizer, text, p.max_length, p.truncation, p.head_fraction
        )
        inputs = torch.tensor([ids], device=p.device)
        mask = torch.ones_like(inputs)
        baseline = torch.full_like(inputs, self.tokenizer.pad_token_id)
        baseline[0, 0], baseline[0, -1] = ids[0], ids[-1]
        with autocast(p.device.type, p.compute_amp):
            with torch.no_grad():
                probs = torch.softmax(self.model(input_ids=inputs, attention_mask=mask).logits.float(), -1)[0]
            target = int(probs.argmax())
            attributions, delta = self._ig.attribute(
                inputs=inputs,
                baselines=baseline,
                additional_forward_args=(mask, target),
                n_steps=n_steps,
                internal_batch_size=self.internal_batch_size,
                return_convergence_delta=True,
            )
        token_scores = attributions.float().sum(dim=-1)[0].detach().cpu().tolist()
        return {
            "label": LABELS[target],
            "score": float(probs[target]),
            "probabilities": {LABELS[0]: float(probs[0]), LABELS[1]: float(probs[1])},
            "words": merge_words(text, spans, word_ids, token_scores),
            "method": METHOD,
            "target": f"logit margin of '{LABELS[target]}'",
            "n_steps": n_steps,
            "convergence_delta": float(delta.abs().item()),
            "tokens": len(ids),
            "truncated": truncated,
            "seconds": round(time.perf_counter() - start, 4),
        }

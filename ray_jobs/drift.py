"""Drift: does the text a model serves still look like what it was tested on?

A model's *reference profile* is computed when it is registered, from its held-out test split: per
text the predicted label, the confidence (max probability), the token length before truncation, the
share of `[UNK]` tokens, whether it was truncated, and the [CLS] vector the classifier head reads.
Serving computes the same features from the forward pass it runs anyway (`Predictor.predict_features`),
and a window of them is tested against the reference:

    label       predicted-label counts, two-sample chi-square (window vs reference), with PSI beside it
    confidence  two-sample Kolmogorov-Smirnov
    length      two-sample Kolmogorov-Smirnov on token counts
    embedding   MMD with a Gaussian kernel, p-value by permutation

All are two-sample tests: the reference is itself a sample, so its noise is part of the null. A
window alarms when any test's p-value is below alpha / (number of tests) (Bonferroni), which keeps
the false-alarm rate of a window at most alpha. Plain numpy/scipy: no Ray, no MLflow, no Serve.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

TESTS = ("label", "confidence", "length", "embedding")
# The reference file in a registered version's model folder (numpy arrays, loaded without pickle).
REFERENCE_FILE = "drift_reference.npz"
# [CLS] vectors kept in a reference: MMD's cost grows with the square of the sample.
REFERENCE_EMBEDDINGS = 1000


@dataclass
class Features:
    """Per-text features of one forward pass, as arrays of equal length (embedding: (n, d) float16)."""

    label: np.ndarray
    confidence: np.ndarray
    length: np.ndarray
    unk: np.ndarray
    truncated: np.ndarray
    embedding: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS})

    def take(self, idx) -> Features:
        return Features(**{f: getattr(self, f)[idx] for f in _FIELDS})

    def summary(self) -> dict[str, float]:
        """What an operator reads first: shares and medians, beside the tests' statistics."""
        if len(self) == 0:
            return {}
        return {
            "positive_share": float(np.mean(self.label == 1)),
            "mean_confidence": float(np.mean(self.confidence)),
            "median_length": float(np.median(self.length)),
            "unk_share": float(np.mean(self.unk)),
            "truncated_share": float(np.mean(self.truncated)),
        }


_FIELDS = tuple(f.name for f in fields(Features))


def features_from(probs: np.ndarray, seqs, raw_lengths, unk_counts, embeddings: np.ndarray) -> Features:
    """Features from a forward pass's probabilities (n, 2) and [CLS] vectors (n, d), the token id
    lists it ran on (with [CLS]/[SEP]) and the token counts of the texts before truncation (without)."""
    raw = np.asarray(raw_lengths, dtype=np.int32)
    kept = np.asarray([len(s) - 2 for s in seqs], dtype=np.int32)
    return Features(
        label=probs.argmax(axis=1).astype(np.int8),
        confidence=probs.max(axis=1).astype(np.float32),
        length=raw,
        unk=(np.asarray(unk_counts, dtype=np.float32) / np.maximum(raw, 1)).astype(np.float32),
        truncated=raw > kept,
        embedding=np.asarray(embeddings, dtype=np.float16),
    )


def empty_features(dim: int = 0) -> Features:
    return Features(
        label=np.zeros(0, np.int8),
        confidence=np.zeros(0, np.float32),
        length=np.zeros(0, np.int32),
        unk=np.zeros(0, np.float32),
        truncated=np.zeros(0, bool),
        embedding=np.zeros((0, dim), np.float16),
    )


# ------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """A model version's profile: its features on held-out text (embeddings subsampled)."""

    features: Features
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: Features, meta: dict | None = None, seed: int = 0) -> Reference:
        rng = np.random.default_rng(seed)
        n = len(features)
        keep = np.sort(rng.choice(n, size=min(n, REFERENCE_EMBEDDINGS), replace=False))
        rest = {k: getattr(features, k) for k in _FIELDS if k != "embedding"}
        f = Features(**rest, embedding=features.embedding[keep])
        return cls(f, {"n": n, **(meta or {})})

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {k: getattr(self.features, k) for k in _FIELDS}
        np.savez_compressed(buf, meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8), **arrays)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        with np.load(path, allow_pickle=False) as z:  # arrays only: a reference file cannot run code
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(Features(**{k: z[k] for k in _FIELDS}), meta)


# ------------------------------------------------------------------------------------------- tests
@dataclass
class Check:
    statistic: float
    p_value: float
    threshold: float
    extra: dict = field(default_factory=dict)

    @property
    def alarm(self) -> bool:
        return self.p_value < self.threshold

    def to_dict(self) -> dict:
        return {
            "statistic": round(self.statistic, 6),
            "p_value": round(self.p_value, 6),
            "threshold": self.threshold,
            "alarm": self.alarm,
            **self.extra,
        }


def psi(ref_counts: np.ndarray, win_counts: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two count vectors (0.1-0.25: moderate shift, above: large)."""
    p = np.maximum(ref_counts / max(ref_counts.sum(), 1), eps)
    q = np.maximum(win_counts / max(win_counts.sum(), 1), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def label_test(ref: np.ndarray, win: np.ndarray, threshold: float) -> Check:
    from scipy.stats import chi2_contingency

    r = np.bincount(ref.astype(np.int64), minlength=2)[:2]
    w = np.bincount(win.astype(np.int64), minlength=2)[:2]
    table = np.stack([r, w])
    if (table.sum(axis=0) == 0).any():  # one label in neither sample: nothing to compare
        stat, p = 0.0, 1.0
    else:
        res = chi2_contingency(table, correction=False)
        stat, p = float(res.statistic), float(res.pvalue)
    return Check(stat, p, threshold, {"psi": round(psi(r, w), 6)})


def ks_test(ref: np.ndarray, win: np.ndarray, threshold: float) -> Check:
    from scipy.stats import ks_2samp

    res = ks_2samp(ref, win, method="asymp")
    return Check(float(res.statistic), float(res.pvalue), threshold)


def median_bandwidth(x: np.ndarray, max_points: int = 500) -> float:
    """The median pairwise distance of `x` (the usual Gaussian-kernel bandwidth heuristic)."""
    x = x[:max_points].astype(np.float32)
    d2 = _sq_dists(x, x)
    d = np.sqrt(d2[np.triu_indices(len(x), k=1)])
    return float(np.median(d)) if len(d) else 1.0


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def mmd_test(
    ref: np.ndarray, win: np.ndarray, threshold: float, permutations: int, bandwidth: float, seed: int = 0
) -> Check:
    """Squared MMD (biased estimate) with a Gaussian kernel, and its permutation p-value. All
    permutations at once: with s the +1/m, -1/n label vector of a split, MMD^2 = s^T K s, so the
    statistics of P splits are the column sums of S * (K @ S)."""
    x = np.concatenate([ref, win]).astype(np.float32)
    m, n = len(ref), len(win)
    k = np.exp(-_sq_dists(x, x) / (2.0 * bandwidth**2))
    rng = np.random.default_rng(seed)
    base = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)]).astype(np.float32)
    s = np.empty((m + n, permutations + 1), dtype=np.float32)
    s[:, 0] = base
    for j in range(1, permutations + 1):
        s[:, j] = base[rng.permutation(m + n)]
    stats = (s * (k @ s)).sum(axis=0)
    observed = float(stats[0])
    p = float((1 + np.sum(stats[1:] >= observed)) / (permutations + 1))
    return Check(observed, p, threshold)


@dataclass
class WindowResult:
    n: int
    tests: dict[str, Check]
    summary: dict[str, float]

    @property
    def alarm(self) -> bool:
        return any(t.alarm for t in self.tests.values())

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "alarm": self.alarm,
            "tests": {k: v.to_dict() for k, v in self.tests.items()},
            "summary": self.summary,
        }


def bonferroni(alpha: float, n_tests: int) -> float:
    """Each test's threshold, so that a window's false-alarm rate over all tests stays <= alpha."""
    return alpha / n_tests


class Detector:
    """The tests of one reference, ready for windows (the bandwidth and the reference sample are
    computed once)."""

    def __init__(
        self,
        reference: Reference,
        tests: Sequence[str] = TESTS,
        alpha: float = 0.05,
        permutations: int = 300,
        seed: int = 0,
    ):
        unknown = set(tests) - set(TESTS)
        if unknown or not tests:
            raise ValueError(f"tests must be a non-empty subset of {TESTS} (got {list(tests)})")
        self.reference, self.tests, self.alpha = reference, tuple(tests), alpha
        self.threshold = bonferroni(alpha, len(self.tests))
        self.permutations, self.seed = permutations, seed
        self._ref_emb = reference.features.embedding.astype(np.float32)
        self.bandwidth = median_bandwidth(self._ref_emb) if "embedding" in self.tests else 1.0
        self._windows = 0

    def test(self, window: Features) -> WindowResult:
        ref, t = self.reference.features, self.threshold
        results: dict[str, Check] = {}
        if len(window) == 0:
            return WindowResult(0, {}, {})
        if "label" in self.tests:
            results["label"] = label_test(ref.label, window.label, t)
        if "confidence" in self.tests:
            results["confidence"] = ks_test(ref.confidence, window.confidence, t)
        if "length" in self.tests:
            results["length"] = ks_test(ref.length, window.length, t)
        if "embedding" in self.tests:
            self._windows += 1
            results["embedding"] = mmd_test(
                self._ref_emb,
                window.embedding.astype(np.float32),
                t,
                self.permutations,
                self.bandwidth,
                seed=self.seed + self._windows,
            )
        return WindowResult(len(window), results, window.summary())

"""The promotion gate: a pure function of two evaluations on the same test split and a policy.

No I/O here. The pipeline evaluates, holds the registry lock, calls `decide`, and writes aliases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from ray_jobs.errors import GateError
from ray_jobs.inference import classification_metrics


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on a labelled split, and the metrics they give."""

    labels: tuple[int, ...]
    predictions: tuple[int, ...]
    digest: str
    model: str = ""

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def metrics(self) -> dict[str, float]:
        return classification_metrics(np.asarray(self.labels), np.asarray(self.predictions))

    @property
    def f1(self) -> float:
        return self.metrics["f1"]


@dataclass(frozen=True)
class Policy:
    floor: float = 0.85
    min_delta: float = 0.0
    significance: Literal["none", "mcnemar", "bootstrap"] = "none"
    alpha: float = 0.05
    bootstrap_samples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_f1: float
    champion_f1: float | None
    delta: float | None
    test_digest: str
    n: int
    policy: dict = field(default_factory=dict)
    p_value: float | None = None
    delta_ci_low: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "BLOCK"
        champ = "none" if self.champion_f1 is None else f"{self.champion_f1:.4f}"
        return (
            f"gate: {verdict} (challenger F1 {self.challenger_f1:.4f}, champion F1 {champ}, n={self.n}): {self.reason}"
        )


def mcnemar_p(challenger_right: np.ndarray, champion_right: np.ndarray) -> float:
    """One-sided exact McNemar test: P(challenger wins >= b of the b + c discordant pairs | no difference)."""
    b = int((challenger_right & ~champion_right).sum())
    c = int((~challenger_right & champion_right).sum())
    n = b + c
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n)


def bootstrap_delta_low(
    labels: np.ndarray, chal: np.ndarray, champ: np.ndarray, alpha: float, samples: int, seed: int
) -> float:
    """The alpha-quantile of the paired-bootstrap distribution of F1(challenger) - F1(champion)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    deltas = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        deltas[i] = (
            classification_metrics(labels[idx], chal[idx])["f1"] - classification_metrics(labels[idx], champ[idx])["f1"]
        )
    return float(np.quantile(deltas, alpha))


def decide(challenger: Evaluation, champion: Evaluation | None, policy: Policy) -> Decision:
    """Promote iff the challenger is at least as good as the champion on the same test split
    (F1 >= champion F1 + min_delta, with statistical evidence when the policy asks for it); with
    no champion, iff its F1 reaches the floor."""
    pol = asdict(policy)
    f1 = challenger.f1
    if champion is None:
        ok = f1 >= policy.floor
        reason = f"first model: F1 {f1:.4f} {'>=' if ok else '<'} floor {policy.floor:.4f}"
        return Decision(ok, reason, f1, None, None, challenger.digest, challenger.n, pol)
    if champion.digest != challenger.digest or champion.labels != challenger.labels:
        raise GateError(
            f"champion and challenger were evaluated on different test splits ({champion.digest} vs "
            f"{challenger.digest})"
        )
    cf1 = champion.f1
    delta = f1 - cf1
    if delta < policy.min_delta:
        reason = f"F1 {f1:.4f} < champion {cf1:.4f} + min_delta {policy.min_delta:.4f}"
        return Decision(False, reason, f1, cf1, delta, challenger.digest, challenger.n, pol)
    labels = np.asarray(challenger.labels)
    chal, champ = np.asarray(challenger.predictions), np.asarray(champion.predictions)
    if policy.significance == "mcnemar":
        p = mcnemar_p(chal == labels, champ == labels)
        ok = p < policy.alpha
        reason = f"delta {delta:+.4f}, McNemar one-sided p={p:.4g} {'<' if ok else '>='} alpha {policy.alpha}"
        return Decision(ok, reason, f1, cf1, delta, challenger.digest, challenger.n, pol, p_value=p)
    if policy.significance == "bootstrap":
        low = bootstrap_delta_low(labels, chal, champ, policy.alpha, policy.bootstrap_samples, policy.seed)
        ok = low > policy.min_delta
        reason = (
            f"delta {delta:+.4f}, bootstrap {100 * (1 - policy.alpha):.0f}% lower bound {low:+.4f} "
            f"{'>' if ok else '<='} min_delta {policy.min_delta:.4f}"
        )
        return Decision(ok, reason, f1, cf1, delta, challenger.digest, challenger.n, pol, delta_ci_low=low)
    reason = f"F1 {f1:.4f} >= champion {cf1:.4f} + min_delta {policy.min_delta:.4f}"
    return Decision(True, reason, f1, cf1, delta, challenger.digest, challenger.n, pol)


def policy_from_config(gate_cfg) -> Policy:
    return Policy(
        floor=gate_cfg.floor,
        min_delta=gate_cfg.min_delta,
        significance=gate_cfg.significance,
        alpha=gate_cfg.alpha,
        bootstrap_samples=gate_cfg.bootstrap_samples,
    )


def evaluation_from(labels: Sequence[int], predictions: Sequence[int], digest: str, model: str = "") -> Evaluation:
    return Evaluation(tuple(int(y) for y in labels), tuple(int(p) for p in predictions), digest, model)

"""The promotion gate: a pure function of two evaluations on the same test split and a policy.

No I/O here. The pipeline evaluates, holds the registry lock, calls `decide`, and writes aliases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

from ray_jobs.behaviour import Report
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
    # Block a challenger whose behavioural failure rate (ray_jobs.behaviour) of any test type exceeds
    # this; None: the suite is reported, not gated on.
    behaviour_max_failure_rate: float | None = None


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
    # The challenger's behavioural failure rates per test type, and, where they blocked it, the
    # failing tests with examples.
    behaviour: dict | None = None

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


def behaviour_check(report: Report | None, max_rate: float | None) -> tuple[str | None, dict | None]:
    """(why the behavioural suite blocks, None if it does not; what the decision records of it)."""
    if report is None:
        if max_rate is not None:
            raise GateError("gate.behaviour.max_failure_rate is set but no behavioural report was given")
        return None, None
    rates = report.failure_rates()
    record: dict = {"suite_version": report.suite_version, "failure_rates": rates}
    if max_rate is None:
        return None, record
    over = {kind: rate for kind, rate in rates.items() if rate > max_rate}
    if not over:
        return None, record
    record["failing"] = [
        {"test": t.name, "type": t.type, "failure_rate": t.failure_rate, "examples": t.examples}
        for t in report.tests
        if t.type in over and t.failures
    ]
    worst = ", ".join(f"{kind} {rate:.1%}" for kind, rate in over.items())
    return f"behavioural failure rate {worst} > max {max_rate:.1%}", record


def decide(
    challenger: Evaluation, champion: Evaluation | None, policy: Policy, behaviour: Report | None = None
) -> Decision:
    """Promote iff the challenger is at least as good as the champion on the same test split
    (F1 >= champion F1 + min_delta, with statistical evidence when the policy asks for it); with
    no champion, iff its F1 reaches the floor. Either way, a challenger whose behavioural report
    fails the policy's bound is blocked."""
    decision = _decide_f1(challenger, champion, policy)
    blocked_by, record = behaviour_check(behaviour, policy.behaviour_max_failure_rate)
    if blocked_by is not None:
        reason = f"{blocked_by} (F1 check: {decision.reason})"
        return replace(decision, promote=False, reason=reason, behaviour=record)
    return replace(decision, behaviour=record)


def _decide_f1(challenger: Evaluation, champion: Evaluation | None, policy: Policy) -> Decision:
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
        behaviour_max_failure_rate=gate_cfg.behaviour.max_failure_rate,
    )


def evaluation_from(labels: Sequence[int], predictions: Sequence[int], digest: str, model: str = "") -> Evaluation:
    return Evaluation(tuple(int(y) for y in labels), tuple(int(p) for p in predictions), digest, model)

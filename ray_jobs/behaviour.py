"""Behavioural tests of a sentiment model, in the style of CheckList (Ribeiro et al., 2020): the cases an
F1 score hides. A fixed, versioned set of template-generated cases of three types:

- MFT (minimum functionality): clear positive and negative statements, each negated ("not good",
  "not bad"), and contrasts ("X, but Y": Y decides). Fails where the label is wrong.
- INV (invariance): names, places, numbers, punctuation or casing changed. Fails where a variant's
  label differs from the original's.
- DIR (directional expectation): "I loved it." appended must not lower the positive probability
  ("I hated it." must not raise it) by more than DIR_TOLERANCE.

    python -m ray_jobs behaviour --model <models:/name@alias | version | folder> [--json] [--config ...]

The pipeline runs it on every registered version (MLflow: metrics behaviour.<type>_failure_rate and
behaviour.json); `gate.behaviour.max_failure_rate` makes the gate block a challenger for which any test
fails more often than that. Plain Python and PyTorch through ray_jobs.inference: no Ray, no MLflow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import product
from typing import Literal

log = logging.getLogger(__name__)

# Changes whenever a case is added, removed or changed: reports of different versions do not compare.
SUITE_VERSION = "1"
# A directional case fails only where the probability moves the wrong way by more than this
# (CheckList's sentiment suite used 0.1; a tighter bound, as appending a verdict should help).
DIR_TOLERANCE = 0.05
# Failing examples kept per test in a report (and in a gate decision).
EXAMPLES_KEPT = 5

TestType = Literal["MFT", "INV", "DIR"]

_SUBJECTS = ["the acting", "the plot", "the story", "the script", "the ending", "the dialogue", "the direction"]
_POSITIVE = ["good", "great", "excellent", "wonderful", "brilliant", "beautiful", "moving", "fantastic"]
_NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "weak", "predictable", "disappointing"]
_NAMES = ["John", "Maria", "Wei", "Aisha", "Carlos", "Olga", "Kenji", "Fatima"]
_PLACES = ["London", "Lagos", "Chicago", "Mumbai", "Berlin", "Lima", "Osaka", "Toronto"]
_NUMBERS = ["2", "3", "7", "12", "95", "140"]


@dataclass(frozen=True)
class Test:
    """One behavioural test: `cases` are lists of texts. MFT: one text per case with `labels[i]` its
    label; INV: an original and its variants; DIR: an original and its variants, `direction[i]` +1
    (positive probability must not drop) or -1 (must not rise)."""

    name: str
    type: TestType
    capability: str
    cases: tuple[tuple[str, ...], ...]
    labels: tuple[int, ...] = ()
    direction: tuple[int, ...] = ()


@dataclass
class TestResult:
    name: str
    type: TestType
    capability: str
    n: int
    failures: int
    examples: list[dict] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        return self.failures / self.n if self.n else 0.0


REPORT_FILE = "behaviour.json"  # a registered version's report: an artifact of its run


@dataclass
class Report:
    suite_version: str
    suite_digest: str
    tests: list[TestResult]

    def failure_rates(self) -> dict[str, float]:
        """Failure rate per test type (failed cases over all cases of that type)."""
        out = {}
        for kind in ("MFT", "INV", "DIR"):
            of = [t for t in self.tests if t.type == kind]
            n = sum(t.n for t in of)
            out[kind] = sum(t.failures for t in of) / n if n else 0.0
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        """The report `to_dict` wrote (behaviour.json)."""
        fields = ("name", "type", "capability", "n", "failures", "examples")
        tests = [TestResult(**{k: t[k] for k in fields if k in t}) for t in d["tests"]]
        return cls(d["suite_version"], d["suite_digest"], tests)

    def to_dict(self) -> dict:
        return {
            "suite_version": self.suite_version,
            "suite_digest": self.suite_digest,
            "failure_rates": self.failure_rates(),
            "tests": [{**asdict(t), "failure_rate": t.failure_rate} for t in self.tests],
        }


def _statements(words: Sequence[str]) -> list[str]:
    return [f"{s.capitalize()} was {w}." for s, w in product(_SUBJECTS, words)]


def _originals() -> list[str]:
    """Clear statements of both polarities for INV and DIR tests: one per subject and word."""
    return [t for pair in zip(_statements(_POSITIVE), _statements(_NEGATIVE), strict=True) for t in pair]


def suite() -> list[Test]:
    """The fixed suite (SUITE_VERSION). Every case comes from the word lists above by templates."""
    pos, neg = _statements(_POSITIVE), _statements(_NEGATIVE)
    negated_pos = [f"{s.capitalize()} was not {w}." for s, w in product(_SUBJECTS, _POSITIVE)]
    negated_neg = [f"{s.capitalize()} was not {w}." for s, w in product(_SUBJECTS, _NEGATIVE)]
    negated_neg += [f"{s.capitalize()} was not {w} at all." for s, w in product(_SUBJECTS[:3], _NEGATIVE)]
    pairs = list(zip(_SUBJECTS, _SUBJECTS[1:] + _SUBJECTS[:1], strict=True))
    words = list(zip(_POSITIVE, _NEGATIVE, strict=True))
    but_pos = [f"{a.capitalize()} was {n}, but {b} was {p}." for (a, b), (p, n) in product(pairs, words)]
    but_neg = [f"{a.capitalize()} was {p}, but {b} was {n}." for (a, b), (p, n) in product(pairs, words)]
    originals = _originals()
    # 28 originals, half of each polarity, for the tests that vary a slot around them.
    sample = [t for pair in zip(pos[::4], neg[::4], strict=True) for t in pair]

    def mft(name: str, capability: str, texts: list[str], label: int) -> Test:
        return Test(name, "MFT", capability, tuple((t,) for t in texts), labels=(label,) * len(texts))

    def inv(name: str, capability: str, variants: Callable[[str], list[str]]) -> Test:
        return Test(name, "INV", capability, tuple((t, *variants(t)) for t in sample))

    def dir_(name: str, suffix: str, direction: int) -> Test:
        cases = tuple((t, f"{t} {suffix}") for t in originals)
        return Test(name, "DIR", "directional", cases, direction=(direction,) * len(cases))

    return [
        mft("clear_positive", "vocabulary", pos, 1),
        mft("clear_negative", "vocabulary", neg, 0),
        mft("negated_positive", "negation", negated_pos, 0),
        mft("negated_negative", "negation", negated_neg, 1),
        mft("contrast_ends_positive", "contrast", but_pos, 1),
        mft("contrast_ends_negative", "contrast", but_neg, 0),
        inv("change_names", "named entities", lambda t: [f"{n} said that {t[0].lower()}{t[1:]}" for n in _NAMES]),
        inv("change_places", "named entities", lambda t: [f"I saw it in {p}. {t}" for p in _PLACES]),
        inv("change_numbers", "numbers", lambda t: [f"I saw it {n} times. {t}" for n in _NUMBERS]),
        inv("punctuation", "robustness", lambda t: [t[:-1], t[:-1] + "!", t[:-1] + "...", t[:-1] + "!!"]),
        inv("casing", "robustness", lambda t: [t.lower(), t.upper(), t.title()]),
        dir_("add_positive_verdict", "I loved it.", +1),
        dir_("add_negative_verdict", "I hated it.", -1),
    ]


def suite_digest(tests: Sequence[Test]) -> str:
    blob = json.dumps([asdict(t) for t in tests], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_suite(predict_proba: Callable[[list[str]], Sequence[Sequence[float]]], tests: Sequence[Test] | None = None):
    """Score every case with `predict_proba` (texts -> (n, 2) probabilities; one call for the whole
    suite, so a batched predictor batches it) and count the failures of each test."""
    tests = list(tests or suite())
    texts = sorted({t for test in tests for case in test.cases for t in case})
    probs = predict_proba(texts)
    p_pos = {t: float(p[1]) for t, p in zip(texts, probs, strict=True)}
    results = []
    for test in tests:
        failed: list[dict] = []
        for i, case in enumerate(test.cases):
            if test.type == "MFT":
                [text] = case
                want = test.labels[i]
                if int(p_pos[text] >= 0.5) != want:
                    failed.append({"text": text, "expected": want, "positive_probability": round(p_pos[text], 4)})
            elif test.type == "INV":
                labels = {int(p_pos[t] >= 0.5) for t in case}
                if len(labels) > 1:
                    failed.append({"texts": {t: round(p_pos[t], 4) for t in case}})
            else:
                base = p_pos[case[0]]
                for variant in case[1:]:
                    moved = (p_pos[variant] - base) * test.direction[i]
                    if moved < -DIR_TOLERANCE:
                        failed.append(
                            {
                                "text": case[0],
                                "variant": variant,
                                "from": round(base, 4),
                                "to": round(p_pos[variant], 4),
                            }
                        )
                        break
        results.append(
            TestResult(test.name, test.type, test.capability, len(test.cases), len(failed), failed[:EXAMPLES_KEPT])
        )
    return Report(SUITE_VERSION, suite_digest(tests), results)


def run_on_model(model_dir: str, batch_size: int = 64) -> Report:
    """The suite on a saved model folder, scored as the gate scores (fp32)."""
    from ray_jobs.inference import Predictor

    predictor = Predictor(model_dir, precision="fp32", batch_size=batch_size)
    return run_suite(predictor.predict_proba)


def format_report(report: Report) -> str:
    lines = [f"behavioural suite v{report.suite_version} ({report.suite_digest})"]
    lines += [f"  {'test':<24} {'type':<4} {'cases':>5} {'failed':>7}"]
    for t in report.tests:
        lines.append(f"  {t.name:<24} {t.type:<4} {t.n:>5} {t.failure_rate:>7.1%}")
    lines.append("  failure rate per type: " + ", ".join(f"{k} {v:.1%}" for k, v in report.failure_rates().items()))
    for t in report.tests:
        for ex in t.examples[:2]:
            lines.append(f"  e.g. {t.name}: {json.dumps(ex)}")
    return "\n".join(lines)


if __name__ == "__main__":  # the command moved to ray_jobs.cli: fail, never exit 0 having done nothing
    raise SystemExit("python -m ray_jobs.behaviour is no command: run `python -m ray_jobs behaviour`")

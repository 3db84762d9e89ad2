"""The behavioural suite (ray_jobs.behaviour): its cases, how it counts failures, its command, and the
gate option that blocks a model which ignores negation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from ray_jobs.behaviour import SUITE_VERSION, format_report, run_suite, suite, suite_digest
from ray_jobs.cli.behaviour import main
from ray_jobs.errors import GateError
from ray_jobs.gate import Policy, decide, evaluation_from

POSITIVE = {"good", "great", "excellent", "wonderful", "brilliant", "beautiful", "moving", "fantastic", "loved"}
NEGATIVE = {"bad", "awful", "terrible", "boring", "dull", "weak", "predictable", "disappointing", "hated"}


def lexicon(negation: bool, numbers_flip: bool = False):
    """A word-counting classifier (later words weigh more): `negation` flips the word after "not";
    `numbers_flip` makes any digit turn the verdict negative (a spurious feature)."""

    def predict_proba(texts):
        out = []
        for text in texts:
            words = re.findall(r"[a-z]+|\d+", text.lower())
            score = 0.0
            for i, w in enumerate(words):
                sign = 1 if w in POSITIVE else -1 if w in NEGATIVE else 0
                if negation and i and words[i - 1] == "not":
                    sign = -sign
                score += sign * (1 + 0.1 * i)  # later words weigh more: "X, but Y" ends on Y
            if numbers_flip and any(w.isdigit() for w in words):
                score = -5
            p = 1 / (1 + np.exp(-3 * score))
            out.append([1 - p, p])
        return np.asarray(out)

    return predict_proba


def rates(report):
    return {t.name: t.failure_rate for t in report.tests}


def test_the_suite_is_fixed_and_versioned():
    tests = suite()
    assert suite_digest(tests) == suite_digest(suite())  # the same cases every time
    assert {t.type for t in tests} == {"MFT", "INV", "DIR"}
    assert {t.capability for t in tests} >= {"negation", "contrast", "named entities", "numbers", "directional"}
    assert all(len(t.cases) >= 20 for t in tests)
    # A change to any case changes the digest: bump SUITE_VERSION with it, reports of two versions do not compare.
    assert (SUITE_VERSION, suite_digest(tests)) == ("1", "96693c0d5d718d72")


def test_a_negation_blind_model_fails_the_negation_tests_and_nothing_else():
    blind = run_suite(lexicon(negation=False))
    aware = run_suite(lexicon(negation=True))
    assert rates(blind)["negated_positive"] == 1.0 and rates(blind)["negated_negative"] == 1.0
    assert all(rate == 0.0 for name, rate in rates(blind).items() if not name.startswith("negated"))
    assert all(rate == 0.0 for rate in rates(aware).values())
    assert blind.failure_rates()["MFT"] == pytest.approx(136 / 360) and aware.failure_rates()["MFT"] == 0.0
    [negated] = [t for t in blind.tests if t.name == "negated_positive"]
    assert len(negated.examples) == 5 and negated.examples[0]["expected"] == 0
    assert "negated_positive" in format_report(blind)


def test_a_spurious_feature_fails_invariance_and_a_verdict_that_hurts_fails_direction():
    numbers = rates(run_suite(lexicon(negation=True, numbers_flip=True)))
    assert numbers["change_numbers"] == 0.5  # the positive originals flip, the negative ones stay
    assert numbers["change_names"] == numbers["casing"] == 0.0

    def loved_is_bad(texts):
        p = lexicon(negation=True)(texts)
        return np.asarray([[0.9, 0.1] if "loved" in t else row for t, row in zip(texts, p, strict=True)])

    direction = rates(run_suite(loved_is_bad))
    assert direction["add_positive_verdict"] == 0.5  # the positive originals drop from ~1 to 0.1
    assert direction["add_negative_verdict"] == 0.0


def test_the_gate_blocks_on_behaviour_only_when_asked_and_keeps_the_examples():
    labels = [1, 0] * 50
    ev = evaluation_from(labels, labels, "d")
    blind = run_suite(lexicon(negation=False))
    reported = decide(ev, None, Policy(floor=0.5), blind)
    assert reported.promote and reported.behaviour["failure_rates"]["MFT"] > 0.3 and "failing" not in reported.behaviour
    blocked = decide(ev, None, Policy(floor=0.5, behaviour_max_failure_rate=0.2), blind)
    assert not blocked.promote and "behavioural failure rate MFT" in blocked.reason
    failing = {f["test"]: f for f in blocked.behaviour["failing"]}
    assert set(failing) == {"negated_positive", "negated_negative"} and failing["negated_positive"]["examples"]
    json.dumps(blocked.to_dict())  # the decision record stays serialisable
    assert decide(ev, None, Policy(floor=0.5, behaviour_max_failure_rate=0.2), run_suite(lexicon(True))).promote
    with pytest.raises(GateError):  # asked to gate on behaviour without a report: no decision
        decide(ev, None, Policy(floor=0.5, behaviour_max_failure_rate=0.2))


@pytest.fixture(scope="module")
def negation_blind(trained_tiny, tmp_path_factory) -> str:
    """The trained tiny model with the embeddings of its negation words replaced by that of "was":
    "the plot was not good" reads as "the plot was was good"."""
    import torch

    from ray_jobs.model import load_model, save_model

    model, tok, meta = load_model(trained_tiny[2])
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for word in ("not", "never", "hardly"):
            emb[tok.convert_tokens_to_ids(word)] = emb[tok.convert_tokens_to_ids("was")]
    return str(save_model(model, tok, tmp_path_factory.mktemp("blind") / "model", meta))


@pytest.mark.integration
def test_the_pipeline_gate_blocks_a_model_that_ignores_negation(tmp_path, trained_tiny, negation_blind):
    from ray_jobs.config import RegistryConfig
    from ray_jobs.data import load_splits
    from ray_jobs.evaluate import evaluate_dir
    from ray_jobs.pipeline import run_behaviour, run_gate
    from ray_jobs.registry import Registry

    cfg = tiny_config(tmp_path, "gate.floor=0.5", "gate.behaviour.max_failure_rate=0.25")
    reg = Registry(RegistryConfig(root=f"{tmp_path}/mlflow"))
    test = load_splits(cfg.data).test
    outcomes = {}
    for name, model_dir in (("blind", negation_blind), ("intact", trained_tiny[2])):
        run_id = reg.start_run(name)
        version = reg.register(run_id, model_dir, {"test_f1": "0"})
        report = run_behaviour(reg, cfg, run_id, version, model_dir)
        decision, _ = run_gate(reg, cfg, version, evaluate_dir(model_dir, test), test, run_id, report)
        outcomes[name] = (version, report, decision)
        reg.end_run(run_id, "FINISHED")
    blind_v, blind_report, blind_decision = outcomes["blind"]
    intact_v, intact_report, intact_decision = outcomes["intact"]
    # What the construction does: negation broken, the rest as before.
    assert rates(blind_report)["negated_positive"] > 0.8 and rates(intact_report)["negated_positive"] < 0.1
    assert not blind_decision.promote and "behavioural" in blind_decision.reason
    assert blind_decision.challenger_f1 >= 0.5  # its F1 alone would have passed the floor
    assert intact_decision.promote and reg.champion() == intact_v
    # Recorded: rates on the version, the failing examples in the run's decision record.
    assert float(reg.get_version(blind_v).tags["behaviour.MFT_failure_rate"]) > 0.25
    local = reg.client.download_artifacts(reg.get_version(blind_v).run_id, "gate_decision.json", str(tmp_path))
    saved = json.loads(Path(local).read_text())
    assert saved["promote"] is False and any(f["test"] == "negated_positive" for f in saved["behaviour"]["failing"])


@pytest.mark.integration
def test_the_command_reports_per_type_and_refuses_a_missing_model(trained_tiny, tmp_path, capsys, caplog):
    assert main(["--model", trained_tiny[2], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["failure_rates"]) == {"MFT", "INV", "DIR"} and out["suite_version"] == SUITE_VERSION
    assert len(out["tests"]) == len(suite()) and out["model"] == trained_tiny[2]
    assert main(["--model", str(tmp_path / "nothing"), "--set", f"registry.root={tmp_path}/mlflow"]) == 2

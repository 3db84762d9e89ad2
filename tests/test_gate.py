import numpy as np
import pytest

from ray_jobs.errors import GateError
from ray_jobs.gate import Policy, decide, evaluation_from, mcnemar_p


def ev(labels, preds, digest="d"):
    return evaluation_from(labels, preds, digest)


LABELS = [1, 0] * 50


def with_errors(n_wrong, offset=0):
    preds = list(LABELS)
    for i in range(offset, offset + n_wrong):
        preds[i] = 1 - preds[i]
    return preds


def test_lower_f1_is_blocked():
    d = decide(ev(LABELS, with_errors(10)), ev(LABELS, with_errors(5)), Policy())
    assert not d.promote and d.delta < 0 and "champion" in d.reason


def test_equal_f1_is_promoted_with_zero_min_delta():
    d = decide(ev(LABELS, with_errors(5, offset=0)), ev(LABELS, with_errors(5, offset=0)), Policy(min_delta=0.0))
    assert d.promote and d.delta == 0


def test_first_model_floor():
    assert not decide(ev(LABELS, with_errors(30)), None, Policy(floor=0.85)).promote
    d = decide(ev(LABELS, with_errors(5)), None, Policy(floor=0.85))
    assert d.promote and d.champion_f1 is None and "floor" in d.reason


def test_min_delta_is_honoured():
    chal, champ = ev(LABELS, with_errors(4)), ev(LABELS, with_errors(5))
    assert decide(chal, champ, Policy(min_delta=0.0)).promote
    assert not decide(chal, champ, Policy(min_delta=0.05)).promote


@pytest.mark.parametrize("significance", ["mcnemar", "bootstrap"])
def test_significance_blocks_a_tiny_gain_and_passes_a_large_one(significance):
    champ = ev(LABELS, with_errors(10))
    tiny_gain = ev(LABELS, with_errors(9))
    assert decide(tiny_gain, champ, Policy(significance="none")).promote
    assert not decide(tiny_gain, champ, Policy(significance=significance, bootstrap_samples=300)).promote
    big_labels = [1, 0] * 500
    big_champ = ev(big_labels, [1 - y if i < 200 else y for i, y in enumerate(big_labels)])
    big_gain = ev(big_labels, [1 - y if i < 20 else y for i, y in enumerate(big_labels)])
    assert decide(big_gain, big_champ, Policy(significance=significance, bootstrap_samples=300)).promote


def test_different_test_splits_refused():
    with pytest.raises(GateError, match="different test splits"):
        decide(ev(LABELS, LABELS, "a"), ev(LABELS, LABELS, "b"), Policy())


def test_mcnemar_values():
    right = np.array([True] * 10)
    assert mcnemar_p(right, right) == 1.0
    chal = np.array([True] * 10)
    champ = np.array([False] * 10)
    assert mcnemar_p(chal, champ) == pytest.approx(1 / 1024)


def test_decision_is_serialisable_and_summarised():
    d = decide(ev(LABELS, with_errors(5)), None, Policy())
    assert d.to_dict()["promote"] is True
    assert "PROMOTE" in d.summary()


def test_a_failure_after_the_alias_moved_says_promoted_not_deployed_and_exits_4(monkeypatch, capsys):
    """Once the champion alias has moved, a later failure must not claim "nothing promoted": it becomes
    PromotedNotDeployedError, and the pipeline exits 4 naming the promoted version."""
    from ray_jobs import pipeline
    from ray_jobs.cli import pipeline as command
    from ray_jobs.cli.common import EXIT_NOT_DEPLOYED
    from ray_jobs.errors import PromotedNotDeployedError

    with pytest.raises(PromotedNotDeployedError) as err:
        with pipeline.promoted_steps("7", "deploying"):
            raise ConnectionError("Serve unreachable")
    assert err.value.version == "7" and "deploying failed" in str(err.value) and "Serve unreachable" in str(err.value)
    with pytest.raises(ConnectionError):  # no promotion happened: the error stays what it was
        with pipeline.promoted_steps(None, "deploying"):
            raise ConnectionError("Serve unreachable")

    def run(*_, **__):
        with pipeline.promoted_steps("7", "the sample request"):
            raise TimeoutError("no answer")

    monkeypatch.setattr(command, "run_pipeline", run)
    from conftest import ROOT

    assert command.main(["--config", str(ROOT / "tune_configs/quickstart.yaml")]) == EXIT_NOT_DEPLOYED == 4
    out = capsys.readouterr().out
    assert "PROMOTED v7 in the registry, NOT DEPLOYED" in out and "the sample request failed" in out

"""benchmarks/figures.py draws every kind of committed result, and chaos.py's timeline bins requests right."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402
import figures  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        ("chaos_run3.json", "chaos"),
        ("serve_load_shadow_haproxy.json", "serve_load"),
        ("accuracy_seed42_sdpa.json", "accuracy"),
        ("drift_imdb_detection.json", "drift"),
        ("gpu_train_h200_run2.json", "gpu_train"),
        ("data_scale_imdb_after.json", "data_scale"),
        ("suite_profile_2core.json", "suite_profile"),
        ("suite_profile_2core_fork.json", "suite_profile"),
    ],
)
def test_each_kind_of_committed_result_is_drawn(name, kind, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "FIGURES", tmp_path)
    data = json.loads((RESULTS / name).read_text())
    assert figures.kind_of(data) == kind
    out = figures.render(RESULTS / name)
    assert out == tmp_path / name.replace(".json", ".png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # The docs show the committed figure of this result: it is the one this script draws.
    assert (ROOT / "docs" / "figures" / out.name).exists()


def test_the_timeline_bins_requests_by_when_they_ended_from_the_fault(tmp_path, monkeypatch):
    # (start, end, status) around a fault at t=10: two answered before it, a failure and a slow answer after.
    records = [(9.0, 9.2, 200), (9.1, 9.4, 200), (10.1, 10.2, "conn"), (10.2, 11.3, 200)]
    tl = chaos.timeline(records, t_fault=10.0)
    assert tl["bin_s"] == 0.5
    assert tl["t"] == [-1.0, 0.0, 1.0]  # ended 0.8 and 0.6 s before the fault; 0.2 and 1.3 s after
    assert tl["ok"] == [2, 0, 1] and tl["failed"] == [0, 1, 0]
    assert tl["p99_ms"][0] == pytest.approx(300) and tl["p99_ms"][1] is None and tl["p99_ms"][2] == pytest.approx(1100)
    # ... and a result with timelines is drawn as timelines.
    row = {"fault": "model-kill", "mode": "proxy", "sent": 4, "failed": 1, "recovery_s": 1.5, "timeline": tl}
    path = tmp_path / "chaos_timeline.json"
    path.write_text(json.dumps({"machine": "test", "args": {"faults": ["model-kill"]}, "rows": [row]}))
    monkeypatch.setattr(figures, "FIGURES", tmp_path)
    assert figures.render(path).stat().st_size > 5_000


def test_a_result_it_cannot_draw_is_refused():
    with pytest.raises(ValueError, match="not a result"):
        figures.kind_of({"something": 1})

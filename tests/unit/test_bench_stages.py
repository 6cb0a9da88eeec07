"""The bench's stage recorder: summaries are what the recorded durations say, and a reset starts afresh."""

from __future__ import annotations

from bench.stages import Recorder


def test_summary_reports_count_mean_and_percentiles_in_ms() -> None:
    recorder = Recorder()
    recorder.durations["fold"].extend([0.001 * i for i in range(1, 101)])  # 1 ms .. 100 ms
    recorder.cpu["fold"] += 0.25
    recorder.calls["fold"] += 4

    summary = recorder.summary()

    fold = summary["stages"]["fold"]
    assert fold["events"] == 100
    assert fold["mean_ms"] == 50.5
    assert fold["p50_ms"] == 51.0
    assert fold["p99_ms"] == 100.0
    assert summary["cpu_s"] == {"fold": 0.25}
    assert summary["calls"] == {"fold": 4}
    assert "by_user_hop" not in summary["stages"]  # a stage with no events is left out, not reported as 0


def test_reset_forgets_everything_recorded() -> None:
    recorder = Recorder()
    recorder.durations["total"].append(0.2)
    recorder.events["e1"] = [1.0, 2.0, 3.0]
    recorder.reset()
    assert recorder.summary() == {"stages": {}, "cpu_s": {}, "calls": {}, "delta_events": 0}
    assert recorder.events == {}

"""The roofline comparison of the GPU study script, on hand-made trial records."""

from __future__ import annotations

import pandas as pd
import pytest

from chains.harness.roofline import LLAMA2_7B_SHAPE_PARAMS, roofline

FACTS = {"bandwidth_bytes_s": 3.35e12, "power_limit_w": 700.0}


def _trials(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["knob", "value", "status", "completion_tokens", "energy_gpu_j"])


def _calls(key: str, value: int, spans: list[tuple[float, float]]) -> list[dict]:
    return [{"key": key, "kind": "llm", "knob": "batch-size", "value": value, "t_start": a, "t_end": b}
            for a, b in spans]


def test_best_configuration_is_compared_with_the_floor_shared_by_sequences_in_flight():
    trials = _trials([
        ("batch-size", 1, "ok", 1000, 6000.0), ("batch-size", 1, "ok", 1000, 6200.0),
        ("batch-size", 8, "ok", 1000, 900.0), ("batch-size", 8, "ok", 1000, 1100.0),
        ("batch-size", 16, "infeasible", 0, float("nan")),
    ])
    # Batch 8: four calls overlapping for the whole 10 s in one trial, two in the other: 3 in flight on average.
    runs = pd.DataFrame(_calls("b8-r0", 8, [(0, 10)] * 4) + _calls("b8-r1", 8, [(0, 10)] * 2)
                        + _calls("b1-r0", 1, [(0, 5), (5, 10)]))
    report = roofline(trials, runs, FACTS)

    assert report["best_config"] == {"knob": "batch-size", "value": 8}
    assert report["gpu_energy_per_token_j"] == pytest.approx(1.0)
    assert report["repeats"] == 2
    assert report["mean_sequences_in_flight"] == pytest.approx(3.0)
    floor = LLAMA2_7B_SHAPE_PARAMS * 2 / 3.35e12 * 700.0 / 3.0
    assert report["floor_j_per_token"] == pytest.approx(floor)
    assert report["ratio"] == pytest.approx(1.0 / floor)


def test_no_finished_trial_gives_no_report():
    trials = _trials([("batch-size", 16, "infeasible", 0, float("nan"))])
    assert roofline(trials, pd.DataFrame(columns=["key", "kind", "knob", "value", "t_start", "t_end"]), FACTS) is None

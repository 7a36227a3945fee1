"""`benchmarks/lr_phases.py`: the ratio of two lrs' mean losses in each stretch of training."""

from __future__ import annotations

import pytest

from benchmarks.lr_phases import phase_ratios


def _run(lr: float, seed: int, curve: list[float], width: int = 8, diverged: bool = False) -> dict:
    return dict(optimizer="m", width=width, lr=lr, seed=seed, curve=curve, diverged=diverged)


def test_ratios_are_per_stretch_and_averaged_over_seeds() -> None:
    results = {
        "config": {"scale": "width", "values": [8, 16]},
        "runs": [
            _run(1.0, 0, [1.0, 1.0, 4.0, 4.0]),
            _run(1.0, 1, [3.0, 3.0, 2.0, 2.0]),  # lr 1: means 2 and 3
            _run(0.5, 0, [4.0, 4.0, 1.0, 1.0]),
            _run(0.5, 1, [4.0, 4.0, 2.0, 2.0]),  # lr 1/2: means 4 and 1.5
            _run(0.5, 0, [1.0] * 4, width=16),  # width 16 lacks the larger lr: left out
            _run(1.0, 0, [9.0] * 4, width=16, diverged=True),
        ],
    }
    assert phase_ratios(results, "m", 0, -1, 2) == {8: [pytest.approx(0.5), pytest.approx(2.0)]}
    assert phase_ratios(results, "other", 0, -1, 2) == {}

"""`benchmarks/unfolded_drift.py` measures the harness's own run: probing the updates leaves
the training exactly as `modnorm.experiments.train_one` does it."""

from __future__ import annotations

import math

import pytest

from benchmarks import peers
from benchmarks import unfolded_drift as ud
from modnorm import data as mn_data
from modnorm import experiments as ex

pytestmark = pytest.mark.usefixtures("restore_torch")  # see conftest


def test_measuring_the_updates_leaves_the_run_as_the_harness_trains_it() -> None:
    got = ud.run(("unfolded", 4, 0, 50))
    assert [r["step"] for r in got["records"]] == [0, 50, 100, 150]
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in got["records"] for k in ud.PARTS)
    cfg = ex.SweepConfig(model="rescnn", steps=200, input_noise=1.0, depth=2)
    data = mn_data.load("digits", image=True, input_noise=1.0)
    method = peers.METHODS["modnorm-dual-unfolded-all"]  # the published runs it explains
    lr = 2.0 ** ud.LOG2_LR["unfolded"]
    want = ex.train_one(cfg, data, method.name, 4, 2, lr, 0, build=method.build)
    assert got["train_loss"] == want["train_loss"]  # the same run, bit for bit

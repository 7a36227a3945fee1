"""`benchmarks/unfolded_schedule.py`: its schedules scale the lr step by step, and its linear
one is the harness's own run of ``modnorm-dual-unfolded``, bit for bit."""

from __future__ import annotations

import pytest
import torch

from benchmarks import peers
from benchmarks import unfolded_schedule as us
from modnorm import data as mn_data
from modnorm import experiments as ex

pytestmark = pytest.mark.usefixtures("restore_torch")  # see conftest


def test_each_step_runs_at_the_peak_times_the_schedule() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.5)
    us.scheduled(opt, us.SCHEDULES["quadratic"], steps=4)
    seen = []
    for _ in range(4):
        w.grad = torch.ones(1)
        before = w.detach().clone()
        opt.step()
        seen.append(float(before - w.detach()))
    assert seen == pytest.approx([0.5 * (1 - k / 4) ** 2 for k in range(4)])


def test_the_linear_schedule_is_the_harness_run() -> None:
    got = us.run(("linear", 4, 2, 0, 20, 0))
    cfg = ex.SweepConfig(model="rescnn", steps=20, input_noise=1.0, depth=2)
    data = mn_data.load("digits", image=True, input_noise=1.0)
    method = peers.METHODS["modnorm-dual-unfolded"]
    want = ex.train_one(cfg, data, method.name, 4, 2, 1.0, 0, build=method.build)
    assert got["train_loss"] == want["train_loss"]
    assert us.run(("quadratic", 4, 2, 0, 20, 0))["train_loss"] != want["train_loss"]

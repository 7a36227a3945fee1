"""The head-share probe (``benchmarks/head_share.py``): recording leaves training as it was,
and what it records is what the step did."""

from __future__ import annotations

import pytest
import torch

from benchmarks import head_share as hs
from benchmarks import logit_scale as ls
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim


def test_recording_changes_nothing_and_the_gains_are_the_steps() -> None:
    row = hs.run((16, 0))
    cfg = ex.SweepConfig(steps=200, batch_size=128, input_noise=1.0, depth=2)

    def build(cfg: object, data: object, width: int, depth: int, lr: float, device: str) -> object:
        net = ls.network("nominal", width, depth)
        return net, [mn_optim.Adam(net, lr=lr)]

    data = mn_data.load("digits", input_noise=1.0)
    torch.set_num_threads(1)
    plain = ex.train_one(cfg, data, "modnorm-adam", 16, 2, 0.5, 0, build=build)
    assert row["train_loss"] == plain["train_loss"]  # the probes draw nothing, move nothing
    assert [r["step"] for r in row["records"]] == list(range(10, 201, 10))
    for rec in row["records"]:
        assert len(rec["e"]) == len(rec["gain"]) == len(rec["predicted"]) == 4  # 4 atoms
        # the whole step's gain is positive to first order on its own batch
        assert sum(rec["gain"]) > 0
    # on the fixed batch, an atom's step alone lowers the loss by about what it predicts
    early = row["records"][0]
    for p, low in zip(early["predicted"], early["lowered"], strict=True):
        assert low == pytest.approx(p, rel=0.5)

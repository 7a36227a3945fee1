"""The feature-learning benchmark (``benchmarks/feature_learning.py``): its probe reads the
head's input and leaves training as it was; a heavy head freezes the features."""

from __future__ import annotations

import pytest
import torch

from benchmarks import feature_learning as fl
from benchmarks import logit_scale as ls
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim


@pytest.mark.parametrize("variant", ["head mass 1", fl.TORCH])
def test_features_are_what_the_head_reads(variant: str) -> None:
    torch.manual_seed(0)
    net = fl.network(variant, 24)
    x = torch.randn(7, 64)
    h = fl.features(net, x)
    assert h.shape == (7, 24)
    torch.testing.assert_close(ls.head_of(net)(h), net(x))


def test_probing_changes_nothing_and_a_heavy_head_freezes_the_features() -> None:
    torch.set_num_threads(1)
    row = fl.run(("batch 128", "head mass 1", 16, -1, 0))
    cfg = ex.SweepConfig(steps=200, batch_size=128, input_noise=1.0, depth=2)

    def build(cfg: object, data: object, width: int, depth: int, lr: float, device: str) -> object:
        net = fl.network("head mass 1", width)
        return net, [mn_optim.Adam(net, lr=lr)]

    data = mn_data.load("digits", input_noise=1.0)
    plain = ex.train_one(cfg, data, "modnorm-adam", 16, 2, 0.5, 0, build=build)
    assert row["train_loss"] == plain["train_loss"]
    heavy = fl.run(("batch 128", "head mass 1024", 16, -1, 0))
    # the blocks and input layer get 1/1026 of each step: the features barely move
    assert heavy["features_moved"] < 0.1 * row["features_moved"]


def test_best_is_the_lr_of_lowest_mean_loss() -> None:
    rows = [{"setting": "batch 128", "variant": "head mass 1", "width": 32, "log2_lr": k,
             "seed": s, "train_loss": loss, "features_moved": 1.0}
            for k, s, loss in [(-1, 0, 0.3), (-1, 1, 0.5), (0, 0, 0.35), (0, 1, 0.4)]]  # fmt: skip
    assert {r["log2_lr"] for r in fl.best(rows, "batch 128", "head mass 1", 32)} == {0}
    assert fl.best(rows, "batch 128", "head mass 1", 64) == []

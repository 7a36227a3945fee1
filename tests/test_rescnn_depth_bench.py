"""The ResCNN depth ablation (``benchmarks/rescnn_depth.py``): its unchanged variant is the
benchmark's ResCNN, and each variant changes what its name says."""

from __future__ import annotations

import torch

from benchmarks import rescnn_depth as rd
from modnorm import compounds


def test_the_default_variant_is_the_benchmarks_rescnn() -> None:
    x = torch.randn(5, 1, 8, 8)
    torch.manual_seed(0)
    mine = rd.rescnn(8, 3)
    torch.manual_seed(0)
    theirs = compounds.ResCNN(1, 10, 8, 3)
    assert torch.equal(mine(x), theirs(x))
    assert mine.mass == theirs.mass and mine.sensitivity == theirs.sensitivity


def test_each_variant_changes_one_thing() -> None:
    def weights(net: torch.nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in net.parameters()]

    base = rd.rescnn(8, 2)
    assert weights(rd.rescnn(8, 2, kernel=1)) == [(8, 1, 1, 1), (8, 8, 1, 1), (8, 8, 1, 1), (10, 8)]
    assert weights(rd.rescnn(8, 2, pool=False))[-1] == (10, 8 * 64)
    assert rd.rescnn(8, 2, blocks_mass=1.0).mass < base.mass
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(1)
    a = rd.rescnn(8, 2)
    torch.manual_seed(1)
    b = rd.rescnn(8, 2, dims=(1,))
    assert weights(a) == weights(b) and not torch.allclose(a(x), b(x))


def test_one_run_of_each_kind_trains() -> None:
    for name in ("ResCNN", "ResMLP on the flattened images"):
        r = rd.run((name, 8, 2, 0, 20, 0))
        assert r["seed"] == 0 and not r["diverged"] and r["train_loss"] < 2.3

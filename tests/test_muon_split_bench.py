"""The step-split measurement of `benchmarks/muon_split.py`: it names the ResCNN's parts,
reads a normalized step's split as the shares, and finds masses from their shares."""

from __future__ import annotations

import pytest
import torch

from benchmarks import muon_split as ms
from modnorm import compounds
from modnorm import optim as mn_optim


def test_roles_follow_the_rescnn() -> None:
    net = compounds.ResCNN(1, 10, 4, 3, affine_mass=0.5)
    names = ms.roles([a for a, _ in net.atom_shares()])
    block = ["norm gains", "norm biases", "block convs", "conv biases"]
    assert names == ["stem", "stem bias", *block * 3, "head", "head bias"]


def test_a_normalized_step_splits_as_the_shares() -> None:
    torch.manual_seed(0)
    net = compounds.ResCNN(1, 10, 8, 2, affine_mass=0.25, head_mass=3.0)
    opt = mn_optim.Adam(net, lr=0.1)
    sizes = ms.record(net, [opt])
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(ms.EVERY + 1):  # two recorded steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    shares = [s for _, s in net.atom_shares()]
    assert len(sizes) == 2
    for step in sizes:
        assert step == pytest.approx([0.1 * s for s in shares], rel=1e-3)


def test_closest_masses_recover_masses_on_the_grid() -> None:
    assert ms.closest_masses(ms.shares((8.0, 4.0, 1 / 16))) == (8.0, 4.0, 1 / 16)

"""The 2-block ResCNN's loss-gap ablation (``benchmarks/rescnn_gap.py``): its unchanged
networks are the ones the transfer benchmark trains, and each variant changes one thing."""

from __future__ import annotations

import torch

from benchmarks import rescnn_gap as rg
from modnorm import baselines, compounds


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    return all(torch.equal(p, q) for p, q in pairs) and torch.equal(a(x), b(x))


def test_the_unchanged_networks_are_the_benchmarks() -> None:
    x = torch.randn(5, 1, 8, 8)
    torch.manual_seed(0)
    ours = rg.modnorm_rescnn(16, 3)
    torch.manual_seed(0)
    assert _same(ours, compounds.ResCNN(1, 10, 16, 3), x)
    torch.manual_seed(0)
    ours_plain = rg.torch_rescnn(16, 3, mean=True)  # built by the script, not the baseline
    torch.manual_seed(0)
    theirs = baselines.torch_rescnn(1, 10, 16, 3)
    # the same weights; the mean subtracted after each activation is the only change
    for p, q in zip(ours_plain.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.allclose(ours_plain(x), theirs(x))


def test_the_convex_residual_and_the_plain_one() -> None:
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    assert torch.allclose(rg._Convex(body, 4)(x), 0.75 * x + body(x) / 4)
    torch.manual_seed(0)
    convex, plain = rg.modnorm_rescnn(8, 2), rg.modnorm_rescnn(8, 2, residual="plain")
    plain.load_state_dict(convex.state_dict())
    y = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(convex(y), plain(y))


def test_every_variant_trains_a_few_steps() -> None:
    for name, (_, _, lrs) in rg.VARIANTS.items():
        r = rg.run((name, 8, 2, lrs[len(lrs) // 2], 3, 0))
        assert r["variant"] == name and 0 < r["train_loss"] < 10 and not r["diverged"], name


def test_variant_names_can_be_chosen_on_the_command_line() -> None:
    assert not [n for n in rg.VARIANTS if "," in n]  # --variants splits at commas


def test_both_affine_options_are_the_compounds_affine_mass() -> None:
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(0)
    ours = rg.modnorm_rescnn(8, 2, norm_gain=0.25, norm_bias=0.25, conv_bias=0.25)
    torch.manual_seed(0)
    theirs = compounds.ResCNN(1, 10, 8, 2, affine_mass=0.25)
    with torch.no_grad():  # away from zeros and ones, so that a misplaced atom shows
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    assert torch.allclose(ours(x), theirs(x))
    shares = [(type(a), s) for a, s in ours.atom_shares()]
    assert shares == [(type(a), s) for a, s in theirs.atom_shares()]

"""The 2-block ResCNN's loss-gap ablation (``benchmarks/rescnn_gap.py``): its unchanged
networks are the ones the transfer benchmark trains, and each variant changes one thing."""

from __future__ import annotations

import pytest
import torch

from benchmarks import rescnn_gap as rg
from modnorm import baselines, compounds
from modnorm.atoms import Linear


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


NO_MUON = not hasattr(torch.optim, "Muon")  # the Muon variants need torch.optim.Muon
needs_muon = pytest.mark.skipif(NO_MUON, reason="this torch has no torch.optim.Muon")


def test_every_variant_trains_a_few_steps() -> None:
    for name, (_, _, lrs) in rg.VARIANTS.items():
        if NO_MUON and name.startswith("muon"):
            continue
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


def test_the_unfolded_options_are_the_compounds_unfolded_per_convolution() -> None:
    from modnorm.atoms import Conv2d

    for channels in (1, 3):  # ResCNN(unfolded=True): the blocks' convolutions, not the stem's
        x = torch.randn(3, channels, 8, 8)
        torch.manual_seed(0)
        ours = rg.affine_rescnn(8, 2, unfolded=(False, True), in_channels=channels)
        torch.manual_seed(0)
        theirs = compounds.ResCNN(channels, 10, 8, 2, affine_mass=0.25, unfolded=True)
        assert _same(ours, theirs, x)
    for stem, blocks in [(True, False), (True, True)]:
        net = rg.affine_rescnn(8, 2, unfolded=(stem, blocks))
        convs = [a for a, _ in net.atom_shares() if isinstance(a, Conv2d)]
        assert [c.unfolded for c in convs] == [stem, blocks, blocks]
    for opt in ("modnorm-adam", "modnorm-dual"):  # as their committed rows were made
        net = rg.VARIANTS[f"{opt}: affine_mass 0.25 and unfolded convs"][0](8, 2)
        assert all(c.unfolded for c in net.modules() if isinstance(c, Conv2d))


def _muon_pair(kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A modnorm Conv2d under `_KernelMuon` and a plain convolution holding its effective
    kernel under ``torch.optim.Muon``, five steps on the same losses: both effective kernels."""
    from modnorm.atoms import Conv2d

    torch.manual_seed(0)
    conv, lr = Conv2d(8, 8, kernel), 0.01
    flat = torch.nn.Parameter((conv.scale * conv.weight.detach()).flatten(1).clone())
    ours = rg._KernelMuon([conv], lr)
    theirs = torch.optim.Muon([flat], lr=lr, adjust_lr_fn="match_rms_adamw")
    x = torch.randn(4, 8, 5, 5)
    for _ in range(5):
        target = torch.randn(4, 8, 5, 5)
        ours.zero_grad()
        theirs.zero_grad()
        ((conv(x) - target) ** 2).sum().backward()
        y = torch.nn.functional.conv2d(x, flat.view(conv.weight.shape), padding=kernel // 2)
        ((y - target) ** 2).sum().backward()
        ours.step()
        theirs.step()
    return (conv.scale * conv.weight).detach().flatten(1), flat.detach()


@needs_muon
def test_kernel_muon_is_torch_muon_on_the_effective_kernel() -> None:
    ours, theirs = _muon_pair(1)  # scale 1: the same bfloat16 Newton–Schulz inputs
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours, theirs = _muon_pair(3)  # scale 1/9: equal up to Newton–Schulz's bfloat16 rounding
    assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()
    with pytest.raises(ValueError, match="per_position"):
        rg._KernelMuon([rg.Conv2d(4, 4, 3, unfolded=True)], 0.01, per_position=True)


def test_muon_on_modnorm_splits_as_muon_does() -> None:
    net = compounds.ResCNN(1, 10, 8, 2, affine_mass=0.25)
    adamw, kernel_muon = rg._muon_on_modnorm(net, 0.01)
    convs = [m for m in net.modules() if isinstance(m, rg.Conv2d)]
    assert [id(p) for p in kernel_muon.param_groups[0]["params"]] == [
        id(c.weight) for c in convs[1:]
    ]
    groups = {id(p): g for g in adamw.param_groups for p in g["params"]}
    stem, head = convs[0], next(m for m in net.modules() if isinstance(m, Linear))
    assert stem.in_features == 1  # the input layer, by AdamW
    for atom in (stem, head):  # AdamW's step and decay as on the effective weight scale·W
        assert groups[id(atom.weight)]["lr"] == 0.01 / atom.scale
        assert groups[id(atom.weight)]["weight_decay"] == 0.01 * atom.scale
    assert len(groups) + len(convs) - 1 == len(list(net.parameters()))

"""The logit-scale probe (``benchmarks/logit_scale.py``): its factors are those of the logits,
computed independently here, and its variants change what they say they change."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import logit_scale as ls
from modnorm import compounds
from modnorm import optim as mn_optim


def test_the_factors_multiply_to_the_logits_rms() -> None:
    torch.manual_seed(0)
    net = compounds.ResMLP(64, 10, 48, 2, output_scale=4.0).requires_grad_(False)
    x = torch.randn(200, 64)
    # labels the logits half predict: the best multiplier lies inside the probe's grid
    y = torch.where(torch.rand(200) < 0.5, net(x).argmax(-1), torch.randint(0, 10, (200,)))
    p = ls.probe(net, x, y, 4.0)
    head = ls.head_of(net)
    seen: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
    logits = net(x)
    hook.remove()
    sigma = torch.linalg.svdvals(head.weight)[0]
    z = head.scale * seen["h"] @ head.weight.T  # the head's output, by hand
    rms = lambda t: t.square().mean().sqrt()  # noqa: E731
    assert p["head_norm"] == pytest.approx(float(sigma), rel=1e-6)
    assert p["alignment"] == pytest.approx(float(rms(z) / (sigma * rms(seen["h"]))), rel=1e-5)
    assert 0 < p["alignment"] <= 1
    product = 4.0 * p["head_norm"] * p["alignment"] * p["h_rms"]
    assert product == pytest.approx(float(rms(logits)), rel=1e-5)
    assert p["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    # the best multiplier's loss is the lowest over the grid, and no higher than as is
    assert p["loss_at_best_temperature"] <= p["loss"] + 1e-7
    t = p["best_temperature"]
    assert 2**-2 < t < 2**3
    for other in (t * 2**-0.5, t * 2**0.5, 1.0):
        ce = torch.nn.functional.cross_entropy(other * logits, y)
        assert p["loss_at_best_temperature"] <= float(ce) + 1e-7


def test_alignment_of_a_random_head_on_isotropic_features_is_sqrt_10_over_d() -> None:
    # The reference point the page quotes: √(10/d) for a rank-10 head on random features.
    torch.manual_seed(0)
    for d in (64, 1024):
        net = compounds.ResMLP(d, 10, d, 1).requires_grad_(False)
        head = ls.head_of(net)
        h = torch.randn(4000, d)
        z = head(h)
        a = z.square().mean().sqrt() / (
            torch.linalg.svdvals(head.weight)[0] * h.square().mean().sqrt()
        )
        assert float(a) == pytest.approx(math.sqrt(10 / d), rel=0.05)


def test_the_variants_change_the_head_as_named() -> None:
    torch.manual_seed(0)
    nominal = compounds.ResMLP(64, 10, 32, 2)
    for name, (scale, init, mass, lrs) in ls.VARIANTS.items():
        assert lrs, name
        torch.manual_seed(0)
        net = ls.network(name, 32)
        shares = {id(a): s for a, s in net.atom_shares()}
        # the multiplier, a sensitivity, divides every share by itself
        assert shares[id(ls.head_of(net))] == pytest.approx(mass / (mass + 2) / scale), name
        others = [p for p in net.parameters() if p is not ls.head_of(net).weight]
        same = [p for p in nominal.parameters() if p is not ls.head_of(nominal).weight]
        assert all(torch.equal(a, b) for a, b in zip(others, same, strict=True)), name
        ratio = ls.head_of(net).weight / ls.head_of(nominal).weight
        assert torch.allclose(ratio, torch.full_like(ratio, init)), name


def test_one_run_probes_every_ten_steps() -> None:
    r = ls.run(("logits x4 with head init /4", 16, 0, 0))
    assert [p["step"] for p in r["probes"]] == list(range(0, 201, ls.EVERY))
    assert 0 < r["train_loss"] < 2.3  # below chance (ln 10) after 200 steps
    assert all(math.isclose(p["check"], 1, rel_tol=1e-4) for p in r["probes"])


def test_a_multiplier_on_a_shrunk_head_trains_as_a_heavier_head() -> None:
    # logits × c with the head's initial weights / c, at lr η, takes the same steps as the
    # nominal network with the head's mass m·c (the others' unchanged) at lr
    # η·(M + m(c − 1))/(c·M), M the total mass: each atom moves by the same amount in function
    # space, Adam's direction being invariant to the gradient's scale. Here c = 4, masses
    # 1, 1, 1: lr/2.
    x = torch.randn(64, 64)
    y = torch.randint(0, 10, (64,))
    outs = []
    for name, lr in (("logits x4 with head init /4", 0.2), ("head mass 4", 0.1)):
        assert ls.VARIANTS[name][:3] in ((4.0, 0.25, 1.0), (1.0, 1.0, 4.0))
        torch.manual_seed(0)
        net = ls.network(name, 32).double()
        opt = mn_optim.Adam(net, lr=lr, eps=1e-30)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x.double()), y).backward()
            opt.step()
        outs.append(net(x.double()).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    start = compounds.ResMLP(64, 10, 32, 2).double()(x.double()).detach()
    assert (outs[0] - start).abs().max() > 0.1  # they trained

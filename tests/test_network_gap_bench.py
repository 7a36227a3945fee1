"""The network ablation (``benchmarks/network_gap.py``): its ends are the two ResMLPs the
transfer benchmark trains, and each variant changes what it names."""

from __future__ import annotations

import torch

from benchmarks import network_gap as ng
from modnorm import baselines, compounds


def test_the_default_is_pytorchs_resmlp() -> None:
    torch.manual_seed(0)
    ours = ng.resmlp(48, 3, ng.Net())
    torch.manual_seed(0)
    theirs = baselines.torch_resmlp(64, 10, 48, 3)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 64)
    assert torch.equal(ours(x), theirs(x))


def test_all_six_changes_make_modnorms_resmlp() -> None:
    ours = ng.resmlp(48, 3, ng.MODNORM)
    theirs = compounds.ResMLP(64, 10, 48, 3)
    # the same weights, in the same order (input layer, blocks, head), give the same function
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            a.copy_(b)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_init_and_multipliers_differ_only_in_the_gradients_scale() -> None:
    torch.manual_seed(0)
    init = ng.resmlp(40, 2, ng.Net(init="orthogonal"))
    torch.manual_seed(0)
    mult = ng.resmlp(40, 2, ng.Net(init="multipliers"))
    x = torch.randn(6, 64)
    torch.testing.assert_close(init(x), mult(x))  # the same function at initialization
    init(x).square().sum().backward()
    mult(x).square().sum().backward()
    head_init, head_mult = init[-1], mult[-1]
    assert isinstance(head_init, ng._Linear) and isinstance(head_mult, ng._Linear)
    assert head_init.weight.grad is not None and head_mult.weight.grad is not None
    # y = s·W x: ∂/∂W is s times the gradient with respect to the effective weight s·W
    s = (10 / 40) ** 0.5
    torch.testing.assert_close(head_mult.weight.grad, s * head_init.weight.grad)


def test_every_variant_changes_the_network() -> None:
    x = torch.randn(5, 64)
    torch.manual_seed(0)
    base = ng.resmlp(32, 2, ng.Net())
    nominal = base(x)
    shapes = [p.shape for p in base.parameters()]
    for name, net in ng.VARIANTS.items():
        torch.manual_seed(0)
        model = ng.resmlp(32, 2, net)
        same = torch.equal(model(x), nominal) and [p.shape for p in model.parameters()] == shapes
        assert (name == "torch ResMLP") == same, name


def test_one_run_trains() -> None:
    r = ng.run(("all six: modnorm's ResMLP", 16, 2, -6, 200, 0))
    assert not r["diverged"] and 0 < r["train_loss"] < 2.3  # below chance (ln 10)

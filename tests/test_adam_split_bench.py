"""The step-split measurement (``benchmarks/adam_split.py``) and the masses that copy it
(``benchmarks/split_masses.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import adam_split as sp
from benchmarks import split_masses as sm
from modnorm import baselines, compounds
from modnorm import optim as mn_optim


def test_a_normalized_step_measures_as_lr_times_the_shares() -> None:
    torch.manual_seed(0)
    net = compounds.ResMLP(64, 10, 24, 2, blocks_mass=2.0, head_mass=8.0)
    opt = mn_optim.Adam(net, lr=0.5)
    sizes = sp.split(net, opt, every=2)
    for _ in range(4):
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert len(sizes) == 2  # steps 0 and 2
    want = [0.5 * s for _, s in net.atom_shares()]
    for step in sizes:
        assert step == pytest.approx(want, rel=1e-5)
    assert sp.fractions(sizes) == pytest.approx(sp.shares(2.0, 8.0), rel=1e-5)


def test_torch_layers_are_measured_as_the_modnorm_atom_of_the_same_map() -> None:
    net = baselines.torch_resmlp(64, 10, 48, 2)
    layers = sp.linears(net)
    assert [tuple(m.weight.shape) for m in layers] == [(48, 64), (48, 48), (48, 48), (10, 48)]
    u, v = torch.randn(10, 1, dtype=torch.float64), torch.randn(1, 48, dtype=torch.float64)
    # a rank-one change: spectral norm |u||v|; modnorm's √(10/48)·W computes it with W·√(48/10)
    want = float(u.norm() * v.norm()) * math.sqrt(48 / 10)
    assert sp.atom_norm(layers[-1], u @ v) == pytest.approx(want, rel=1e-9)


def test_the_closest_masses_of_exact_shares_are_those_masses() -> None:
    target = sp.shares(2**1.5, 4.0)
    assert sp.closest_masses(target) == (2**1.5, 4.0)


def test_one_run_of_the_copied_split_trains() -> None:
    r = sm.run(("torch's split at width 1024", 16, 2, -1, sm.STEPS, 0))
    assert not r["diverged"] and 0 < r["train_loss"] < 2.3  # below chance (ln 10)


def test_the_harness_method_takes_the_masses_closest_to_the_split_at_width() -> None:
    from benchmarks import peers
    from modnorm import data as mn_data
    from modnorm import experiments as ex

    data = mn_data.load("digits", input_noise=1.0)
    cfg = ex.SweepConfig(steps=2, batch_size=8, input_noise=1.0, depth=2)
    for width, closest in [(256, (2**1.5, 4.0)), (1024, (2**3.5, 16.0))]:
        model, [opt] = peers.modnorm_adam_split(cfg, data, width, 2, 0.5, "cpu")
        assert isinstance(opt, mn_optim.Adam)
        shares = [s for _, s in model.atom_shares()]  # type: ignore[operator]
        got = [s / sum(shares) for s in shares]
        assert got == pytest.approx(sp.shares(*closest), rel=1e-9)


def test_the_early_boost_scales_the_first_steps_and_leaves_the_schedule() -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    sm.boost(opt, size=4.0, steps=5.0)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda *_: seen.append(opt.param_groups[0]["lr"]))
    for t in range(3):
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - (t + 1) / 10))
    want = [0.1 * (1 - t / 10) * (1 + 4 * math.exp(-t / 5)) for t in range(3)]
    assert seen == pytest.approx(want)


def test_the_projection_keeps_the_features_scale() -> None:
    x = torch.randn(5, 64)
    wide, narrow = sp.Project(256), sp.Project(16)
    # 64 → 256: orthonormal rows scaled by 2, so the RMS over features is kept exactly
    torch.testing.assert_close(wide(x).square().mean(1), x.square().mean(1))
    # 64 → 16: orthonormal columns (each feature a unit direction of the pixels)
    torch.testing.assert_close(narrow.p.T @ narrow.p, torch.eye(16))
    assert torch.equal(sp.Project(256).p, wide.p)  # fixed, whatever the global RNG


def test_the_width_rule_on_256_features_and_its_peers() -> None:
    rule = "width rule" + sm.D256
    assert sm.masses(rule, 512) == pytest.approx((2**0.5, 2.0))
    assert sm.masses("nominal" + sm.D256, 512) == (1.0, 1.0)
    assert sm.masses("torch's split at width 1024" + sm.BOOST, 32) == (2**3.5, 2**4)
    assert not [n for n in sm.GRIDS if "," in n]  # ablate's --variants splits on commas
    for name in (rule, "torch Adam" + sm.D256):
        r = sm.run((name, 16, 2, -6 if name.startswith("torch") else -1, 20, 0))
        assert not r["diverged"] and r["train_loss"] < 2.3

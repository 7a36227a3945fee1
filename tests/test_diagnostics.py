"""What ``diagnostics.py`` promises: the well-normed report measures what it says (checked
against an independent computation), the bounds hold where the theory's assumptions do and the
breaks are flagged where they do not, and the sharpness certificate bounds the measured
curvature of a smooth network's loss."""

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modnorm as mn
from helpers import randn_like_params, rms
from modnorm import cli
from modnorm.diagnostics import (
    loss_constants,
    sharpness_check,
    size,
    well_normed,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # these tensors are tiny: a second thread only adds contention (8 s instead of 0.6 s for
    # the GPT check on a shared 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape)
    return x / x.square().mean(-1, keepdim=True).sqrt()


def test_whole_network_ratio_agrees_with_an_independent_computation() -> None:
    net, x, eta = mn.ResMLP(16, 10, 32, num_blocks=3), unit(32, 16), 1e-3
    step = net.normalize(randn_like_params(net), eta)
    report = well_normed(net, x, step=step, eta=eta)
    # independent: a float64 copy moved by the step, RMS over features, worst example
    ref, moved = copy.deepcopy(net).double(), copy.deepcopy(net).double()
    with torch.no_grad():
        for p, d in zip(moved.parameters(), step, strict=True):
            p.add_(d.double())
        expected = float(rms(moved(x.double()) - ref(x.double())))
    # (the report rescales a given step to modular norm η by its measured norm: ~1e-5 apart)
    assert report.change == pytest.approx(expected, rel=1e-5)
    assert report.ratio == pytest.approx(expected / eta, rel=1e-5)
    assert report.linear == pytest.approx(expected, rel=1e-3)  # second order is tiny here
    # the step saturates every atom, so the atoms' bounds add up to η
    assert sum(r.bound for r in report.rows) == pytest.approx(eta, rel=1e-3)
    assert [r.mass_fraction for r in report.rows] == pytest.approx(
        [1 / 3, 1 / 9, 1 / 9, 1 / 9, 1 / 3]
    )
    # the module itself is untouched
    assert next(net.parameters()).dtype == torch.float32


def test_size_convention() -> None:
    assert size(torch.tensor([[3.0, 4.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(12.5))
    img = torch.zeros(2, 3, 4, 4)
    img[1, :, 2, 3] = 2.0  # one pixel, every channel: RMS over channels 2
    assert size(img) == pytest.approx(2.0)


@pytest.mark.parametrize(("width", "depth"), [(32, 3), (16, 8)])
@pytest.mark.parametrize("kind", ["random", "aligned"])
def test_per_atom_bounds_hold_for_resmlp(width: int, depth: int, kind: str) -> None:
    # "aligned" with rounds=0 is the dual direction of a random functional of the output, as in
    # test_compounds.py; the input sensitivity is checked along the same kind of direction
    net, x = mn.ResMLP(16, 10, width, num_blocks=depth), unit(32, 16)
    report = well_normed(net, x, kind=kind, rounds=0)
    assert report.violations == []
    assert all(r.ratio <= 1.01 for r in report.rows)
    assert report.linear_ratio <= 1.0
    assert report.sensitivity_ratio is not None and report.sensitivity_ratio <= 1.01
    assert "within the bound" in report.table()


def test_power_iteration_finds_larger_changes_and_residual_breaks_are_explained() -> None:
    net, x = mn.ResMLP(16, 10, 16, num_blocks=8), unit(32, 16)
    plain = well_normed(net, x, kind="aligned", rounds=0)
    worst = well_normed(net, x, kind="aligned", rounds=3)
    assert worst.linear > plain.linear
    assert worst.linear_ratio <= 1.0  # the network's bound holds ...
    # ... but single residual atoms move the output up to ~15% beyond their share: the stream
    # has RMS below 1, and the next block's RMSDivide amplifies by 1/rms
    broken = [r for r in worst.rows if r.ratio > 1.01]
    assert broken and max(r.ratio for r in broken) < 1.3
    assert all("." in r.name.split()[0] for r in broken)  # inside residual blocks
    assert any("RMSDivide" in n for n in worst.notes)


def test_gpt_break_is_flagged_not_hidden(tmp_path: Path) -> None:
    gpt = mn.GPT(23, 12, 16, num_heads=4, num_blocks=3)
    report = well_normed(gpt, torch.randint(0, 23, (4, 12)), kind="aligned", rounds=0)
    assert report.linear_ratio > 1.5  # DESIGN's bound fails: documented in docs/notes.md
    assert "network" in report.violations
    embeddings = [r for r in report.rows if "Embedding" in r.name]
    assert len(embeddings) == 2 and all(r.ratio > 2 for r in embeddings)
    assert report.sensitivity_ratio is None  # integer inputs
    text = report.table()
    assert "BREAKS" in text and "RMSDivide" in text
    assert report.plot(tmp_path / "gpt.png").read_bytes()[:8] == PNG


def test_gelu_mlp_input_sensitivity_exceeds_its_typical_nu() -> None:
    net, x = mn.MLP(16, 10, 32, depth=3, activation="gelu"), unit(32, 16)
    report = well_normed(net, x, kind="aligned")
    s = report.sensitivity_ratio
    assert s is not None and s > 1.05
    assert "input sensitivity" in report.violations
    assert any("ScaledGELU" in n for n in report.notes)


def test_gradient_and_given_steps() -> None:
    net, x, y = mn.ResMLP(16, 10, 32, num_blocks=2), unit(32, 16), torch.randint(0, 10, (32,))
    report = well_normed(net, x, kind="gradient", y=y)
    assert report.kind == "gradient" and report.linear_ratio <= 1.0
    with pytest.raises(ValueError, match="needs the targets"):
        well_normed(net, x, kind="gradient")
    # an optimizer's update, rescaled to modular norm η; its atoms keep their proportions
    opt = mn.optim.Adam(net, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    F.cross_entropy(net(x), y).backward()
    opt.step()
    update = [p.detach() - b for p, b in zip(net.parameters(), before, strict=True)]
    given = well_normed(net, x, step=update, eta=1e-3)
    assert given.kind == "given" and given.violations == []
    assert all(r.step == pytest.approx(1e-3, rel=1e-3) for r in given.rows)  # saturated
    with pytest.raises(ValueError, match="unknown step kind"):
        well_normed(net, x, kind="worst")


# ---- sharpness -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_loss_constants_bound_the_first_and_second_derivatives(loss: str) -> None:
    z = 2 * torch.randn(64, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (64,))
    sigma, tau, sigma_local, tau_local = loss_constants(loss, z, y)
    assert sigma_local <= sigma + 1e-12 and tau_local <= tau + 1e-12

    def f(t: torch.Tensor) -> torch.Tensor:
        if loss == "cross_entropy":
            return F.cross_entropy(t, y)
        return F.mse_loss(t, F.one_hot(y, 10).double())

    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(zz), [zz], create_graph=True)

    def curvature(v: torch.Tensor) -> float:  # vᵀ∇²L v by double backward
        (hv,) = torch.autograd.grad(g, [zz], grad_outputs=v, retain_graph=True)
        return float((hv * v).sum())

    for _ in range(5):
        v = torch.randn_like(z)
        assert abs(float((g.detach() * v).sum())) <= sigma_local * size(v) * (1 + 1e-9)
        assert curvature(v) <= tau_local * size(v) ** 2 * (1 + 1e-9)
    # τ_local is attained: each row along its Hessian's top eigenvector, all rows one size
    if loss == "cross_entropy":
        p = torch.softmax(z, -1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        v = torch.linalg.eigh(h)[1][:, :, -1] * math.sqrt(10)  # unit RMS rows
    else:
        v = torch.randn_like(z)
        v = v / v.square().mean(-1, keepdim=True).sqrt()
    assert curvature(v) == pytest.approx(tau_local, rel=1e-9)


@pytest.mark.parametrize(
    ("make", "loss"),
    [
        (lambda: mn.MLP(16, 10, 32, depth=3, activation="gelu"), "cross_entropy"),
        (lambda: mn.ResMLP(16, 10, 32, num_blocks=3, activation="gelu"), "cross_entropy"),
        (lambda: mn.ResMLP(16, 10, 32, num_blocks=3, activation="gelu"), "mse"),
    ],
    ids=["mlp-ce", "resmlp-ce", "resmlp-mse"],
)
def test_sharpness_certificate_bounds_the_measured_curvature(make, loss: str) -> None:  # type: ignore[no-untyped-def]
    net, x, y = make(), unit(32, 16), torch.randint(0, 10, (32,))
    cert = sharpness_check(net, loss, (x, y))
    assert cert.alpha == pytest.approx(net.sharpness[0])
    assert cert.ratio >= 1 and cert.local_ratio >= 1
    # power iteration with the dual map finds far more curvature than random directions
    assert cert.measured > 10 * cert.measured_random
    assert cert.measured_fd == pytest.approx(cert.measured, rel=1e-3)
    assert cert.gauss_newton + cert.output_curvature == pytest.approx(cert.measured, rel=1e-6)
    assert 0 <= cert.gauss_newton <= cert.tau_local * 1.2  # τ·‖JΔ‖², ‖JΔ‖ ≲ 1.1 here
    assert "ratio bound / measured" in cert.table()


@pytest.mark.parametrize(
    ("net", "bond"),
    [(mn.MLP(16, 10, 32, depth=3), "ScaledReLU"), (mn.ResMLP(16, 10, 32, 2), "Abs")],
    ids=["relu", "abs"],
)
def test_non_smooth_networks_are_refused_by_name(net: mn.Module, bond: str) -> None:
    with pytest.raises(ValueError, match=f"{bond} at .* is not smooth"):
        sharpness_check(net, "cross_entropy", (unit(4, 16), torch.randint(0, 10, (4,))))


def test_gpt_has_no_sharpness_constant_to_certify() -> None:
    gpt = mn.GPT(11, 8, 16, 2, 1)
    idx = torch.randint(0, 11, (2, 8))
    with pytest.raises(ValueError, match="no derived sharpness constant"):
        sharpness_check(gpt, "cross_entropy", (idx, idx))


# ---- command line ----------------------------------------------------------------------------


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--model", "resmlp", "--width", "16", "--depth", "2", "--batch-size", "16"]
    assert cli.main([*argv, "--kind", "aligned", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "well_normed.png").read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "network" in out and "verdict" in out
    argv = ["check", "--model", "mlp", "--activation", "gelu", "--width", "16", "--depth", "1"]
    assert cli.main([*argv, "--sharpness", "--unit-inputs", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "input size (max row RMS): 1.000" in out and "ratio bound / measured" in out
    # a ReLU network has no certificate: a clear error after the well-normed table
    argv = ["check", "--model", "mlp", "--width", "16", "--depth", "1", "--sharpness"]
    assert cli.main([*argv, "--out", str(tmp_path / "c")]) == 2
    assert "ScaledReLU" in capsys.readouterr().err

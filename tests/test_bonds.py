import math

import pytest
import torch

import modnorm as mn
from helpers import rms


def unit_rms(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64)
    return x / x.square().mean(-1, keepdim=True).sqrt()


def jvp_ratio(f, x: torch.Tensor, dx: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    _, out = torch.func.jvp(f, (x,), (dx,))
    return float((out.square().mean(-1).sqrt() / dx.square().mean(-1).sqrt()).max())


@pytest.mark.parametrize(
    "bond",
    [mn.Identity(), mn.Abs(), mn.MeanSubtract(), mn.RMSDivide(), mn.LayerNorm()],
    ids=["Identity", "Abs", "MeanSubtract", "RMSDivide", "LayerNorm"],
)
def test_worst_case_sensitivity_bounds(bond: mn.Module) -> None:
    # ν bounds ‖∇ₓf·Δx‖_rms / ‖Δx‖_rms for unit-RMS inputs (mean zero: LayerNorm divides by
    # the RMS after subtracting the mean), in every direction we try
    x = unit_rms(64, 32)
    x = x - x.mean(-1, keepdim=True)
    x = x / x.square().mean(-1, keepdim=True).sqrt()
    for _ in range(5):
        assert jvp_ratio(bond, x, torch.randn_like(x)) <= bond.sensitivity * (1 + 1e-9)
    # including the directions that maximize it: the Jacobian's top singular vector
    jac = torch.autograd.functional.jacobian(bond, x[0])
    assert torch.linalg.matrix_norm(jac, ord=2) <= bond.sensitivity * (1 + 1e-6)


@pytest.mark.parametrize(
    "bond", [mn.ReLU(), mn.GELU(), mn.ScaledReLU()], ids=["ReLU", "GELU", "ScaledReLU"]
)
def test_relu_and_gelu_sensitivity_is_the_typical_gain(bond: mn.Module) -> None:
    # 1/√2 holds on average over Gaussian inputs and directions (half the units pass), not in
    # the worst case: that is the convention of DESIGN and the reference.
    x = torch.randn(4096, 64, dtype=torch.float64)
    ratio = jvp_ratio(bond, x, torch.randn_like(x))
    _, out = torch.func.jvp(bond, (x,), (torch.randn_like(x),))
    mean_ratio = float(out.square().mean().sqrt())  # ‖Δx‖_rms ≈ 1
    assert abs(mean_ratio - bond.sensitivity) < 0.12 * bond.sensitivity
    assert ratio > bond.sensitivity  # the worst example exceeds it: honest about the convention


def test_add_mul_and_scaled_activations() -> None:
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(mn.Add()((x, y)), x + y)
    assert mn.Mul(-2.0).sensitivity == 2.0
    assert torch.equal(mn.Mul(-2.0)(x), -2 * x)
    assert torch.allclose(mn.ScaledReLU()(x), math.sqrt(2) * torch.relu(x))
    assert torch.allclose(mn.ScaledGELU()(x), math.sqrt(2) * torch.nn.functional.gelu(x))
    assert mn.ScaledGELU().sensitivity == pytest.approx(1.0)


def second_difference(f, x: torch.Tensor, d: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return (f(x + eps * d) + f(x - eps * d) - 2 * f(x)) / eps**2


def test_rmsdivide_sharpness_at_unit_rms() -> None:
    gamma = mn.RMSDivide().sharpness[2]  # type: ignore[index]
    x = unit_rms(256, 16)
    worst = 0.0
    for _ in range(10):
        d = unit_rms(256, 16)
        worst = max(worst, float(rms(second_difference(mn.RMSDivide(), x, d))))
    assert worst <= gamma
    assert worst > 0.5  # the bound is not vacuous: the curvature is of order one


@pytest.mark.parametrize("r", [0.25, 0.5])
def test_rmsdivide_declared_input_rms_bounds_gain_and_curvature(r: float) -> None:
    bond = mn.RMSDivide(input_rms=r)
    assert bond.sensitivity == pytest.approx(1 / r)
    x = r * unit_rms(256, 16)  # inputs exactly at the declared RMS
    gain, curve = 0.0, 0.0
    for _ in range(10):
        d = unit_rms(256, 16)
        eps = 1e-4
        jvp = (bond(x + eps * d) - bond(x - eps * d)) / (2 * eps)
        gain = max(gain, float(rms(jvp)))
        curve = max(curve, float(rms(second_difference(bond, x, d))))
    assert 0.5 / r < gain <= bond.sensitivity * 1.001  # the gain is 1/r, above the nominal 1
    assert 0.5 / r**2 < curve <= bond.sharpness[2]  # type: ignore[index]


def test_changing_input_rms_changes_the_shares() -> None:
    net = mn.ResMLP(8, 4, width=16, num_blocks=2)
    before = [s for _, s in net.atom_shares()]
    rms_divides = [m for m in net.modules() if isinstance(m, mn.RMSDivide)]
    rms_divides[0].input_rms = 0.5
    after = [s for _, s in net.atom_shares()]
    assert after[0] < before[0]  # the input layer sits before the now more sensitive bond
    assert net.sensitivity > 1
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_rms must be finite and positive"):
            mn.RMSDivide(input_rms=bad)


def test_gelu_sharpness_grows_like_sqrt_width_and_bounds_the_curvature() -> None:
    for d in (16, 256):
        gelu = mn.ScaledGELU()
        _ = gelu @ mn.Linear(d, d)  # composing tells the bond its feature size
        gamma = gelu.sharpness[2]  # type: ignore[index]
        assert gamma == pytest.approx(math.sqrt(2) * 2 / math.sqrt(2 * math.pi) * math.sqrt(d))
        # the spike direction √d·e₁ at x₁ = 0 nearly attains it
        x = unit_rms(1, d)
        x[0, 0] = 0
        spike = torch.zeros(1, d, dtype=torch.float64)
        spike[0, 0] = math.sqrt(d)
        attained = float(rms(second_difference(gelu, x, spike, eps=1e-4)))
        assert attained <= gamma * (1 + 1e-4)
        assert attained >= 0.99 * gamma
    assert mn.GELU().sharpness is None  # feature size unknown until composed


def test_heads_rotary_and_pooling() -> None:
    x = torch.randn(2, 5, 12)
    h = mn.SplitHeads(3)(x)
    assert h.shape == (2, 3, 5, 4)
    assert torch.equal(mn.MergeHeads(3)(h), x)
    r = mn.Rotary()(h)
    assert torch.allclose(r.norm(dim=-1), h.norm(dim=-1), atol=1e-5)  # a rotation per pair
    assert torch.allclose(r[:, :, 0], h[:, :, 0])  # position 0 is not rotated
    img = torch.randn(2, 4, 6, 6)
    assert torch.allclose(mn.AvgPool()(img)[..., 0, 0], img.mean(dim=(2, 3)), atol=1e-6)
    assert mn.Flatten()(img).shape == (2, 144)
    with pytest.raises(ValueError, match="do not split into 5 heads"):
        mn.SplitHeads(5) @ mn.Linear(4, 12)


def test_split_heads_with_a_head_dim_takes_a_slice_of_whole_heads() -> None:
    # a tensor-parallel rank holds the features of some heads: the same heads come out
    x = torch.randn(2, 5, 12)
    whole = mn.SplitHeads(3, head_dim=4)
    assert torch.equal(whole(x), mn.SplitHeads(3)(x))
    assert torch.equal(whole(x[..., 4:12]), mn.SplitHeads(3)(x)[:, 1:])
    with pytest.raises(ValueError, match="6 features are not whole heads of 4"):
        whole(x[..., :6])
    with pytest.raises(ValueError, match="12 features are not 2 heads of 4"):
        mn.SplitHeads(2, head_dim=4) @ mn.Linear(4, 12)


def test_causal_attention_matches_a_naive_implementation() -> None:
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    out = mn.CausalAttention()((q, k, v))
    scores = q @ k.transpose(-1, -2) / 4  # 1/d_head, not 1/√d_head
    mask = torch.ones(7, 7).triu(1).bool()
    expected = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(mn.Softmax()(scores), torch.softmax(scores, -1))


# ---- CausalAttention's constants, per head: ν = 1 and γ = 1 for inputs whose sizes sum to 1 --


def _attention(x: tuple[torch.Tensor, ...], scale: float | None = None) -> torch.Tensor:
    """An independent causal attention (finite mask: forward-mode AD through -inf is NaN)."""
    q, k, v = x
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2) * (1 / q.shape[-1] if scale is None else scale)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1e9)
    return torch.softmax(s, -1) @ v


def _head_size(t: torch.Tensor) -> torch.Tensor:
    """Worst ``(b, h, t)`` row's RMS over the head dimension (square root last: rows whose
    second derivative vanishes, as position 0's, keep a finite gradient)."""
    return t.square().mean(-1).amax().sqrt()


def _tuple_size(u: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum((_head_size(t) for t in u), torch.zeros((), dtype=torch.float64))


def _at_sizes(raw: tuple[torch.Tensor, ...], sizes: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs whose every row has the given RMS: q, k, v of sizes summing to ``sum(sizes)``."""
    return tuple(
        c * t / t.square().mean(-1, keepdim=True).sqrt() for c, t in zip(sizes, raw, strict=True)
    )


def _second(f, x, u, w):  # type: ignore[no-untyped-def]
    """``∇²f(x)[u, w]``: forward-mode AD of forward-mode AD."""
    return torch.func.jvp(lambda *z: torch.func.jvp(f, z, u)[1], x, w)[1]


def _worst_curvature(sizes: tuple[float, ...], scale: float | None = None, d: int = 8) -> float:
    """The largest ``‖∇²f[u, w]‖ / (‖u‖‖w‖)`` that gradient ascent over the inputs (at the
    given sizes) and both directions finds."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, 5, d)
    leaves = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(9)]
    for t in leaves:
        t.requires_grad_(True)
    opt = torch.optim.Adam(leaves, lr=0.05)
    best = 0.0
    for _ in range(120):
        x = _at_sizes(tuple(leaves[:3]), sizes)
        u, w = tuple(leaves[3:6]), tuple(leaves[6:])
        ratio = _head_size(_second(lambda *z: _attention(z, scale), x, u, w))
        ratio = ratio / (_tuple_size(u) * _tuple_size(w))
        best = max(best, float(ratio.detach()))
        opt.zero_grad()
        (-ratio).backward()
        opt.step()
    return best


def test_causal_attention_declares_unit_sensitivity_and_curvature() -> None:
    att = mn.CausalAttention()
    assert att.sensitivity == 1 and att.sharpness == (0.0, 0.0, 1.0) and att.smooth


@pytest.mark.parametrize(
    "sizes",
    [(1 / 3, 1 / 3, 1 / 3), (0.0, 0.0, 1.0), (0.43, 0.43, 0.14), (0.86, 0.0, 0.14)],
    ids=["thirds", "values", "scores", "queries"],
)
def test_causal_attention_curvature_stays_within_gamma(sizes: tuple[float, ...]) -> None:
    # the derived bound max(‖q‖, ‖k‖, ‖v‖(1 + 2‖q‖‖k‖), 2‖v‖max(‖q‖,‖k‖)²) ≤ 1, against the
    # worst that an ascent over inputs and directions finds
    q, k, v = sizes
    derived = max(q, k, v * (1 + 2 * q * k), 2 * v * max(q, k) ** 2)
    found = _worst_curvature(sizes)
    assert found <= derived * (1 + 1e-9) <= 1 + 1e-9
    assert found > 0.2 * derived  # the ascent finds curvature, so the check can fail


def test_causal_attention_gamma_is_attained_and_needs_the_one_over_d_scaling() -> None:
    # v alone (q = k = 0: uniform weights), values ±e sorted by the keys' step: ∇²f[u, w] = e
    d, t = 8, 4
    e = torch.ones(d, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    zero = torch.zeros(1, 1, t, d, dtype=torch.float64)
    x = (zero, zero, (sign * e).expand(1, 1, t, d))
    u = (e.expand(1, 1, t, d), zero, zero)  # queries move
    w = (zero, (sign * e).expand(1, 1, t, d), zero)  # keys move
    lib = mn.CausalAttention()
    h = 1e-3  # the library's forward, by a mixed central difference

    def f(a: float, b: float) -> torch.Tensor:
        return lib(tuple(xi + a * ui + b * wi for xi, ui, wi in zip(x, u, w, strict=True)))

    second = (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h * h)
    assert float(_head_size(second)) == pytest.approx(1.0, rel=1e-5)
    assert float(_head_size(_second(lambda *z: _attention(z), x, u, w))) == pytest.approx(1.0)
    # 1/√D instead of 1/D: the scores, and the curvature, grow with the head dimension
    assert _worst_curvature((1 / 3, 1 / 3, 1 / 3), scale=1 / 8, d=64) > 1.5


def _directional(x: tuple[torch.Tensor, ...], u: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The library's ``∇f(x)[u]`` by a central difference (its fused kernel has no
    forward-mode derivative)."""
    h, att = 1e-5, mn.CausalAttention()
    plus = att(tuple(xi + h * ui for xi, ui in zip(x, u, strict=True)))
    return (plus - att(tuple(xi - h * ui for xi, ui in zip(x, u, strict=True)))) / (2 * h)


def test_causal_attention_sensitivity_is_one() -> None:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for sizes in [(1 / 3, 1 / 3, 1 / 3), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0)]:
        raw = tuple(torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
        x = _at_sizes(raw, sizes)
        for _ in range(5):
            u = tuple(torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
            out = _directional(x, u)
            worst = max(worst, float(_head_size(out) / _tuple_size(u)))
    assert worst <= 1 + 1e-9
    # attained at position 0, whose output is its own value: Δv alone moves it as much
    x = _at_sizes(tuple(torch.randn(1, 1, 3, 8, dtype=torch.float64) for _ in range(3)), (0.3,) * 3)
    dv = torch.zeros(1, 1, 3, 8, dtype=torch.float64)
    dv[..., 0, :] = 1.0
    zero = torch.zeros_like(dv)
    assert float(_head_size(_directional(x, (zero, zero, dv)))) == pytest.approx(1.0, rel=1e-6)


def test_positions() -> None:
    assert torch.equal(mn.Positions()(torch.zeros(3, 5, dtype=torch.long)), torch.arange(5))
    assert mn.Positions().sensitivity == 0

import math

import pytest
import torch
import torch.nn.functional as F

import modnorm as mn
from helpers import rms


def test_linear_forward_scale_and_orthogonal_init() -> None:
    lin = mn.Linear(20, 50)
    assert lin.weight.shape == (50, 20)
    s = torch.linalg.svdvals(lin.weight)
    assert torch.allclose(s, torch.ones(20), atol=1e-5)
    x = torch.randn(7, 20)
    assert torch.allclose(lin(x), math.sqrt(50 / 20) * x @ lin.weight.T, atol=1e-6)
    # orthogonal init, fan-out ≥ fan-in: the map preserves the RMS norm of every input
    assert torch.allclose(rms(lin(x)[:1]), rms(x[:1]), rtol=1e-5)


def test_initialization_is_seeded_and_reproducible() -> None:
    torch.manual_seed(3)
    a = mn.ResMLP(8, 3, width=16, num_blocks=2)
    torch.manual_seed(3)
    b = mn.ResMLP(8, 3, width=16, num_blocks=2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (33, 33)])
def test_linear_norm_and_dual_against_svd(shape: tuple[int, int]) -> None:
    lin = mn.Linear(shape[1], shape[0])
    g = torch.randn(shape)
    assert abs(lin.atom_norm(g) - torch.linalg.matrix_norm(g, ord=2)) < 1e-3 * g.norm()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    for method in ("newton_schulz", "svd"):
        d = lin.atom_dual(g, method)
        assert torch.linalg.matrix_norm(d - u @ vh, ord=2) < 1e-3
        assert abs((g * d).sum() - s.sum()) / s.sum() < 1e-3  # ⟨G, dual(G)⟩ = nuclear norm


def test_linear_is_well_normed() -> None:
    # ‖√(o/i)·ΔW x‖_rms ≤ ‖ΔW‖₂ ‖x‖_rms and ‖∇ₓf·Δx‖_rms ≤ ‖Δx‖_rms at unit spectral norm
    lin = mn.Linear(30, 80)
    dw = torch.randn(80, 30)
    x = torch.randn(100, 30)
    dy = math.sqrt(80 / 30) * x @ dw.T
    ratio = dy.square().mean(-1).sqrt() / x.square().mean(-1).sqrt()
    assert (ratio <= lin.atom_norm(dw) * (1 + 1e-4)).all()
    assert (lin(x).square().mean(-1) <= x.square().mean(-1) * (1 + 1e-4)).all()


def test_embedding() -> None:
    emb = mn.Embedding(10, 16)
    assert torch.allclose(emb.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    idx = torch.tensor([[1, 2, 3]])
    out = emb(idx)
    assert out.shape == (1, 3, 16)
    assert torch.allclose(rms(out), torch.tensor(1.0), atol=1e-5)  # unit rows → unit RMS
    g = torch.randn(10, 16)
    g[4] = 0
    assert torch.isclose(emb.atom_norm(g), g.norm(dim=1).max())
    d = emb.atom_dual(g)
    assert torch.equal(d[4], torch.zeros(16))
    norms = d.norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones(9), atol=1e-6)
    assert torch.isclose((g * d).sum(), g.norm(dim=1).sum(), rtol=1e-5)  # dual norm: Σ‖row‖
    with pytest.raises(TypeError, match="integer indices"):
        emb(torch.randn(2, 3))


def test_conv2d_forward_norm_dual() -> None:
    conv = mn.Conv2d(4, 6, kernel_size=3)
    for i in range(3):
        for j in range(3):
            s = torch.linalg.svdvals(conv.weight[:, :, i, j])
            assert torch.allclose(s, torch.ones(4), atol=1e-5)
    x = torch.randn(2, 4, 8, 8)
    expected = math.sqrt(6 / 4) / 9 * F.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    g = torch.randn(6, 4, 3, 3)
    per_pos = torch.linalg.matrix_norm(g.permute(2, 3, 0, 1), ord=2)
    assert torch.isclose(conv.atom_norm(g), per_pos.max(), rtol=1e-3)
    d = conv.atom_dual(g)
    for i in range(3):
        for j in range(3):
            u, s, vh = torch.linalg.svd(g[:, :, i, j], full_matrices=False)
            assert torch.allclose(d[:, :, i, j], u @ vh, atol=1e-3)
    assert torch.isclose(conv.atom_norm(d), torch.tensor(1.0), rtol=1e-3)


def test_unfolded_conv2d_is_one_matrix() -> None:
    conv = mn.Conv2d(4, 6, kernel_size=3, unfolded=True)
    s = torch.linalg.svdvals(conv.weight.flatten(1))  # (6, 36): orthogonal rows
    assert torch.allclose(s, torch.ones(6), atol=1e-5)
    x = torch.randn(2, 4, 8, 8)
    expected = math.sqrt(6 / 4) / 3 * F.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    g = torch.randn(6, 4, 3, 3)
    assert torch.isclose(conv.atom_norm(g), torch.linalg.svdvals(g.flatten(1))[0], rtol=1e-3)
    u, _, vh = torch.linalg.svd(g.flatten(1), full_matrices=False)
    d = conv.atom_dual(g)
    assert torch.allclose(d.flatten(1), u @ vh, atol=1e-3)
    assert torch.isclose(conv.atom_norm(d), torch.tensor(1.0), rtol=1e-3)
    with torch.no_grad():
        conv.weight.mul_(3).add_(torch.randn_like(conv.weight))
    conv.project_()
    assert torch.allclose(torch.linalg.svdvals(conv.weight.flatten(1)), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="unfolded must be a bool"):
        mn.Conv2d(4, 6, unfolded=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("unfolded", [False, True])
def test_conv2d_is_well_normed_pixel_by_pixel(unfolded: bool) -> None:
    # the worst case: a unit update aligned with one pixel's patch, every pixel of it equal
    conv = mn.Conv2d(5, 7, kernel_size=3, unfolded=unfolded)
    x = torch.zeros(1, 5, 6, 6)
    x[0, :, 1:4, 1:4] = torch.randn(5, 1, 1)  # a 3 × 3 patch of one vector, centred at (2, 2)
    g = torch.zeros(1, 7, 6, 6)
    g[0, 0, 2, 2] = 1.0
    grad = torch.autograd.grad((conv(x) * g).sum(), conv.weight)[0]
    d = conv.atom_dual(grad)  # the unit update that moves pixel (2, 2) most
    with torch.no_grad():
        dy = conv.scale * F.conv2d(x, d, padding=1)
    pixel_rms = dy.square().mean(1).sqrt()  # RMS over channels, per pixel
    x_rms = x.square().mean(1).sqrt().max()
    assert pixel_rms.max() <= x_rms * (1 + 1e-3)
    assert pixel_rms[0, 2, 2] >= 0.5 * x_rms  # attained up to a constant, so not vacuous


def test_projections() -> None:
    lin, emb, conv = mn.Linear(8, 12), mn.Embedding(5, 7), mn.Conv2d(3, 4)
    with torch.no_grad():
        for m in (lin, emb, conv):
            m.weight.mul_(3).add_(torch.randn_like(m.weight))
            m.project_()
    assert torch.allclose(torch.linalg.svdvals(lin.weight), torch.ones(8), atol=1e-5)
    assert torch.allclose(emb.weight.norm(dim=1), torch.ones(5), atol=1e-5)
    s = torch.linalg.svdvals(conv.weight.permute(2, 3, 0, 1))
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


def test_zero_tensors_stay_zero() -> None:
    for m in (mn.Linear(8, 12), mn.Embedding(5, 7), mn.Conv2d(3, 4), mn.Bias(6), mn.Gain(6)):
        z = torch.zeros_like(m.weight)
        assert m.atom_norm(z) == 0
        assert torch.equal(m.atom_dual(z), z)
        assert torch.equal(m.normalize([z], 1.0)[0], z)
        assert torch.equal(m.dualize([z], 1.0)[0], z)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mn.Linear(0, 3),
        lambda: mn.Linear(3, 2.5),
        lambda: mn.Embedding(-1, 3),
        lambda: mn.Conv2d(3, 4, kernel_size=0),
        lambda: mn.Linear(3, 4, mass=-1.0),
        lambda: mn.Linear(3, 4, mass=float("nan")),
        lambda: mn.Bias(0),
        lambda: mn.Gain(2.5),
    ],
)
def test_bad_atom_arguments(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="must be"):
        make()


def test_atom_state_dict_round_trip() -> None:
    a, b = mn.Linear(4, 5), mn.Linear(4, 5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight)
    assert list(a.state_dict()) == ["weight"]  # the warm-start vector is not state


def test_bias_forward_norm_dual_and_well_normed() -> None:
    bias = mn.Bias(16)
    assert torch.equal(bias.weight, torch.zeros(16))  # starts as the identity
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        bias.weight.normal_()
    assert torch.equal(bias(x), x + bias.weight)
    g = torch.randn(16)
    assert torch.isclose(bias.atom_norm(g), g.norm() / 4)  # RMS: ‖g‖₂/√16
    d = bias.atom_dual(g)
    assert torch.isclose(bias.atom_norm(d), torch.tensor(1.0))
    assert torch.isclose((g * d).sum(), 4 * g.norm())  # dual norm: √d·‖g‖₂
    for _ in range(20):  # no unit-norm direction does better
        t = torch.randn(16)
        assert (g * t).sum() / bias.atom_norm(t) <= (g * d).sum() * (1 + 1e-6)
    # well-normed: the output moves by exactly the bias's norm, the input's change passes as is
    db = torch.randn(16)
    dy = (bias(x) + db) - bias(x)
    assert torch.allclose(dy.square().mean(-1).sqrt(), bias.atom_norm(db).expand(3, 5))
    assert bias.sharpness == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"Bias\(16\) acts on the last dimension"):
        bias(torch.randn(16, 3))


def test_gain_forward_norm_dual_and_well_normed() -> None:
    gain = mn.Gain(16)
    assert torch.equal(gain.weight, torch.ones(16)) and gain.atom_norm(gain.weight) == 1
    x = torch.randn(3, 5, 16)
    assert torch.equal(gain(x), x)
    g = torch.randn(16)
    assert gain.atom_norm(g) == g.abs().max()
    d = gain.atom_dual(g)
    assert gain.atom_norm(d) == 1
    assert torch.isclose((g * d).sum(), g.abs().sum())  # dual norm of ℓ∞: ℓ₁
    for _ in range(20):
        t = torch.randn(16)
        assert (g * t).sum() / gain.atom_norm(t) <= (g * d).sum() * (1 + 1e-6)
    # ‖Δg ⊙ x‖_rms ≤ ‖Δg‖_∞‖x‖_rms, attained by a constant Δg
    dg = torch.randn(16)
    ratio = (dg * x).square().mean(-1).sqrt() / x.square().mean(-1).sqrt()
    assert (ratio <= gain.atom_norm(dg) * (1 + 1e-6)).all()
    const = torch.full((16,), -2.0)
    ratio = (const * x).square().mean(-1).sqrt() / x.square().mean(-1).sqrt()
    assert torch.allclose(ratio, gain.atom_norm(const).expand(3, 5))
    assert gain.sharpness == (0.0, 1.0, 0.0)  # bilinear, as a Linear


def test_vector_atoms_on_the_channels_of_images() -> None:
    # Bias(C, dim=1) is a convolution's bias, Gain(C, dim=1) a per-channel scale; the norms
    # keep their meaning in the RMS over channels and pixels, as the Conv2d's
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    bias, gain = mn.Bias(6, dim=1), mn.Gain(6, dim=1)
    with torch.no_grad():
        bias.weight.copy_(conv.bias)
        gain.weight.normal_()
    x = torch.randn(2, 3, 5, 5)
    plain = torch.nn.functional.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(bias(plain), conv(x), atol=1e-6)
    assert torch.equal(gain(plain), plain * gain.weight[:, None, None])
    y = torch.randn(2, 6, 5, 5)
    db = torch.randn(6)
    moved = (bias(y) + db[:, None, None] - bias(y)).square().mean((1, 2, 3)).sqrt()
    assert torch.allclose(moved, bias.atom_norm(db).expand(2))
    dg = torch.full((6,), 3.0)  # a constant gain attains its norm, max |g|
    ratio = (dg[:, None, None] * y).square().mean((1, 2, 3)) / y.square().mean((1, 2, 3))
    assert torch.allclose(ratio.sqrt(), gain.atom_norm(dg).expand(2))
    assert mn.Bias(6, dim=-3)(y).shape == y.shape  # a negative dim counts from the end
    with pytest.raises(ValueError, match=r"Bias\(6, dim=1\) acts on dimension 1, of size 6"):
        bias(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="acts on dimension 1"):
        bias(torch.randn(6))  # no dimension 1
    with pytest.raises(TypeError, match="dim must be an int"):
        mn.Gain(6, dim=1.0)  # type: ignore[arg-type]
    assert "dim=1" in repr(gain) and "dim" not in repr(mn.Gain(6))


def test_vector_atom_projections() -> None:
    bias, gain = mn.Bias(8), mn.Gain(8)
    with torch.no_grad():
        bias.weight.normal_()
        gain.weight.normal_()
        gain.weight[3] = 0
    sign = torch.sign(gain.weight)
    bias.project_()
    gain.project_()
    assert torch.isclose(bias.weight.square().mean().sqrt(), torch.tensor(1.0))
    assert torch.equal(gain.weight, sign)  # diag(g)'s polar factor; the zero stays zero


def test_bias_gain_layernorm_is_torch_layernorm() -> None:
    gain, bias = mn.Gain(12), mn.Bias(12)
    ln = bias @ gain @ mn.LayerNorm()
    ref = torch.nn.LayerNorm(12, eps=1e-12)
    with torch.no_grad():
        gain.weight.normal_()
        bias.weight.normal_()
        ref.weight.copy_(gain.weight)
        ref.bias.copy_(bias.weight)
    x = 3 * torch.randn(4, 7, 12) + 1
    torch.testing.assert_close(ln(x), ref(x))

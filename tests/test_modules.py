import math

import pytest
import torch

import modnorm as mn
from modnorm.modules import compose_sharpness


def spec(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(t.double(), ord=2)


def test_composition_norm_by_hand() -> None:
    # M = Mul(0.5) ∘ L2 ∘ L1 with masses 1 and 3: ν2 = 0.5 for L1's term.
    l1, l2 = mn.Linear(6, 8, mass=1.0), mn.Linear(8, 5, mass=3.0)
    net = 0.5 * l2 @ l1
    assert net.mass == 4 and net.sensitivity == 0.5
    w1, w2 = torch.randn(8, 6), torch.randn(5, 8)
    # ‖(w1, w2)‖ = max(ν_after(L1)·μ/μ1·‖w1‖, ν_after(L2)·μ/μ2·‖w2‖), ν_after(L2) = 0.5
    expected = max(0.5 * 4 / 1 * spec(w1), 0.5 * 4 / 3 * spec(w2))
    assert torch.isclose(net.norm([w1, w2]).double(), expected, rtol=1e-3)
    # and the DESIGN form for a two-part composition M2 ∘ M1 with M2 = Mul ∘ L2 (ν2 = 0.5)
    assert net.atom_shares() == [(l1, 1 / (4 * 0.5)), (l2, 3 / (4 * 0.5))]


def test_concatenation_norm_by_hand() -> None:
    a, b = mn.Linear(6, 8, mass=2.0), mn.Linear(6, 4, mass=1.0)
    tup = mn.TupleModule(a, b)
    assert tup.mass == 3 and tup.sensitivity == 2
    wa, wb = torch.randn(8, 6), torch.randn(4, 6)
    expected = max(3 / 2 * spec(wa), 3 / 1 * spec(wb))
    assert torch.isclose(tup.norm([wa, wb]).double(), expected, rtol=1e-3)
    y = tup(torch.randn(2, 6))
    assert isinstance(y, tuple) and y[0].shape == (2, 8) and y[1].shape == (2, 4)


def test_nested_tree_by_hand() -> None:
    # net = L3 ∘ Add ∘ (L1, 0.25·L2): shares μ_i/μ through the tuple, divided by what follows
    l1, l2, l3 = mn.Linear(4, 4), mn.Linear(4, 4, mass=2.0), mn.Linear(4, 3)
    net = l3 @ (l1 + 0.25 * l2)
    assert net.mass == 4
    assert net.sensitivity == pytest.approx(1.25)
    shares = dict((id(a), s) for a, s in net.atom_shares())
    nu_tuple = 1.25  # Add ∘ (ν=1, ν=0.25): what follows the tuple is L3 (ν=1)
    assert shares[id(l3)] == pytest.approx(1 / 4)
    # the tuple (mass 3) gets 3/(4·1); inside it L1 gets 1/3, L2 gets 2/3 of that, and L2 is
    # followed by Mul(0.25) inside its branch
    assert shares[id(l1)] == pytest.approx(3 / 4 * 1 / 3)
    assert shares[id(l2)] == pytest.approx(3 / 4 * 2 / 3 / 0.25)
    assert nu_tuple == net.layers[0].sensitivity


def test_parameters_are_in_application_order() -> None:
    l1, l2, l3 = mn.Linear(3, 4), mn.Linear(4, 5), mn.Linear(5, 6)
    net = l3 @ l2 @ l1
    assert [p.shape for p in net.parameters()] == [(4, 3), (5, 4), (6, 5)]
    assert [a for a, _ in net.atom_shares()] == [l1, l2, l3]
    x = torch.randn(2, 3)
    assert torch.allclose(net(x), l3(l2(l1(x))))


def test_algebra_forms() -> None:
    f, g = mn.Linear(5, 5), mn.Linear(5, 5)
    x = torch.randn(3, 5)
    assert torch.allclose((f + g)(x), f(x) + g(x))
    assert torch.allclose((2.0 * f)(x), 2 * f(x))
    assert torch.allclose((f * 3)(x), 3 * f(x))
    assert torch.allclose((f / 4)(x), f(x) / 4)
    h = mn.Add() @ (f, g)
    assert torch.allclose(h(x), f(x) + g(x))
    h2 = (mn.Linear(5, 2), mn.Linear(5, 3)) @ mn.Linear(4, 5)  # tuple on the left
    out = h2(torch.randn(3, 4))
    assert out[0].shape == (3, 2) and out[1].shape == (3, 3)


def test_power_makes_independent_copies() -> None:
    block = mn.ScaledGELU() @ mn.Linear(8, 8)
    net = block**3
    params = list(net.parameters())
    assert len(params) == 3
    assert len({id(p) for p in params}) == 3
    assert not torch.equal(params[0], params[1])
    assert net.mass == 3 and net.sensitivity == 1
    x = torch.randn(2, 8)
    layers = [m for m in net.layers if isinstance(m, mn.Linear)]
    expected = x
    for lin in layers:
        expected = torch.nn.functional.gelu(lin(expected)) * math.sqrt(2)
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_tare_rescales_masses() -> None:
    net = mn.Linear(3, 3, mass=2.0) @ mn.Linear(3, 3, mass=6.0)
    net.tare(1.0)
    assert net.mass == pytest.approx(1.0)
    assert [a.mass for a, _ in net.atom_shares()] == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="mass 0"):
        mn.ReLU().tare(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        net.tare(-1.0)


def test_shape_mismatch_is_caught_at_build_time() -> None:
    with pytest.raises(ValueError) as e:
        mn.Linear(20, 10) @ mn.Linear(8, 30)
    msg = str(e.value)
    assert "Linear(20, 10)" in msg and "Linear(8, 30)" in msg and "20" in msg and "30" in msg
    mn.Linear(10, 20) @ mn.Linear(30, 10)  # builds
    with pytest.raises(ValueError, match="same input"):
        mn.TupleModule(mn.Linear(3, 4), mn.Linear(5, 4))
    with pytest.raises(ValueError, match="feature size"):
        mn.Linear(4, 2) @ (mn.Linear(3, 4) + mn.Linear(3, 5))


def test_tuple_where_single_output_needed() -> None:
    with pytest.raises(ValueError, match="takes a single tensor, got a tuple of 2"):
        mn.Linear(4, 2) @ (mn.Linear(3, 4), mn.Linear(3, 4))
    with pytest.raises(ValueError, match="takes a tuple"):
        mn.Add() @ mn.Linear(3, 4)


@pytest.mark.parametrize("power", [0, -2])
def test_bad_powers(power: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        mn.Linear(3, 3) ** power


def test_non_integer_power_and_bad_operands() -> None:
    with pytest.raises(TypeError, match="integers"):
        mn.Linear(3, 3) ** 1.5
    with pytest.raises(TypeError):
        mn.Linear(3, 3) @ torch.nn.Linear(3, 3)
    with pytest.raises(TypeError):
        mn.Linear(3, 3) * "a"


def test_same_atom_twice_is_rejected() -> None:
    f = mn.Linear(3, 3)
    with pytest.raises(ValueError, match="appears twice"):
        f @ f
    with pytest.raises(ValueError, match="appears twice"):
        f + f


def test_weights_after_zero_sensitivity_are_rejected() -> None:
    with pytest.raises(ValueError, match="sensitivity 0"):
        0 * mn.Linear(3, 3)


def test_tensor_list_validation() -> None:
    net = mn.Linear(4, 3) @ mn.Linear(5, 4)
    good = [torch.randn(4, 5), torch.randn(3, 4)]
    with pytest.raises(ValueError, match="expected 2 tensors"):
        net.normalize(good[:1])
    with pytest.raises(ValueError, match=r"shape \(4, 3\) but Linear\(4, 3\)"):
        net.norm([good[0], torch.randn(4, 3)])
    with pytest.raises(TypeError, match="list of tensors"):
        net.norm(good[0])
    for target in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            net.normalize(good, target)
        with pytest.raises(ValueError, match="positive finite"):
            net.dualize(good, target)
    bad = [good[0], torch.full((3, 4), float("nan"))]
    with pytest.raises(ValueError, match=r"non-finite .* Linear\(4, 3\)"):
        net.normalize(bad)
    with pytest.raises(ValueError, match="non-finite"):
        net.dualize(bad)


def test_zero_update_and_mass_zero_share() -> None:
    net = mn.Linear(4, 3) @ mn.Linear(5, 4, mass=0.0)
    assert [s for _, s in net.atom_shares()] == [0.0, 1.0]
    z = [torch.zeros(4, 5), torch.zeros(3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(net.normalize(z), z, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(net.dualize(z), z, strict=True))
    g = [torch.randn(4, 5), torch.randn(3, 4)]
    out = net.normalize(g, 0.5)
    assert torch.equal(out[0], torch.zeros(4, 5))  # the mass-0 atom does not move
    assert torch.isclose(net.norm(out), torch.tensor(0.5), rtol=1e-4)
    assert torch.equal(net.dualize(g)[0], torch.zeros(4, 5))


def test_sharpness_recursion_by_hand() -> None:
    # GELU ∘ Linear: Linear (0,1,0), μ1 = 1; GELU (0,0,γ), μ2 = 0, ν2 = 1/√2
    lin = mn.Linear(16, 16)
    gelu = mn.GELU()
    net = gelu @ lin
    g = 2 / math.sqrt(2 * math.pi) * math.sqrt(16)
    nu2 = 1 / math.sqrt(2)
    alpha = (nu2 * 0 + g) / nu2**2  # p1 = 1, p2 = 0
    beta = (1 * g + nu2 * 1) / nu2
    gamma = 1 * g + nu2 * 0
    assert net.sharpness == pytest.approx((alpha, beta, gamma))
    # concatenation: α = Σp²α, β = Σpβ, γ = Σγ
    a, b = mn.Linear(16, 16, mass=1.0), mn.Linear(16, 16, mass=3.0)
    t = mn.TupleModule(a, b)
    assert t.sharpness == pytest.approx((0.0, 0.25 + 0.75, 0.0))
    # composition formula against DESIGN with all terms present
    got = compose_sharpness((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 1.0, 3.0, 0.5, 2.0)
    p1, p2 = 0.25, 0.75
    assert got == pytest.approx(
        (
            p1**2 * (2.0 * 1.0 + 6.0) / 4.0 + 2 * p1 * p2 * 5.0 / 2.0 + p2**2 * 4.0,
            p1 * (0.5 * 6.0 + 2.0 * 2.0) / 2.0 + p2 * 0.5 * 5.0,
            0.25 * 6.0 + 2.0 * 3.0,
        )
    )


def test_nonsmooth_modules_have_no_sharpness() -> None:
    net = mn.Linear(4, 4) @ mn.ReLU() @ mn.Linear(4, 4)
    assert not net.smooth and net.sharpness is None
    assert (mn.Linear(4, 4) @ mn.ScaledGELU() @ mn.Linear(4, 4)).smooth


def test_print_shows_mass_and_sensitivity() -> None:
    text = str(mn.ResMLP(8, 3, width=16, num_blocks=2))
    assert "mass=3" in text and "sensitivity=1" in text and "Linear(16, 16, mass=0.5)" in text


def test_state_dict_and_device_moves() -> None:
    net = mn.ResMLP(8, 3, width=16, num_blocks=2)
    other = mn.ResMLP(8, 3, width=16, num_blocks=2)
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(net(x), other(x))
    net64 = net.double()
    assert net64(x.double()).dtype == torch.float64

"""Random module trees built from the algebra: the library's shares, mass and sensitivity
against an independent evaluator that applies DESIGN's two-part rules literally, and the
identities of normalize / dualize on every tree."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modnorm as mn

D = 6  # every node maps D features to D features, so any tree composes

leaf = st.one_of(
    st.tuples(st.just("lin"), st.sampled_from([0.0, 0.5, 1.0, 2.5])),
    st.tuples(st.just("bond"), st.sampled_from(["gelu", "abs", "meansub", "rmsdiv", "id"])),
)


def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.tuples(st.just("comp"), children, children),
        st.tuples(st.just("sum"), children, children),
        st.tuples(st.just("scale"), st.sampled_from([0.25, 0.5, 2.0]), children),
        st.tuples(st.just("pow"), st.integers(1, 3), children),
    )


plans = st.recursive(leaf, extend, max_leaves=8)

BONDS = {
    "gelu": mn.ScaledGELU,
    "abs": mn.Abs,
    "meansub": mn.MeanSubtract,
    "rmsdiv": mn.RMSDivide,
    "id": mn.Identity,
}


def build(plan: Any) -> mn.Module:
    kind = plan[0]
    if kind == "lin":
        return mn.Linear(D, D, mass=plan[1])
    if kind == "bond":
        return BONDS[plan[1]]()
    if kind == "comp":
        return build(plan[1]) @ build(plan[2])
    if kind == "sum":
        return build(plan[1]) + build(plan[2])
    if kind == "scale":
        return plan[1] * build(plan[2])
    return build(plan[2]) ** plan[1]


def reference(plan: Any) -> tuple[float, float, list[float]]:
    """(mass, sensitivity, shares of the atoms in application order) by DESIGN's rules."""
    kind = plan[0]
    if kind == "lin":
        return plan[1], 1.0, [1.0 if plan[1] > 0 else 0.0]
    if kind == "bond":
        return 0.0, 1.0, []
    if kind == "comp":  # outer ∘ inner: inner gets μ1/(μ·ν2), outer μ2/μ
        return compose(reference(plan[2]), reference(plan[1]))
    if kind == "sum":  # Add ∘ (f, g): concatenation, each gets μi/μ; Add has ν = 1
        (m1, n1, s1), (m2, n2, s2) = reference(plan[1]), reference(plan[2])
        mu = m1 + m2
        return mu, n1 + n2, scaled(s1, m1, mu, 1.0) + scaled(s2, m2, mu, 1.0)
    if kind == "scale":
        m, n, s = reference(plan[2])
        return compose((m, n, s), (0.0, plan[1], []))
    part = reference(plan[2])
    acc = part
    for _ in range(plan[1] - 1):
        acc = compose(acc, part)
    return acc


def compose(inner: tuple[float, float, list[float]], outer: tuple[float, float, list[float]]):  # type: ignore[no-untyped-def]
    (m1, n1, s1), (m2, n2, s2) = inner, outer
    mu = m1 + m2
    return mu, n1 * n2, scaled(s1, m1, mu, n2) + scaled(s2, m2, mu, 1.0)


def scaled(shares: list[float], m: float, mu: float, nu_after: float) -> list[float]:
    if m == 0 or mu == 0:
        return [0.0] * len(shares)
    return [s * m / (mu * nu_after) for s in shares]


@settings(max_examples=150, deadline=None)
@given(plan=plans, target=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_random_trees(plan: Any, target: float, seed: int) -> None:
    torch.manual_seed(seed)
    net = build(plan)
    mass, nu, shares = reference(plan)
    assert abs(net.mass - mass) <= 1e-9 * max(1.0, mass)
    assert abs(net.sensitivity - nu) <= 1e-9 * max(1.0, nu)
    got = [s for _, s in net.atom_shares()]
    assert len(got) == len(shares) == len(list(net.parameters()))
    for a, b in zip(got, shares, strict=True):
        assert abs(a - b) <= 1e-9 * max(1.0, b)

    x = torch.randn(3, D)
    assert net(x).shape == (3, D)
    if not shares:
        return
    g = [torch.randn_like(p) for p in net.parameters()]
    u = net.normalize(g, target)
    d = net.dualize(g, target)
    if mass == 0:
        assert net.norm(u) == 0 and all(torch.count_nonzero(t) == 0 for t in u)
        return
    for out in (u, d):
        assert abs(float(net.norm(out)) - target) <= 1e-3 * target
        for (atom, share), t in zip(net.atom_shares(), out, strict=True):
            if share > 0:  # saturation: every atom sits on the max
                assert abs(float(atom.atom_norm(t)) / share - target) <= 1e-3 * target
            else:
                assert torch.count_nonzero(t) == 0
    # ⟨G, dualize(G)⟩ ≥ ⟨G, T⟩ for a competitor T of the same modular norm
    inner = sum(float((a * b).sum()) for a, b in zip(g, d, strict=True))
    assert inner >= sum(float((a * b).sum()) for a, b in zip(g, u, strict=True)) - 1e-4 * inner
    assert net.smooth == ("abs" not in repr(plan))

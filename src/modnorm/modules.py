"""The module algebra: mass, sensitivity, sharpness and the modular norm.

A module is a ``torch.nn.Module`` that also knows

* its **mass** ``μ`` (its share of feature learning inside a larger module),
* its **sensitivity** ``ν`` (how much its output can move when its input moves),
* its **sharpness** ``(α, β, γ)`` (bounds on its second derivatives), when it is smooth.

Atoms (``atoms.py``) hold weights and declare a local norm, dual map and projection; bonds
(``bonds.py``) hold none. Composition ``g @ f`` and concatenation ``(f, g)`` build the rest, and
every operation on weight-shaped tensors (``norm``, ``normalize``, ``dualize``, ``project_``)
is one walk: `Module.atom_shares` says which fraction of a target each atom receives.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from modnorm import distributed as _distributed

Sharpness = tuple[float, float, float]
# Feature size of each tensor a module takes or returns (None: any size); a spec that is
# None altogether means "any number of tensors", for a partial composition such as
# `Attention @ Mul(1/3)` that has not yet been given its tuple.
Spec = tuple[int | None, ...] | None

# bumped whenever a mass or a declared sensitivity changes: invalidates share caches
_mass_version = itertools.count()
_current_mass_version = [0]


def _bump_mass_version() -> None:
    _current_mass_version[0] = next(_mass_version) + 1


class Module(nn.Module):
    """Base class: a ``torch.nn.Module`` with a mass, a sensitivity and a modular norm."""

    n_inputs: int | None = 1  # how many tensors ``forward`` takes (None: a tuple of any length)

    def __init__(self) -> None:
        super().__init__()
        self._shares_cache: tuple[int, list[tuple[Atom, float]]] | None = None

    # ---- what every module declares -----------------------------------------------------
    @property
    def mass(self) -> float:
        """Total mass ``μ``: the sum of the masses of the atoms inside."""
        raise NotImplementedError

    @property
    def sensitivity(self) -> float:
        """Sensitivity ``ν``: ``‖∇ₓf·Δx‖ ≤ ν‖Δx‖`` for unit-size inputs."""
        raise NotImplementedError

    @property
    def smooth(self) -> bool:
        """Whether the module is twice differentiable (no ReLU or Abs inside)."""
        return True

    @property
    def sharpness(self) -> Sharpness | None:
        """``(α, β, γ)``: second-derivative bounds in the modular norm; ``None`` if unknown."""
        raise NotImplementedError

    @property
    def in_spec(self) -> Spec:
        """Feature sizes of the inputs (``None``: any)."""
        return None if self.n_inputs is None else (None,) * self.n_inputs

    def out_spec(self, spec: Spec) -> Spec:
        """Feature sizes of the outputs for inputs of feature sizes ``spec``.

        Raises ``ValueError`` when ``spec`` cannot be this module's input.
        """
        self._check_arity(spec)
        return spec

    def _check_arity(self, spec: Spec) -> None:
        if spec is None:
            return
        if self.n_inputs is None:
            if len(spec) < 2:
                raise ValueError(f"{self._name()} takes a tuple of tensors, got a single tensor")
        elif len(spec) != self.n_inputs:
            got = "a single tensor" if len(spec) == 1 else f"a tuple of {len(spec)} tensors"
            want = "a single tensor" if self.n_inputs == 1 else f"a tuple of {self.n_inputs}"
            raise ValueError(f"{self._name()} takes {want}, got {got}")

    def _name(self) -> str:
        return self._get_name()

    # ---- the one tree walk ----------------------------------------------------------------
    def atom_shares(self) -> list[tuple[Atom, float]]:
        """Each atom with the fraction of a target norm it receives, in parameter order.

        ``‖w‖_M = max_i ‖w_i‖_i / share_i`` over atoms of positive share, and normalizing to
        ``η`` gives atom ``i`` the norm ``η·share_i``: the shares saturate the max.
        """
        version = _current_mass_version[0]
        if self._shares_cache is None or self._shares_cache[0] != version:
            self._shares_cache = (version, list(self._shares(1.0)))
        return self._shares_cache[1]

    def _shares(self, target: float) -> list[tuple[Atom, float]]:
        raise NotImplementedError

    def _split(self, tensors: Sequence[Tensor]) -> list[tuple[Atom, float, Tensor]]:
        shares = self.atom_shares()
        if isinstance(tensors, Tensor):
            raise TypeError("expected a list of tensors shaped like the parameters, got one tensor")
        tensors = list(tensors)
        if len(tensors) != len(shares):
            raise ValueError(
                f"expected {len(shares)} tensors (one per parameter of {self._name()}), "
                f"got {len(tensors)}"
            )
        out = []
        for i, ((atom, share), t) in enumerate(zip(shares, tensors, strict=True)):
            if not isinstance(t, Tensor):
                raise TypeError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
            if t.shape != atom.weight.shape:
                raise ValueError(
                    f"tensor {i} has shape {tuple(t.shape)} but {atom._name()} has a weight "
                    f"of shape {tuple(atom.weight.shape)}"
                )
            out.append((atom, share, t))
        # One host sync for the whole list: a sum is finite iff every entry is (barring
        # overflow of huge finite values, which would make the norm infinite anyway).
        device = out[0][2].device if out else None
        sums = [t.sum().float().to(device) for _, _, t in out]
        if out and not bool(torch.stack(sums).isfinite().all()):
            bad = next(i for i, (_, _, t) in enumerate(out) if not torch.isfinite(t).all())
            raise ValueError(f"non-finite values in tensor {bad}, for {out[bad][0]._name()}")
        return out

    # ---- operations on tensors shaped like the parameters ---------------------------------
    @torch.no_grad()
    def norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """Modular norm ``max_i ‖t_i‖_i / share_i`` of tensors shaped like the parameters."""
        if _distributed.any_sharded(tensors):  # FSDP2: each atom's norm computed on one rank
            return _distributed.norm(self, tensors)
        split = self._split(tensors)
        norms = _atom_norms(split)
        terms = [
            n.float().to(norms[0].device) / share
            for (_, share, _), n in zip(split, norms, strict=True)
            if share > 0
        ]
        return torch.stack(terms).max().cpu() if terms else torch.zeros(())

    @torch.no_grad()
    def normalize(self, tensors: Sequence[Tensor], target: float = 1.0) -> list[Tensor]:
        """Rescale each atom's tensor to norm ``target·share``: the result has modular norm
        ``target``, with every atom saturating the max. Zero stays zero."""
        target = _check_target(target)
        if _distributed.any_sharded(tensors):
            return _distributed.normalize(self, tensors, target)
        split = self._split(tensors)
        out = []
        for (_, share, t), n in zip(split, _atom_norms(split), strict=True):
            # scale in float32 (a bf16 scale would be off by up to 0.4 %), no host sync
            scale = torch.where(n > 0, (target * share) / n.float().clamp_min(1e-30), 0.0)
            out.append((t.float() * scale).to(t.dtype) if t.dtype != torch.float64 else t * scale)
        return out

    @torch.no_grad()
    def dualize(
        self,
        tensors: Sequence[Tensor],
        target: float = 1.0,
        method: str = "newton_schulz",
        precision: str = "full",
    ) -> list[Tensor]:
        """Steepest direction ``argmax_{‖T‖_M ≤ target} ⟨G, T⟩`` for a gradient ``G``: each
        atom's dual map (e.g. ``UVᵀ`` for a matrix) scaled to ``target·share``. ``method``
        orthogonalizes matrices by ``"newton_schulz"`` (in ``precision`` ``"full"`` or
        ``"mixed"``) or ``"svd"``: see `modnorm.linalg.orthogonalize`."""
        target = _check_target(target)
        if _distributed.any_sharded(tensors):  # each matrix orthogonalized by one rank
            return _distributed.dualize(self, tensors, target, method, precision)
        split = self._split(tensors)
        out = []
        for (_, share, t), d in zip(split, _atom_duals(split, method, precision), strict=True):
            out.append(d * (target * share) if share > 0 else torch.zeros_like(t))
        return out

    def dual_norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """Dual norm ``⟨G, dualize(G)⟩ = Σ_i share_i·‖G_i‖_i^*`` of a gradient ``G``."""
        if _distributed.any_sharded(tensors):
            tensors = _distributed.gather(tensors)
        total = torch.zeros((), dtype=torch.float64)
        for (_, _, t), d in zip(self._split(tensors), self.dualize(tensors), strict=True):
            total += (t.double() * d.double()).sum().cpu()
        return total

    @torch.no_grad()
    def project_(self) -> Module:
        """Send every atom's weights back to their natural set (e.g. orthogonal), in place."""
        for atom, _ in self.atom_shares():
            atom.project_()
        return self

    def tare(self, mass: float = 1.0) -> Module:
        """Rescale the masses of all atoms inside so that this module's mass is ``mass``."""
        if not math.isfinite(mass) or mass < 0:
            raise ValueError(f"mass must be finite and non-negative, got {mass}")
        total = self.mass
        if total == 0:
            raise ValueError(f"cannot tare {self._name()}: it has mass 0 (no weights with mass)")
        for atom, _ in self.atom_shares():
            atom.mass = atom.mass * mass / total
        return self

    # ---- the algebra ------------------------------------------------------------------------
    def __matmul__(self, other: Any) -> Module:
        return Compose(_as_module(other), self)

    def __rmatmul__(self, other: Any) -> Module:
        return Compose(self, _as_module(other))

    def __add__(self, other: Any) -> Module:
        from modnorm.bonds import Add

        return Compose(TupleModule(self, _as_module(other)), Add())

    def __radd__(self, other: Any) -> Module:
        from modnorm.bonds import Add

        return Compose(TupleModule(_as_module(other), self), Add())

    def __mul__(self, a: Any) -> Module:
        from modnorm.bonds import Mul

        if not isinstance(a, (int, float)) or isinstance(a, bool):
            raise TypeError(f"a module can be multiplied by a number, not by {type(a).__name__}")
        return Compose(self, Mul(float(a)))

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> Module:
        if not isinstance(a, (int, float)) or a == 0:
            raise ValueError(f"a module can be divided by a non-zero number, not by {a!r}")
        return self * (1.0 / a)

    def __pow__(self, n: Any) -> Module:
        """``f ** L``: ``L`` independent copies of ``f`` composed, each with fresh weights."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"module powers must be integers, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"module powers must be at least 1, got {n}")
        copies: list[Module] = [self]
        for _ in range(n - 1):
            c = copy.deepcopy(self)
            for atom, _ in c.atom_shares():
                atom.reset_parameters()
            copies.append(c)
        return Compose(*copies)

    def extra_repr(self) -> str:
        sharp = self.sharpness
        sharp_s = "None" if sharp is None else "(" + ", ".join(_fmt(x) for x in sharp) + ")"
        return f"mass={_fmt(self.mass)}, sensitivity={_fmt(self.sensitivity)}, sharpness={sharp_s}"


def _by_family(split: list[tuple[Atom, float, Tensor]]) -> dict[type[Atom], list[int]]:
    """Indices of the atoms that compute their norms and duals together (same class)."""
    groups: dict[type[Atom], list[int]] = {}
    for i, (atom, _, _) in enumerate(split):
        groups.setdefault(type(atom).batch_family(), []).append(i)
    return groups


def _atom_norms(split: list[tuple[Atom, float, Tensor]]) -> list[Tensor]:
    out: list[Tensor] = [torch.zeros(())] * len(split)
    for family, idx in _by_family(split).items():
        norms = family.atom_norms([split[i][0] for i in idx], [split[i][2] for i in idx])
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return out


def _atom_duals(
    split: list[tuple[Atom, float, Tensor]], method: str, precision: str
) -> list[Tensor]:
    out: list[Tensor] = [torch.zeros(())] * len(split)
    for family, idx in _by_family(split).items():
        keep = [i for i in idx if split[i][1] > 0]  # mass 0: no dual map needed
        atoms, tensors = [split[i][0] for i in keep], [split[i][2] for i in keep]
        duals = family.atom_duals(atoms, tensors, method, precision)
        for i, d in zip(keep, duals, strict=True):
            out[i] = d
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _check_target(target: float) -> float:
    if not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"target norm must be a positive finite number, got {target!r}")
    return float(target)


def _as_module(x: Any) -> Module:
    if isinstance(x, Module):
        return x
    if isinstance(x, tuple):
        return TupleModule(*x)
    raise TypeError(f"cannot combine a modnorm module with a {type(x).__name__}")


class Atom(Module):
    """A module with one weight tensor and a norm of its own; mass 1 unless told otherwise.

    Subclasses define ``forward``, ``reset_parameters``, ``atom_norm``, ``atom_dual`` and
    ``project_``. Sensitivity 1 and sharpness ``(0, 1, 0)`` (bilinear in weight and input).
    """

    weight: nn.Parameter
    in_features: int | None
    out_features: int
    # Whether the optimizers' weight decay shrinks this atom (``False`` for `Bias` and `Gain`).
    decays: ClassVar[bool] = True

    def __init__(self, mass: float = 1.0) -> None:
        super().__init__()
        if not isinstance(mass, (int, float)) or not math.isfinite(mass) or mass < 0:
            raise ValueError(f"mass must be finite and non-negative, got {mass!r}")
        self._mass = float(mass)

    @property
    def mass(self) -> float:
        return self._mass

    @mass.setter
    def mass(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"mass must be finite and non-negative, got {value}")
        self._mass = float(value)
        _bump_mass_version()

    @property
    def sensitivity(self) -> float:
        return 1.0

    @property
    def sharpness(self) -> Sharpness | None:
        return (0.0, 1.0, 0.0)

    @property
    def in_spec(self) -> Spec:
        return (self.in_features,)

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is None:
            return (self.out_features,)
        if spec[0] is not None and self.in_features is not None and spec[0] != self.in_features:
            raise ValueError(
                f"{self._name()} expects {self.in_features} input features, "
                f"but its input has {spec[0]}"
            )
        return (self.out_features,)

    def _shares(self, target: float) -> list[tuple[Atom, float]]:
        return [(self, target if self.mass > 0 else 0.0)]  # mass 0: the atom does not learn

    def reset_parameters(self) -> None:
        raise NotImplementedError

    @classmethod
    def batch_family(cls) -> type[Atom]:
        """The class whose ``atom_norms``/``atom_duals`` handle this atom with others."""
        return cls

    @classmethod
    def atom_norms(cls, atoms: list[Atom], tensors: list[Tensor]) -> list[Tensor]:
        """Norms of several atoms' tensors at once (override to batch the work)."""
        return [a.atom_norm(t) for a, t in zip(atoms, tensors, strict=True)]

    @classmethod
    def atom_duals(
        cls, atoms: list[Atom], tensors: list[Tensor], method: str, precision: str = "full"
    ) -> list[Tensor]:
        """Dual maps of several atoms' tensors at once (override to batch the work)."""
        return [a.atom_dual(t, method, precision) for a, t in zip(atoms, tensors, strict=True)]

    def atom_norm(self, t: Tensor) -> Tensor:
        """This atom's norm of a weight-shaped tensor."""
        raise NotImplementedError

    def atom_dual(
        self, g: Tensor, method: str = "newton_schulz", precision: str = "full"
    ) -> Tensor:
        """Unit-norm ``argmax_{‖T‖ ≤ 1} ⟨g, T⟩``; zero for ``g = 0``."""
        raise NotImplementedError

    def project_(self) -> Atom:
        raise NotImplementedError

    def _name(self) -> str:
        return f"{self._get_name()}({self.in_features}, {self.out_features})"

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mass={_fmt(self.mass)}"


class Bond(Module):
    """A module without weights: mass 0. Subclasses set ``sensitivity`` and ``sharpness``."""

    @property
    def mass(self) -> float:
        return 0.0

    @property
    def sensitivity(self) -> float:
        return 1.0

    @property
    def sharpness(self) -> Sharpness | None:
        return (0.0, 0.0, 0.0) if self.smooth else None

    def _shares(self, target: float) -> list[tuple[Atom, float]]:
        return []

    def extra_repr(self) -> str:
        return f"sensitivity={_fmt(self.sensitivity)}"


def compose_sharpness(
    inner: Sharpness, outer: Sharpness, mu1: float, mu2: float, nu1: float, nu2: float
) -> Sharpness:
    """Sharpness of ``outer ∘ inner`` from its parts (DESIGN §1, chain rule)."""
    a1, b1, g1 = inner
    a2, b2, g2 = outer
    mu = mu1 + mu2
    p1, p2 = (mu1 / mu, mu2 / mu) if mu > 0 else (0.0, 0.0)
    if p1 == 0:  # the inner weights are fixed: only the outer weights and the input move
        alpha, beta = p2 * p2 * a2, p2 * nu1 * b2
    else:
        alpha = p1 * p1 * (nu2 * a1 + g2) / nu2**2 + 2 * p1 * p2 * b2 / nu2 + p2 * p2 * a2
        beta = p1 * (nu1 * g2 + nu2 * b1) / nu2 + p2 * nu1 * b2
    gamma = nu1 * nu1 * g2 + nu2 * g1
    return (alpha, beta, gamma)


class Compose(Module):
    """``Compose(f1, f2, ..., fn)``, written ``fn @ ... @ f1``: ``f1`` is applied first.

    ``μ = Σμ_i``, ``ν = Πν_i``; child ``i`` receives the share ``μ_i / (μ·Π_{j>i} ν_j)`` of a
    target (for two children: ``μ1/(μ·ν2)`` and ``μ2/μ``, as in DESIGN §1).
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        flat: list[Module] = []
        for m in modules:
            m = _as_module(m)
            flat.extend(m.layers if isinstance(m, Compose) else [m])  # associativity
        if len(flat) < 1:
            raise ValueError("Compose needs at least one module")
        for i, m in enumerate(flat):
            self.add_module(str(i), m)
        _check_distinct_atoms(self)
        spec = flat[0].in_spec
        for prev, m in zip([None, *flat[:-1]], flat, strict=True):
            try:
                spec = m.out_spec(spec)
            except ValueError as e:
                where = f"{m._name()} @ {prev._name()}" if prev is not None else m._name()
                raise ValueError(f"cannot compose {where}: {e}") from None
        self._out = spec
        nu_after = 1.0
        for m in reversed(flat):
            if nu_after == 0 and m.mass > 0:
                raise ValueError(
                    f"{m._name()} has weights but everything after it has sensitivity 0: its "
                    "weights cannot change the output"
                )
            nu_after *= m.sensitivity

    @property
    def layers(self) -> list[Module]:
        """The modules in the order they are applied."""
        return list(self._modules.values())  # type: ignore[arg-type]

    @property
    def n_inputs(self) -> int | None:  # type: ignore[override]
        return self.layers[0].n_inputs

    @property
    def in_spec(self) -> Spec:
        return self.layers[0].in_spec

    def out_spec(self, spec: Spec) -> Spec:
        for m in self.layers:
            spec = m.out_spec(spec)
        return spec

    @property
    def mass(self) -> float:
        return sum(m.mass for m in self.layers)

    @property
    def sensitivity(self) -> float:
        return math.prod(m.sensitivity for m in self.layers)

    @property
    def smooth(self) -> bool:
        return all(m.smooth for m in self.layers)

    @property
    def sharpness(self) -> Sharpness | None:
        first = self.layers[0]
        acc, mu, nu = first.sharpness, first.mass, first.sensitivity
        for m in self.layers[1:]:
            s = m.sharpness
            if acc is None or s is None:
                return None
            acc = compose_sharpness(acc, s, mu, m.mass, nu, m.sensitivity)
            mu, nu = mu + m.mass, nu * m.sensitivity
        return acc

    def _shares(self, target: float) -> list[tuple[Atom, float]]:
        mu = self.mass
        if mu == 0:
            return [(a, 0.0) for m in self.layers for a, _ in m._shares(1.0)]
        out: list[list[tuple[Atom, float]]] = []
        nu_after = 1.0
        for m in reversed(self.layers):
            child = target * m.mass / (mu * nu_after) if m.mass > 0 else 0.0
            out.append(m._shares(child) if child > 0 else [(a, 0.0) for a, _ in m._shares(1.0)])
            nu_after *= m.sensitivity
        return [x for part in reversed(out) for x in part]

    def forward(self, x: Any) -> Any:
        for m in self.layers:
            x = m(x)
        return x


class TupleModule(Module):
    """Concatenation ``(f1, ..., fn)``: the same input to each, a tuple of outputs.

    ``μ = Σμ_i``, ``ν = Σν_i`` (outputs measured by the sum of norms); child ``i`` receives the
    share ``μ_i/μ`` of a target.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        if len(modules) < 2:
            raise ValueError(f"a tuple of modules needs at least 2 members, got {len(modules)}")
        for i, m in enumerate(modules):
            self.add_module(str(i), _as_module(m))
        _check_distinct_atoms(self)
        ins = [s for s in (m.in_spec for m in self.members) if s is not None]
        self._in: Spec = None
        if ins:
            if any(len(s) != len(ins[0]) for s in ins):
                raise ValueError("members of a tuple must take the same number of inputs")
            spec: list[int | None] = []
            for i in range(len(ins[0])):
                known: set[int] = {x for s in ins if (x := s[i]) is not None}
                if len(known) > 1:
                    raise ValueError(
                        f"members of a tuple must take the same input, but they expect "
                        f"{sorted(known)} features: " + ", ".join(m._name() for m in self.members)
                    )
                spec.append(known.pop() if known else None)
            self._in = tuple(spec)

    @property
    def members(self) -> list[Module]:
        """The modules that each see the input, in order."""
        return list(self._modules.values())  # type: ignore[arg-type]

    @property
    def n_inputs(self) -> int | None:  # type: ignore[override]
        return self.members[0].n_inputs

    @property
    def in_spec(self) -> Spec:
        return self._in

    def out_spec(self, spec: Spec) -> Spec:
        outs: list[int | None] = []
        for m in self.members:
            o = m.out_spec(spec)
            if o is None or len(o) != 1:
                raise ValueError(f"members of a tuple must return one tensor each: {m._name()}")
            outs.append(o[0])
        return tuple(outs)

    @property
    def mass(self) -> float:
        return sum(m.mass for m in self.members)

    @property
    def sensitivity(self) -> float:
        return sum(m.sensitivity for m in self.members)

    @property
    def smooth(self) -> bool:
        return all(m.smooth for m in self.members)

    @property
    def sharpness(self) -> Sharpness | None:
        parts = [m.sharpness for m in self.members]
        if any(s is None for s in parts):
            return None
        mu = self.mass
        p = [m.mass / mu if mu > 0 else 0.0 for m in self.members]
        return (
            sum(pi * pi * s[0] for pi, s in zip(p, parts, strict=True) if s is not None),
            sum(pi * s[1] for pi, s in zip(p, parts, strict=True) if s is not None),
            sum(s[2] for s in parts if s is not None),
        )

    def _shares(self, target: float) -> list[tuple[Atom, float]]:
        mu = self.mass
        out: list[tuple[Atom, float]] = []
        for m in self.members:
            child = target * m.mass / mu if m.mass > 0 else 0.0
            out.extend(m._shares(child) if child > 0 else [(a, 0.0) for a, _ in m._shares(1.0)])
        return out

    def forward(self, x: Any) -> tuple[Any, ...]:
        return tuple(m(x) for m in self.members)


def _all_atoms(module: nn.Module) -> list[Atom]:
    """Every atom below ``module``, repeats included (``nn.Module.modules()`` drops repeats)."""
    if isinstance(module, Atom):
        return [module]
    return [a for child in module._modules.values() if child is not None for a in _all_atoms(child)]


def _check_distinct_atoms(module: Module) -> None:
    seen: set[int] = set()
    for a in _all_atoms(module):
        if id(a) in seen:
            raise ValueError(
                f"{a._name()} appears twice in one network: the modular norm needs independent "
                "weights (use `f ** n` or copy.deepcopy for copies)"
            )
        seen.add(id(a))

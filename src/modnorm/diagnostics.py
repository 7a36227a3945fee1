"""Diagnostics and certificates: does a real forward pass obey the modular norm's promises?

* `well_normed` moves the weights by a step of modular norm ``η`` (random, aligned with
  the worst output functional, or a loss gradient) and reports, per atom and for the whole
  network, how far the output moved against the bound the theory gives, plus the
  input-sensitivity ratio against ``ν`` — the modular analogue of μP's "coordinate check".
* `sharpness_check` certifies the curvature of a loss in the modular norm: the bound
  ``σ·α + τ`` from the module's sharpness and the loss's constants, against the largest
  curvature found by Hessian-vector products along random and power-iterated directions.
* `alignment` logs the same ratio for the update an optimizer actually applies during
  training (near 1: aligned with the inputs), against random steps of the same norm.
* `coordinate_check` is μP's coordinate check across width or depth: activation RMS and
  per-step change at comparable layers, modnorm against standard PyTorch with Adam
  (these two measure the module being trained, not a copy).
* `stable_step` turns the certificate into the descent lemma's largest stable step.
* `calibrate_` declares on each RMSDivide the input RMS it sees (ν = 1/rms), where a
  residual stream has shrunk below unit RMS and the nominal ν = 1 breaks the bound.

**Size of an output (or input) tensor.** The RMS over the feature dimension, worst row:
``‖y‖ = max_r ‖y_r‖₂/√d`` where the rows ``r`` are every index but the features — the last
dimension of a ``(B, d)`` or ``(B, T, d)`` tensor, the channel dimension of a ``(B, C, H, W)``
image batch (each pixel is a row: a Conv2d is well-normed pixel by pixel). A 1-D tensor is one
row. This is the norm the atoms' bounds hold in (DESIGN §1), taken over the batch by the worst
example or token, so a bound proved "for every unit input" is tested on the worst one.

The well-normed, alignment and sharpness measurements run in float64 on a copy of the
module; ``well_normed``, ``sharpness_check`` and ``stable_step`` leave the module unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modnorm.bonds import GELU, CausalAttention, ReLU, RMSDivide
from modnorm.modules import Atom, Bond, Module

# GELU's largest slope, max_x d/dx[xΦ(x)] ≈ 1.129 (at x ≈ 0.75): with ν = gain/√2, the worst
# case exceeds the declared ν by 1.129·√2 = 1.60; for ReLU it is √2 (every unit active).
_GELU_MAX_SLOPE = 1.1289
_STEP_KINDS = ("random", "aligned", "gradient")
_LOSSES = ("cross_entropy", "mse")


# ---- the output norm ----------------------------------------------------------------------


def rows(t: Tensor) -> Tensor:
    """``t`` as a ``(rows, features)`` matrix: features are the last dimension, or the
    channels of a ``(B, C, H, W)`` batch; a 1-D tensor is one row."""
    if t.ndim == 4:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    if t.ndim <= 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


def size(t: Tensor) -> float:
    """``max_r ‖t_r‖_rms``: the RMS over features of the worst row (see the module docstring)."""
    return float(rows(t).double().square().mean(-1).sqrt().max())


def _worst_row_functional(u: Tensor) -> Tensor:
    """A subgradient ``φ`` of ``size`` at ``u``: ``⟨φ, u⟩ = size(u)``, supported on the worst
    row (the dual of a max of RMS norms puts all its weight on the largest one)."""
    r = rows(u)
    norms = r.square().mean(-1).sqrt()
    b = int(norms.argmax())
    phi = torch.zeros_like(r)
    if norms[b] > 0:
        phi[b] = r[b] / (norms[b] * r.shape[-1])
    return _unrows(phi, u)


def _unrows(r: Tensor, like: Tensor) -> Tensor:
    if like.ndim == 4:
        b, c, h, w = like.shape
        return r.reshape(b, h, w, c).movedim(-1, 1)
    return r.reshape(like.shape)


def _normalize_rows(g: Tensor, target: float) -> Tensor:
    """Steepest input step of size ``target`` for a gradient ``g``: each row scaled to RMS
    ``target`` (the dual map of the worst-row RMS norm, which is ``Σ_r √d·‖g_r‖₂``)."""
    r = rows(g)
    n = r.square().mean(-1, keepdim=True).sqrt()
    return _unrows(torch.where(n > 0, r * (target / n.clamp_min(1e-300)), 0.0), g)


# ---- functional evaluation of a copy --------------------------------------------------------


class _Probe:
    """A float64 copy of a module with its parameters as a list, to evaluate ``f(x; w + Δ)``,
    linearizations (``torch.func.jvp``) and vector–Jacobian products."""

    def __init__(self, module: Module, x: Tensor) -> None:
        self.net: Module = copy.deepcopy(module).double()
        self.net.eval()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.params = [p.detach() for p in self.net.parameters()]
        self.x = x.detach().double() if x.is_floating_point() else x.detach()
        self.out = self(self.params)

    def __call__(self, params: Sequence[Tensor], x: Tensor | None = None) -> Tensor:
        with _math_attention():
            out = torch.func.functional_call(
                self.net, dict(zip(self.names, params, strict=True)), (self.x if x is None else x,)
            )
        if not isinstance(out, Tensor):
            raise TypeError("diagnostics need a module that returns one tensor")
        return out

    def input(self, x: Tensor) -> Tensor:
        """Another input, converted as the probe's own (float64 unless it holds indices)."""
        return x.detach().double() if x.is_floating_point() else x.detach()

    def moved(self, delta: Sequence[Tensor], x: Tensor | None = None) -> Tensor:
        """``f(x; w + Δ) − f(x; w)``, at the probe's input or at ``x`` (see `input`)."""
        with torch.no_grad():
            base = self.out if x is None else self(self.params, x)
            return self([p + d for p, d in zip(self.params, delta, strict=True)], x) - base

    def linear(self, delta: Sequence[Tensor], x: Tensor | None = None) -> Tensor:
        """``∇_w f · Δ`` by forward-mode AD, or by a central difference where an operation
        has no forward derivative."""
        try:
            with _math_attention():
                result = torch.func.jvp(lambda *ps: self(ps, x), tuple(self.params), tuple(delta))
            return result[1]
        except (NotImplementedError, RuntimeError):
            return _central(lambda s: self.moved([s * d for d in delta], x))

    def pullback(self, phi: Tensor) -> list[Tensor]:
        """``∇_w ⟨φ, f(x; w)⟩``: the gradient of a linear functional of the output."""
        params = [p.clone().requires_grad_(True) for p in self.params]
        out = self(params)
        return list(torch.autograd.grad((out * phi).sum(), params))

    def input_pullback(self, phi: Tensor) -> Tensor:
        x = self.x.clone().requires_grad_(True)
        with torch.enable_grad():
            out = self(self.params, x)
            (g,) = torch.autograd.grad((out * phi).sum(), [x])
        return g


def _central(f: Callable[[float], Tensor], s: float = 1e-3) -> Tensor:
    """``(f(s) − f(−s)) / 2s`` for a map that is 0 at 0: the derivative to ``O(s²)``."""
    return (f(s) - f(-s)) / (2 * s)


class _math_attention:  # noqa: N801 - used as a context manager
    """Attention by the math backend, whose ops all have forward and double derivatives."""

    def __enter__(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._ctx = sdpa_kernel([SDPBackend.MATH])
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _param_names(module: nn.Module) -> list[str]:
    return [n.removesuffix(".weight") for n, _ in module.named_parameters()]


def _atom_label(path: str, atom: Atom) -> str:
    return f"{path} {atom._name()}"


# ---- well-normedness -----------------------------------------------------------------------


@dataclass
class AtomRow:
    """One atom moved alone by its part ``Δ_i`` of the step.

    ``bound = (μ_i/μ)·‖Δ_i‖_i/share_i``: unrolling the walk, composition ``M2∘M1`` gives
    ``‖Δf‖ ≤ ν2‖Δf1‖ + ‖Δf2‖`` and concatenation ``‖Δf‖ ≤ Σ‖Δf_k‖``, each child ``k`` holding
    ``μ_k/μ`` of the modular norm; so the atom's term is ``μ_i/μ`` times its size in the
    modular norm, ``‖Δ_i‖_i/share_i`` (``= η`` when the step saturates every atom).
    """

    name: str
    share: float  # fraction of a target norm the atom receives (``atom_shares``)
    mass_fraction: float  # μ_i / μ
    step: float  # ‖Δ_i‖_i / share_i: this atom's part of the step in the modular norm
    change: float  # ‖f(x; w + Δ_i) − f(x; w)‖
    linear: float  # ‖∇_{w_i} f · Δ_i‖
    bound: float  # (μ_i/μ)·step

    @property
    def ratio(self) -> float:
        """First-order ratio ``linear / bound`` (≤ 1 where the theory's assumptions hold)."""
        return self.linear / self.bound if self.bound > 0 else math.nan


@dataclass
class WellNormedReport:
    """What `well_normed` measured. Sizes are absolute (same units as ``eta``)."""

    kind: str
    eta: float
    rows: list[AtomRow]
    change: float  # ‖f(x; w + Δ) − f(x; w)‖ for the whole step
    linear: float  # ‖∇_w f · Δ‖
    sensitivity: float  # the module's declared ν
    input_size: float | None  # max row RMS of the inputs (None: integer inputs)
    input_step: float | None  # ‖Δx‖ of the input perturbation
    input_change: float | None  # ‖f(x + Δx) − f(x)‖
    input_linear: float | None  # ‖∇_x f · Δx‖
    notes: list[str] = field(default_factory=list)
    tol: float = 0.01

    @property
    def ratio(self) -> float:
        """``‖f(w + Δ) − f(w)‖ / η``: at most 1 (plus second-order terms) for a well-normed
        module."""
        return self.change / self.eta

    @property
    def linear_ratio(self) -> float:
        return self.linear / self.eta

    @property
    def sensitivity_ratio(self) -> float | None:
        """``‖f(x + Δx) − f(x)‖ / (ν·‖Δx‖)``: at most 1 if ``ν`` bounds the input gain."""
        if self.input_change is None or not self.input_step or self.sensitivity == 0:
            return None
        return self.input_change / (self.sensitivity * self.input_step)

    @property
    def alignment(self) -> float:
        """``‖J Δ‖ / Σ_i ‖J_i Δ_i‖``: 1 when the atoms' output changes add up in one
        direction (the worst case the bound is built for), small when they cancel."""
        total = sum(r.linear for r in self.rows)
        return self.linear / total if total > 0 else math.nan

    @property
    def violations(self) -> list[str]:
        """Names of the rows whose first-order ratio exceeds ``1 + tol``."""
        bad = [r.name for r in self.rows if r.ratio > 1 + self.tol]
        if self.linear_ratio > 1 + self.tol:
            bad.append("network")
        s = self.sensitivity_ratio
        if s is not None and s > 1 + self.tol:
            bad.append("input sensitivity")
        return bad

    def table(self) -> str:
        """A plain-text table: one row per atom, then the network and the input."""
        name_w = max([len(r.name) for r in self.rows] + [20])
        e = self.eta
        head = f"{'atom':<{name_w}}  μ_i/μ   step/η  change/η  linear/η  bound/η  ratio"
        lines = [
            f"well-normed check: {self.kind} step of modular norm η = {e:.3g} "
            "(float64; sizes: RMS over features, worst row)",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            flag = "  BREAKS" if r.ratio > 1 + self.tol else ""
            ratio = f"{r.ratio:5.2f}" if r.bound > 0 else "    —"  # this atom did not move
            lines.append(
                f"{r.name:<{name_w}}  {r.mass_fraction:5.3f}  {r.step / e:6.3f}  "
                f"{r.change / e:8.4f}  {r.linear / e:8.4f}  {r.bound / e:7.4f}  {ratio}{flag}"
            )
        flag = "  BREAKS" if self.linear_ratio > 1 + self.tol else ""
        lines.append("-" * len(head))
        lines.append(
            f"{'network':<{name_w}}  {1:5.3f}  {1:6.3f}  {self.ratio:8.4f}  "
            f"{self.linear_ratio:8.4f}  {1:7.4f}  {self.linear_ratio:5.2f}{flag}"
        )
        lines.append(
            f"alignment ‖JΔ‖/Σ‖J_iΔ_i‖ = {self.alignment:.3f}; "
            f"second-order part (change − linear)/η = {(self.change - self.linear) / e:+.2e}"
        )
        s = self.sensitivity_ratio
        if s is not None and self.input_change is not None and self.input_step:
            flag = "  BREAKS" if s > 1 + self.tol else ""
            lines.append(
                f"input sensitivity: ‖Δf‖/‖Δx‖ = {self.input_change / self.input_step:.4f} "
                f"against ν = {self.sensitivity:.4g}: ratio {s:.2f}{flag}"
            )
        if self.input_size is not None:
            lines.append(f"input size (max row RMS): {self.input_size:.3f}")
        bad = self.violations
        lines.append(
            "verdict: within the bound"
            if not bad
            else f"verdict: the bound BREAKS at {len(bad)} row(s): " + ", ".join(bad)
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Bar figure: per atom (and the network) the measured first-order output change
        against its bound, both in units of ``η``; red bars break the bound."""
        from modnorm.plots import _pyplot, save_figure

        plt = _pyplot()
        names = [r.name for r in self.rows] + ["network"]
        measured = [r.linear / self.eta for r in self.rows] + [self.linear_ratio]
        bounds = [r.bound / self.eta for r in self.rows] + [1.0]
        broken = [m > (1 + self.tol) * b for m, b in zip(measured, bounds, strict=True)]
        x = range(len(names))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2))
        ax.bar([i - 0.2 for i in x], bounds, 0.4, color="0.75", label="bound (μ_i/μ)·step")
        ax.bar(
            [i + 0.2 for i in x],
            measured,
            0.4,
            color=["tab:red" if b else "tab:blue" for b in broken],
            label="measured ‖J_iΔ_i‖ (red: breaks)",
        )
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("output change / η")
        ax.set_title(
            f"well-normed check, {self.kind} step: network ratio {self.linear_ratio:.2f}",
            fontsize=10,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def _loss(name: str, out: Tensor, y: Tensor) -> Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if name == "mse":
        return F.mse_loss(out, _mse_target(out, y))
    raise ValueError(f"unknown loss {name!r}: use one of {list(_LOSSES)}")


def _mse_target(out: Tensor, y: Tensor) -> Tensor:
    """Float targets as they are; integer class labels as one-hot vectors."""
    if y.is_floating_point():
        if y.shape != out.shape:
            raise ValueError(
                f"mse targets of shape {tuple(y.shape)} for outputs {tuple(out.shape)}"
            )
        return y.to(out.dtype)
    return F.one_hot(y, out.shape[-1]).to(out.dtype)


def _steepest_step(probe: _Probe, module: Module, phi: Tensor, eta: float) -> list[Tensor]:
    return module.dualize(probe.pullback(phi), eta, method="svd")


def well_normed(
    module: Module,
    x: Tensor,
    step: Sequence[Tensor] | None = None,
    eta: float = 1e-3,
    kind: str = "random",
    *,
    rounds: int = 3,
    y: Tensor | None = None,
    loss: str = "cross_entropy",
    tol: float = 0.01,
    generator: torch.Generator | None = None,
) -> WellNormedReport:
    """Move the weights by a step ``Δ`` of modular norm ``η`` and compare output changes with
    the bounds of the modular norm: ``‖∇_w f·Δ‖ ≤ ‖Δ‖_M`` for the network, ``(μ_i/μ)·η`` for
    atom ``i`` moved alone (see `AtomRow`), ``‖∇_x f·Δx‖ ≤ ν‖Δx‖`` for the input.

    The step: ``step`` if given (e.g. an optimizer's update), rescaled to modular norm ``η``;
    otherwise by ``kind``:

    * ``"random"``: ``normalize(randn, η)``;
    * ``"aligned"``: ``dualize(∇_w⟨φ, f⟩, η)`` for a random functional ``φ`` of the output,
      then ``rounds`` rounds of power iteration ``φ ← ∂‖JΔ‖``, ``Δ ← dualize(Jᵀφ, η)`` (``φ``
      picks the worst row), which climb towards the worst direction; the largest is kept;
    * ``"gradient"``: ``normalize(∇_w loss(f(x), y), η)``, a normalized-SGD step.

    The input step is random (``"random"``) or power-iterated the same way, of size ``η``.
    Ratios above ``1 + tol`` are flagged; ``notes`` names the assumptions that fail here
    (inputs above unit RMS, an RMSDivide fed below unit RMS, activations whose ν is a
    typical and not a worst-case gain).
    """
    if kind not in _STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}: use one of {list(_STEP_KINDS)}")
    if not (isinstance(eta, (int, float)) and eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive number, got {eta!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = _Probe(module, x)
    net = probe.net
    out = probe.out

    if step is not None:
        step = [s.detach().double() for s in step]
        n = float(net.norm(step))
        if n == 0:
            raise ValueError("the step is zero: nothing to measure")
        delta = [s * (eta / n) for s in step]
    elif kind == "random":
        delta = net.normalize([_randn(p, gen) for p in probe.params], eta)
    elif kind == "gradient":
        if y is None:
            raise ValueError('kind="gradient" needs the targets y')
        params = [p.clone().requires_grad_(True) for p in probe.params]
        grads = torch.autograd.grad(_loss(loss, probe(params), y), params)
        delta = net.normalize(list(grads), eta)
    else:
        delta = _steepest_step(probe, net, _randn(out, gen), eta)
        best = size(probe.linear(delta))
        for _ in range(rounds):
            cand = _steepest_step(probe, net, _worst_row_functional(probe.linear(delta)), eta)
            c = size(probe.linear(cand))
            if c <= best * (1 + 1e-9):
                break
            delta, best = cand, c

    total_mass = net.mass
    zeros = [torch.zeros_like(p) for p in probe.params]
    atom_rows = []
    for i, ((atom, share), path) in enumerate(
        zip(net.atom_shares(), _param_names(net), strict=True)
    ):
        if share == 0:
            continue
        alone = list(zeros)
        alone[i] = delta[i]
        step_i = float(atom.atom_norm(delta[i])) / share
        frac = atom.mass / total_mass
        atom_rows.append(
            AtomRow(
                name=_atom_label(path, atom),
                share=share,
                mass_fraction=frac,
                step=step_i,
                change=size(probe.moved(alone)),
                linear=size(probe.linear(alone)),
                bound=frac * step_i,
            )
        )

    input_size = input_step = input_change = input_linear = None
    if probe.x.is_floating_point():
        input_size = size(probe.x)
        dx = _input_step(probe, kind if step is None else "random", eta, rounds, gen)
        input_step = size(dx)
        with torch.no_grad():
            input_change = size(probe(probe.params, probe.x + dx) - out)
        input_linear = size(_central(lambda s: probe(probe.params, probe.x + s * dx) - out))

    return WellNormedReport(
        kind=("given" if step is not None else kind)
        + (f" ({rounds} power rounds)" if kind == "aligned" and step is None else ""),
        eta=float(eta),
        rows=atom_rows,
        change=size(probe.moved(delta)),
        linear=size(probe.linear(delta)),
        sensitivity=net.sensitivity,
        input_size=input_size,
        input_step=input_step,
        input_change=input_change,
        input_linear=input_linear,
        notes=_assumption_notes(probe, tol),
        tol=tol,
    )


def _randn(like: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=gen, dtype=torch.float64)


def _input_step(probe: _Probe, kind: str, eta: float, rounds: int, gen: torch.Generator) -> Tensor:
    """An input perturbation of size ``η``: random, or power-iterated towards the worst."""
    x, out = probe.x, probe.out
    if kind != "aligned":
        return _normalize_rows(_randn(x, gen), eta)
    dx = _normalize_rows(probe.input_pullback(_randn(out, gen)), eta)

    def linear(d: Tensor) -> Tensor:
        return _central(lambda s: probe(probe.params, x + s * d) - out)

    best = size(linear(dx))
    for _ in range(rounds):
        u = linear(dx)
        cand = _normalize_rows(probe.input_pullback(_worst_row_functional(u)), eta)
        c = size(linear(cand))
        if c <= best * (1 + 1e-9):
            break
        dx, best = cand, c
    return dx


def _assumption_notes(probe: _Probe, tol: float) -> list[str]:
    """The assumptions of the bounds that this forward pass does not meet."""
    notes = []
    if probe.x.is_floating_point():
        s = size(probe.x)
        if s > 1 + tol:
            notes.append(
                f"inputs have RMS up to {s:.3g} (worst row): atoms are well-normed for unit "
                "inputs, so an atom fed the input directly can move the output that much more"
            )

    def forward() -> Tensor:
        return probe(probe.params)

    low = _rms_divide_inputs(probe.net, forward)
    # a declared input RMS makes ν = 1/input_rms: below it, the gain exceeds the declared ν
    shrunk = {p: r / m.input_rms for p, (m, r) in low.items() if r < m.input_rms * (1 - tol)}
    if shrunk:
        worst = min(shrunk, key=shrunk.__getitem__)
        notes.append(
            f"{len(shrunk)} of {len(low)} RMSDivide bonds see inputs below the RMS they declare "
            f"(down to {shrunk[worst]:.3g} of it at {worst}): there they amplify changes up to "
            f"{1 / shrunk[worst]:.3g}× their ν (a residual stream, or an embedding sum "
            "½·tok + ½·pos, has RMS below 1; `calibrate_` declares the measured RMS)"
        )
    big = {p: r for p, (_, r) in _attention_inputs(probe.net, forward).items() if r > 1 + tol}
    if big:
        worst = max(big, key=big.__getitem__)
        notes.append(
            f"{len(big)} CausalAttention bond(s) see queries, keys and values of sizes summing "
            f"to {big[worst]:.3g} (at {worst}; per head, worst row): their ν = 1 and γ = 1 hold "
            "for sizes summing to at most 1; at size s, ν can reach s²/4 and γ grows like s³"
        )
    acts: dict[str, int] = {}
    for _, m in probe.net.named_modules():
        if isinstance(m, (GELU, ReLU)):
            acts[type(m).__name__] = acts.get(type(m).__name__, 0) + 1
    for name, count in acts.items():
        excess = _GELU_MAX_SLOPE * math.sqrt(2) if "GELU" in name else math.sqrt(2)
        notes.append(
            f"{count} {name} bond(s): ν is the typical gain on Gaussian inputs, not a bound; the "
            f"worst-case slope is {excess:.2f}×ν, so aligned steps may exceed the bound"
        )
    return notes


def _bond_inputs(
    net: nn.Module,
    kind: type[Bond],
    measure: Callable[[Any, Any], float],
    keep: Callable[[float, float], float],
    forward: Callable[[], Any],
) -> dict[str, tuple[Any, float]]:
    """Each bond of type ``kind`` in ``net`` (by path) with ``measure(bond, its input)``,
    combined by ``keep`` over its calls during ``forward()``."""
    seen: dict[str, tuple[Any, float]] = {}
    hooks = []
    for path, m in net.named_modules():
        if isinstance(m, kind):

            def hook(mod: Any, inp: tuple[Any, ...], _out: Any, path: str = path) -> None:
                value = measure(mod, inp[0])
                seen[path] = (mod, keep(value, seen[path][1]) if path in seen else value)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rms_divide_inputs(
    net: nn.Module, forward: Callable[[], Any]
) -> dict[str, tuple[RMSDivide, float]]:
    """Each RMSDivide of ``net`` (by path) with the smallest row RMS it sees during
    ``forward()``."""

    def smallest_rms(mod: RMSDivide, x: Tensor) -> float:
        return float(x.detach().square().mean(dim=mod.dim).sqrt().min())

    return _bond_inputs(net, RMSDivide, smallest_rms, min, forward)


def _attention_inputs(
    net: nn.Module, forward: Callable[[], Any]
) -> dict[str, tuple[CausalAttention, float]]:
    """Each CausalAttention of ``net`` (by path) with the largest ``‖q‖ + ‖k‖ + ‖v‖`` it sees
    (each the worst row's RMS over a head's features, as its constants are stated)."""

    def tuple_size(_mod: CausalAttention, qkv: tuple[Tensor, ...]) -> float:
        # (B, H, T, D): a row per (b, h, t), not `rows`' image layout
        return sum(float(t.detach().double().square().mean(-1).max().sqrt()) for t in qkv)

    return _bond_inputs(net, CausalAttention, tuple_size, max, forward)


def calibrate_(module: Module, x: Tensor) -> dict[str, float]:
    """Declare, on each RMSDivide (and LayerNorm) of ``module``, the smallest input RMS it sees
    on the batch ``x``, capped at 1: its ν becomes ``1/rms``. A residual stream
    ``(1−1/L)·x + (1/L)·block(x)`` shrinks below unit RMS, where an RMSDivide amplifies
    changes by more than its nominal ν = 1 and aligned updates break the well-normed bound
    (docs/diagnostics.md). The forward pass is unchanged (RMSDivide is scale-invariant); the
    atoms before a calibrated RMSDivide get smaller shares of each update. Returns each
    RMSDivide's path with the ``input_rms`` set. In place, like ``project_``. Part of the
    architecture, not of ``state_dict``: to resume, calibrate the freshly built model on the
    same batch (or build it with ``RMSDivide(input_rms=…)``) before loading the weights."""
    if not isinstance(module, Module):
        raise TypeError(f"calibrate_ needs a modnorm Module, got {type(module).__name__}")
    low = _rms_divide_inputs(module, lambda: module(x))
    if not low:
        raise ValueError(f"{module._name()} has no RMSDivide to calibrate")
    set_to: dict[str, float] = {}
    for path, (m, r) in low.items():
        m.input_rms = set_to[path] = min(1.0, max(r, 1e-6))
    return set_to


# ---- sharpness certificate -------------------------------------------------------------------


@dataclass
class SharpnessCertificate:
    """A curvature bound for ``L(w) = loss(f(x; w), y)`` in the modular norm, and a check.

    ``bound = σ·α + τ`` bounds ``|Δ·∇²L·Δ| / ‖Δ‖_M²``; ``measured`` is the largest value found
    (Hessian-vector products, float64); ``ratio = bound / measured`` must be ≥ 1 and says how
    loose the bound is. ``local_bound`` uses the loss's constants at this batch's outputs.
    ``gauss_newton`` and ``output_curvature`` split the measured value along the best direction
    into ``(JΔ)ᵀ∇²loss(JΔ)`` (bounded by ``τ``) and ``⟨∇loss, Δ·∇²f·Δ⟩`` (bounded by ``σ·α``).
    ``notes`` names the assumptions behind ``α`` that this batch does not meet.
    """

    loss: str
    alpha: float
    beta: float
    gamma: float
    sigma: float
    tau: float
    sigma_local: float
    tau_local: float
    measured: float
    measured_random: float
    measured_fd: float
    gauss_newton: float
    output_curvature: float
    directions: int
    notes: list[str] = field(default_factory=list)

    @property
    def bound(self) -> float:
        return self.sigma * self.alpha + self.tau

    @property
    def local_bound(self) -> float:
        return self.sigma_local * self.alpha + self.tau_local

    @property
    def ratio(self) -> float:
        return self.bound / self.measured if self.measured > 0 else math.inf

    @property
    def local_ratio(self) -> float:
        return self.local_bound / self.measured if self.measured > 0 else math.inf

    def table(self) -> str:
        return "\n".join(
            [
                f"sharpness certificate ({self.loss}), in the modular norm:",
                f"  module (α, β, γ)            = ({self.alpha:.4g}, {self.beta:.4g}, "
                f"{self.gamma:.4g})",
                f"  loss σ (Lipschitz), τ (smooth) = {self.sigma:.4g}, {self.tau:.4g}  "
                f"(at this batch: {self.sigma_local:.4g}, {self.tau_local:.4g})",
                f"  bound σ·α + τ               = {self.bound:.4g}  "
                f"(with this batch's constants: {self.local_bound:.4g})",
                f"  measured max |Δ·∇²L·Δ|/‖Δ‖² = {self.measured:.4g}  "
                f"(random directions only: {self.measured_random:.4g}; finite difference "
                f"along the best: {self.measured_fd:.4g}; {self.directions} directions)",
                f"    of which (JΔ)ᵀ∇²loss(JΔ)  = {self.gauss_newton:.4g}, "
                f"⟨∇loss, Δ∇²fΔ⟩ = {self.output_curvature:+.4g}",
                f"  ratio bound / measured      = {self.ratio:.3g}  "
                f"(local: {self.local_ratio:.3g})"
                + ("" if self.ratio >= 1 else "  BREAKS: the bound is below the measurement"),
                *(f"  note: {n}" for n in self.notes),
            ]
        )

    def __str__(self) -> str:
        return self.table()


def loss_constants(loss: str, out: Tensor, y: Tensor) -> tuple[float, float, float, float]:
    """``(σ, τ, σ_local, τ_local)`` of a loss in the worst-row RMS norm of its ``d`` outputs.

    The loss is a mean over ``N`` rows, ``L = (1/N)Σ_r ℓ(z_r)``; the dual of ``‖·‖_rms`` on
    ``R^d`` is ``√d·‖·‖₂``. Then ``|⟨∇L, v⟩| ≤ (1/N)Σ_r √d‖∇ℓ_r‖₂·‖v_r‖_rms ≤ σ·max_r‖v_r‖_rms``
    with ``σ = √d·mean_r‖∇ℓ_r‖₂``, and ``vᵀ∇²L v ≤ τ·max_r‖v_r‖²_rms`` with
    ``τ = d·mean_r λ_max(∇²ℓ_r)``.

    * cross-entropy, ``∇ℓ = p − e_y``, ``∇²ℓ = diag(p) − ppᵀ``: ``‖p − e_y‖₂² = (1−p_y)² +
      Σ_{j≠y}p_j² ≤ 2(1−p_y)² ≤ 2`` and ``vᵀ(diag p − ppᵀ)v = Var_p(v) ≤ (max v − min v)²/4
      ≤ ‖v‖₂²/2``, so ``σ = √(2d)``, ``τ = d/2`` for all logits; locally ``σ`` uses
      ``‖p_r − e_{y_r}‖₂`` and ``τ`` the exact top eigenvalue of each row's Hessian.
    * mean squared error ``mean((z − y)²) = (1/N)Σ_r‖z_r − y_r‖²_rms``: ``∇ℓ = 2(z − y)/d``
      and ``∇²ℓ = 2I/d``, so ``τ = 2`` exactly; ``σ = 2·‖z_r − y_r‖_rms`` is not global (the
      loss is not Lipschitz): ``σ`` takes the worst row at this batch, a constant valid while
      no residual grows beyond it, and ``σ_local`` the mean over rows.
    """
    z = rows(out).double()
    d = z.shape[-1]
    if loss == "cross_entropy":
        labels = y.reshape(-1)
        p = torch.softmax(z, -1)
        g = p - F.one_hot(labels, d).double()
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        lam = torch.linalg.eigvalsh(hess)[:, -1]
        return (
            math.sqrt(2 * d),
            d / 2,
            math.sqrt(d) * float(g.norm(dim=-1).mean()),
            d * float(lam.mean()),
        )
    if loss == "mse":
        r = z - rows(_mse_target(out, y)).double()
        rms = r.square().mean(-1).sqrt()
        return 2 * float(rms.max()), 2.0, 2 * float(rms.mean()), 2.0
    raise ValueError(f"unknown loss {loss!r}: use one of {list(_LOSSES)}")


def _why_no_sharpness(module: Module) -> str:
    """A message naming the bond that keeps a module from having a sharpness constant."""
    for path, m in module.named_modules():
        if isinstance(m, Bond) and not m.smooth:
            return (
                f"{m._name()} at {path or 'the top'} is not smooth (it has a kink), so the "
                "module has no sharpness constant and no certificate exists; use a smooth "
                "activation such as GELU"
            )
    for path, m in module.named_modules():
        if not any(True for _ in m.children()) and isinstance(m, Module) and m.sharpness is None:
            return (
                f"{m._name()} at {path or 'the top'} has no derived sharpness constant, so "
                "the module has none and cannot be certified"
            )
    return f"{module._name()} has no sharpness constant"


def sharpness_check(
    module: Module,
    loss_fn: str = "cross_entropy",
    batch: tuple[Tensor, Tensor] | None = None,
    *,
    n_random: int = 8,
    n_starts: int = 2,
    rounds: int = 25,
    generator: torch.Generator | None = None,
) -> SharpnessCertificate:
    """Certify the curvature of ``L(w) = loss_fn(f(x; w), y)`` in the modular norm.

    The bound (chain rule): ``Δ·∇²L·Δ = ⟨∇loss, Δ·∇²_ww f·Δ⟩ + (JΔ)ᵀ∇²loss(JΔ)``, so with
    ``‖Δ·∇²f·Δ‖ ≤ α‖Δ‖_M²`` (the module's sharpness) and ``‖JΔ‖ ≤ ‖Δ‖_M`` (well-normed),
    ``|Δ·∇²L·Δ| ≤ (σ·α + τ)‖Δ‖_M²`` — no factor of ``ν``: the modular norm already carries
    the sensitivities. It inherits the assumptions of ``α`` and of well-normedness (unit
    inputs, ν as a worst-case gain); see `loss_constants` for ``σ`` and ``τ``.

    The measurement: ``max |Δ·∇²L·Δ| / ‖Δ‖_M²`` over ``n_random`` directions
    ``normalize(randn, 1)`` and ``n_starts`` runs of ``rounds`` power-iteration steps
    ``Δ ← dualize(∇²L·Δ, 1)``, which climb to the steepest curvature in the modular norm (random
    directions spread over all singular directions and find far less; the climb is slow, about
    20 rounds to level off on a small MLP, and ``measured`` is a lower bound on the true
    maximum). Hessian-vector products by double backward in float64; the best direction is
    re-measured by a central second difference. A module with a ReLU or Abs raises
    ``ValueError`` naming the bond.
    """
    if batch is None:
        raise ValueError("sharpness_check needs batch=(x, y)")
    if loss_fn not in _LOSSES:
        raise ValueError(f"unknown loss {loss_fn!r}: use one of {list(_LOSSES)}")
    sharp = module.sharpness
    if not module.smooth or sharp is None:
        raise ValueError(_why_no_sharpness(module))
    x, y = batch
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = _Probe(module, x)
    net = probe.net
    sigma, tau, sigma_local, tau_local = loss_constants(loss_fn, probe.out, y)

    params = [p.clone().requires_grad_(True) for p in probe.params]
    with torch.enable_grad(), _math_attention():
        grads = torch.autograd.grad(_loss(loss_fn, probe(params), y), params, create_graph=True)

    def hvp(delta: list[Tensor]) -> list[Tensor]:
        with _math_attention():
            return list(torch.autograd.grad(grads, params, grad_outputs=delta, retain_graph=True))

    def curvature(delta: list[Tensor], hv: list[Tensor]) -> float:
        q = sum(float((d * h).sum()) for d, h in zip(delta, hv, strict=True))
        return abs(q) / float(net.norm(delta)) ** 2

    best, best_dir, random_best, count = 0.0, None, 0.0, 0
    for _ in range(n_random):
        delta = net.normalize([_randn(p, gen) for p in probe.params], 1.0)
        c = curvature(delta, hvp(delta))
        count += 1
        random_best = max(random_best, c)
        if c > best:
            best, best_dir = c, delta
    for _ in range(n_starts):
        delta = net.normalize([_randn(p, gen) for p in probe.params], 1.0)
        for _ in range(rounds):
            hv = hvp(delta)
            c = curvature(delta, hv)
            count += 1
            if c > best:
                best, best_dir = c, delta
            delta = net.dualize(hv, 1.0, method="svd")
        c = curvature(delta, hvp(delta))
        count += 1
        if c > best:
            best, best_dir = c, delta
    assert best_dir is not None

    # the best direction again, by a second difference of the loss and split in two parts
    h = 1e-3
    with torch.no_grad():

        def loss_at(s: float) -> float:
            moved = [p + s * d for p, d in zip(probe.params, best_dir, strict=True)]
            return float(_loss(loss_fn, probe(moved), y))

        fd = abs(loss_at(h) + loss_at(-h) - 2 * loss_at(0.0)) / h**2
        fd /= float(net.norm(best_dir)) ** 2
    v = probe.linear(best_dir)
    z = probe.out.detach().requires_grad_(True)
    with torch.enable_grad():
        (gz,) = torch.autograd.grad(_loss(loss_fn, z, y), [z], create_graph=True)
        (hz,) = torch.autograd.grad(gz, [z], grad_outputs=v)
    gn = float((v * hz).sum()) / float(net.norm(best_dir)) ** 2

    return SharpnessCertificate(
        loss=loss_fn,
        alpha=sharp[0],
        beta=sharp[1],
        gamma=sharp[2],
        sigma=sigma,
        tau=tau,
        sigma_local=sigma_local,
        tau_local=tau_local,
        measured=best,
        measured_random=random_best,
        measured_fd=fd,
        gauss_newton=gn,
        output_curvature=_signed(best, best_dir, hvp, net) - gn,
        directions=count,
        notes=_assumption_notes(probe, 1e-3),
    )


def _signed(
    best: float, delta: list[Tensor], hvp: Callable[[list[Tensor]], list[Tensor]], net: Module
) -> float:
    """``Δ·∇²L·Δ / ‖Δ‖²`` with its sign (``best`` is its absolute value)."""
    q = sum(float((d * h).sum()) for d, h in zip(delta, hvp(delta), strict=True))
    return math.copysign(best, q) if best else q / float(net.norm(delta)) ** 2


# ---- alignment over training ----------------------------------------------------------------


@dataclass
class AlignmentRecord:
    """One optimizer step ``Δ = w_after − w_before``, measured at ``w_before``.

    Ratios are ``‖f(x; w + Δ) − f(x; w)‖ / ‖Δ‖_M`` (``size``: worst-row RMS) and the
    linearized ``‖∇_w f·Δ‖ / ‖Δ‖_M``: at most 1 for a well-normed network, near 1 when the
    update is aligned with the inputs. ``random*``: the same for ``normalize(randn, ‖Δ‖_M)``
    at the same weights, on the training batch.
    """

    step: int
    loss: float  # training loss of the batch, before the step
    input_size: float | None  # max row RMS of the batch's inputs (None: token indices)
    update_norm: float  # ‖Δ‖_M
    ratio: float
    linear_ratio: float
    held_ratio: float | None
    held_linear_ratio: float | None
    random_ratio: float
    random_linear_ratio: float


@dataclass
class AlignmentLog:
    """What `alignment` recorded, one `AlignmentRecord` per logged step."""

    records: list[AlignmentRecord]

    def table(self) -> str:
        head = (
            "  step    loss  max‖x‖   ‖Δ‖_M    ratio  linear  held-out  held lin  random  rand lin"
        )
        lines = [
            "alignment: ‖f(w+Δ) − f(w)‖/‖Δ‖_M for the optimizer's update Δ "
            "(worst-row RMS; held-out batch; a random step of the same norm); the bound is 1 "
            "for inputs up to unit RMS (max‖x‖: the batch's largest)",
            head,
            "-" * len(head),
        ]

        def cell(v: float | None, w: int) -> str:
            return f"{'—':>{w}}" if v is None else f"{v:{w}.3f}"

        for r in self.records:
            lines.append(
                f"{r.step:6d}  {r.loss:6.3f}  {cell(r.input_size, 6)}  {r.update_norm:6.3g}  "
                f"{r.ratio:7.3f}  "
                f"{r.linear_ratio:6.3f}  {cell(r.held_ratio, 8)}  {cell(r.held_linear_ratio, 8)}"
                f"  {r.random_ratio:6.3f}  {r.random_linear_ratio:8.3f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Ratio against step: the update on the training and held-out batches, and a
        random step of the same modular norm; dashed: the linearized ratios."""
        from modnorm.plots import _pyplot, save_figure

        plt = _pyplot()
        steps = [r.step for r in self.records]
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        series = [
            ("optimizer update, training batch", "tab:blue", "ratio", "linear_ratio"),
            ("optimizer update, held-out batch", "tab:green", "held_ratio", "held_linear_ratio"),
            ("random step of the same norm", "0.5", "random_ratio", "random_linear_ratio"),
        ]
        for label, color, full, lin in series:
            ys = [getattr(r, full) for r in self.records]
            if any(y is None for y in ys):
                continue
            ax.plot(steps, ys, "-o", ms=3, color=color, label=label)
            ax.plot(steps, [getattr(r, lin) for r in self.records], "--", lw=0.8, color=color)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("‖f(w+Δ) − f(w)‖ / ‖Δ‖_M")
        ax.set_title("alignment of the update (dashed: linearized; dotted: the bound)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def alignment(
    module: Module,
    optimizer: torch.optim.Optimizer | Callable[[Module], torch.optim.Optimizer],
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    *,
    every: int = 1,
    held_out: Tensor | None = None,
    loss: str = "cross_entropy",
    generator: torch.Generator | None = None,
) -> AlignmentLog:
    """Train ``module`` in place for ``steps`` steps and, every ``every`` steps (and at the
    first), measure how tight the well-normed bound is for the update the optimizer applied.

    ``Δ`` is the parameter difference across ``optimizer.step()`` (so weight decay,
    projection and schedules are included); at the pre-step weights ``w``, on the step's own
    batch and on ``held_out`` inputs, the record holds ``‖f(w + Δ) − f(w)‖/‖Δ‖_M`` and
    ``‖∇_w f·Δ‖/‖Δ‖_M`` (float64, worst-row RMS), and the same for a random step
    ``normalize(randn, ‖Δ‖_M)``. ``optimizer`` is an optimizer over ``module``'s parameters
    or a factory called with ``module``; ``batches`` yields ``(x, y)`` (at least ``steps``).
    """
    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be positive, got steps={steps}, every={every}")
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {list(_LOSSES)}")
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(module)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    it = iter(batches)
    records = []
    for t in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {t} of {steps} steps") from None
        probe = _Probe(module, x) if t % every == 0 else None  # a copy of w before the step
        value = _loss(loss, module(x), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if probe is None:
            continue
        after = [p.detach().double() for p in module.parameters()]
        delta = [a - b for a, b in zip(after, probe.params, strict=True)]
        n = float(probe.net.norm(delta))
        if n == 0:
            raise ValueError(f"the optimizer's update at step {t} is zero: nothing to measure")
        noise = probe.net.normalize([_randn(p, gen) for p in probe.params], n)
        held = probe.input(held_out) if held_out is not None else None
        records.append(
            AlignmentRecord(
                step=t,
                loss=float(value.detach()),
                input_size=size(probe.x) if probe.x.is_floating_point() else None,
                update_norm=n,
                ratio=size(probe.moved(delta)) / n,
                linear_ratio=size(probe.linear(delta)) / n,
                held_ratio=None if held is None else size(probe.moved(delta, held)) / n,
                held_linear_ratio=None if held is None else size(probe.linear(delta, held)) / n,
                random_ratio=size(probe.moved(noise)) / n,
                random_linear_ratio=size(probe.linear(noise)) / n,
            )
        )
    return AlignmentLog(records)


# ---- coordinate check across width and depth --------------------------------------------------

COORD_GROUPS = ("embed", "block 1", "block L", "logits")
COORD_METHODS = ("modnorm-adam", "adam")


def _is_residual(m: nn.Module) -> bool:
    """A modnorm ``(1 − a)·Identity + a·block`` tuple: one member is a scaled Identity."""
    from modnorm.bonds import Identity
    from modnorm.modules import Compose, TupleModule

    if not isinstance(m, TupleModule):
        return False
    return any(
        isinstance(k, Identity) or (isinstance(k, Compose) and isinstance(k.layers[0], Identity))
        for k in m.members
    )


def coord_taps(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """Where the coordinate check reads activations, as ``group → (module, read its input)``.

    Residual networks (modnorm or ``modnorm.baselines``): ``embed`` is the stream entering the
    first residual block, ``block 1`` and ``block L`` the stream after the first and the last
    block (after the residual sum). MLPs: ``embed`` is the first Linear's output, ``block 1``
    and ``block L`` the outputs of the first and last hidden-to-hidden Linear (absent at
    depth 1). ``logits`` is the model's output and needs no tap.
    """
    from modnorm.atoms import Linear as MnLinear
    from modnorm.baselines import _Block
    from modnorm.bonds import Add
    from modnorm.modules import Compose

    blocks: list[nn.Module] = []
    entries: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, _Block):
            blocks.append(m)
            entries.append(m)
        elif isinstance(m, Compose):
            layers = m.layers
            for i in range(1, len(layers)):
                if isinstance(layers[i], Add) and _is_residual(layers[i - 1]):
                    blocks.append(layers[i])
                    entries.append(layers[i - 1])
    if blocks:
        return {
            "embed": (entries[0], True),
            "block 1": (blocks[0], False),
            "block L": (blocks[-1], False),
        }
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, MnLinear))]
    taps: dict[str, tuple[nn.Module, bool]] = {"embed": (linears[0], False)} if linears else {}
    if len(linears) > 2:
        taps["block 1"] = (linears[1], False)
        taps["block L"] = (linears[-2], False)
    return taps


def _mean_rms(t: Tensor) -> float:
    """RMS over features, mean over rows (examples, tokens or pixels)."""
    return float(rows(t.detach()).double().square().mean(-1).sqrt().mean())


def _activations(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The output and the tapped activations of one forward pass (with autograd)."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for group, (m, pre) in coord_taps(model).items():

        def grab(_m: nn.Module, args: Any, out: Any = None, group: str = group) -> None:
            value = args[0] if out is None else out
            seen[group] = value.detach().clone()

        if pre:
            hooks.append(m.register_forward_pre_hook(lambda m, a, g=grab: g(m, a)))
        else:
            hooks.append(m.register_forward_hook(grab))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    seen["logits"] = out.detach().clone()
    return out, seen


def coordinate_step_stats(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int = 5,
) -> dict[str, tuple[float, float]]:
    """Train ``steps`` steps and return, per group of `coord_taps`, the activation
    RMS and the per-step change, each averaged over the steps ``t = 1 … steps``.

    At step ``t`` on batch ``x_t``: ``rms = mean_r ‖a_r(w_t)‖_rms`` and ``change =
    mean_r ‖a_r(w_{t+1}) − a_r(w_t)‖_rms``, with ``a(w)`` the activation on ``x_t`` (rows:
    examples, tokens or pixels) and ``w_{t+1}`` the weights after ``optimizer.step()``.
    """
    from modnorm.experiments import loss_fn

    rms: dict[str, float] = {}
    change: dict[str, float] = {}
    it = iter(batches)
    for t in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {t} of {steps} steps") from None
        out, before = _activations(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(out, y).backward()
        optimizer.step()
        with torch.no_grad():
            _, after = _activations(model, x)
        for g, a in before.items():
            rms[g] = rms.get(g, 0.0) + _mean_rms(a) / steps
            change[g] = change.get(g, 0.0) + _mean_rms(after[g] - a) / steps
    return {g: (rms[g], change[g]) for g in rms}


@dataclass
class CoordCheck:
    """A coordinate check: per method and group, activation RMS and per-step change against
    the width or depth of the family (``nan`` where a model has no such group)."""

    model: str
    scale: str
    values: list[int]
    steps: int
    lrs: dict[str, float]  # method → learning rate
    rms: dict[str, dict[str, list[float]]]  # method → group → one value per scale
    change: dict[str, dict[str, list[float]]]

    def growth(self, method: str, quantity: str, group: str) -> float:
        """``value at the largest scale / value at the smallest``: 1 for a flat line."""
        ys = getattr(self, quantity)[method][group]
        return ys[-1] / ys[0] if ys[0] > 0 else math.nan

    def table(self) -> str:
        cols = "".join(f"{self.scale + ' ' + str(v):>12}" for v in self.values)
        lines = [
            f"coordinate check: {self.model} over {self.scale}, mean of steps 1–{self.steps}; "
            "RMS over features, mean over rows",
        ]
        for quantity, title in (("rms", "activation RMS"), ("change", "per-step change")):
            head = f"{title + ':':<17}{'method':<14}{'group':<9}{cols}  last/first"
            lines += ["", head, "-" * len(head)]
            for method in getattr(self, quantity):
                lr = self.lrs[method]
                for group, ys in getattr(self, quantity)[method].items():
                    cells = "".join(f"{y:12.4g}" for y in ys)
                    grow = self.growth(method, quantity, group)
                    lines.append(
                        f"{'':<17}{method:<14}{group:<9}{cells}  {grow:10.3g}"
                        + ("" if group != "embed" else f"   (lr {lr:g})")
                    )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Two rows (activation RMS, per-step change) by one column per method; one line
        per group; x = width or depth on a log2 axis."""
        from modnorm.plots import _pyplot, save_figure

        plt = _pyplot()
        methods = list(self.rms)
        # one y scale per row, so a flat line and a growing one read as such side by side
        fig, axes = plt.subplots(
            2,
            len(methods),
            figsize=(4.2 * len(methods), 6.4),
            squeeze=False,
            sharex=True,
            sharey="row",
        )
        for j, method in enumerate(methods):
            for i, (quantity, label) in enumerate(
                (("rms", "activation RMS"), ("change", "per-step change (RMS)"))
            ):
                ax = axes[i][j]
                for group, ys in getattr(self, quantity)[method].items():
                    ok = [(v, y) for v, y in zip(self.values, ys, strict=True) if y > 0]
                    if ok:
                        ax.plot(*zip(*ok, strict=True), "-o", ms=3, label=group)
                ax.set_xscale("log", base=2)
                ax.set_xticks(self.values, [str(v) for v in self.values])
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(f"{method} (lr {self.lrs[method]:g})", fontsize=9)
                else:
                    ax.set_xlabel(self.scale)
                if j == 0:
                    ax.set_ylabel(label)
                ax.legend(fontsize=7)
        fig.suptitle(f"coordinate check: {self.model}, mean of steps 1–{self.steps}", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def coordinate_check(
    model: str = "resmlp",
    scale: str = "width",
    values: Sequence[int] = (32, 64, 128, 256),
    *,
    data: Any = None,
    width: int = 64,
    depth: int = 2,
    steps: int = 5,
    lr: float = 0.5,
    torch_lr: float = 2.0**-6,
    batch_size: int = 64,
    context: int = 64,
    num_heads: int = 4,
    seed: int = 0,
) -> CoordCheck:
    """The coordinate check of a family built as the sweeps build it
    (``experiments.build_model``/``build_optimizer``): modnorm's compound with its normalized
    Adam at ``lr`` against the plain PyTorch model with ``torch.optim.Adam`` at ``torch_lr``.
    Every model starts from ``torch.manual_seed(seed)`` and sees the same batches; see
    `coordinate_step_stats` for what is measured. ``data`` defaults to digits."""
    from modnorm import experiments as ex
    from modnorm.data import digits

    cfg = ex.SweepConfig(
        model=model,
        data="digits" if data is None else f"{'text:' if data.kind == 'text' else ''}{data.name}",
        scale=scale,
        values=list(values),
        width=width,
        depth=depth,
        context=context,
        num_heads=num_heads,
    )
    cfg.validate()
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    data = digits(image=model == "rescnn") if data is None else data
    lrs = {"modnorm-adam": lr, "adam": torch_lr}
    rms: dict[str, dict[str, list[float]]] = {m: {} for m in COORD_METHODS}
    change: dict[str, dict[str, list[float]]] = {m: {} for m in COORD_METHODS}
    for k, v in enumerate(sorted(values)):
        w, d = (v, depth) if scale == "width" else (width, v)
        for method in COORD_METHODS:
            torch.manual_seed(seed)
            net = ex.build_model(cfg, method, w, d, data)
            opt = ex.build_optimizer(method, net, lrs[method])
            gen = torch.Generator().manual_seed(10_000 + seed)
            batches = (data.batch(batch_size, gen, context) for _ in range(steps))
            stats = coordinate_step_stats(net, opt, batches, steps)
            for group in COORD_GROUPS:
                r, c = stats.get(group, (math.nan, math.nan))
                rms[method].setdefault(group, [math.nan] * k).append(r)
                change[method].setdefault(group, [math.nan] * k).append(c)
    return CoordCheck(model, scale, sorted(values), steps, lrs, rms, change)


# ---- largest stable step ------------------------------------------------------------------------


@dataclass
class StableStep:
    """The descent lemma's step sizes for normalized gradient descent in the modular norm.

    ``dual_norm`` is ``‖g‖_* = ⟨g, d⟩`` with ``d = dualize(g, 1)``; ``eta_bound = 2‖g‖_*/S``
    with the certificate's ``S = σ·α + τ``; ``eta_local`` the same with this batch's
    constants; ``eta_measured`` with the largest measured curvature instead of a bound (not a
    guarantee); ``eta_direct`` the largest ``η`` on a ``2^(k/4)`` grid at which one step
    ``w − η·d`` still lowers the batch loss (a direct measurement along ``d``).
    """

    loss: float
    dual_norm: float
    certificate: SharpnessCertificate
    eta_direct: float | None

    def eta(self, curvature: float) -> float:
        """``2‖g‖_*/S``: the lemma guarantees a decrease for every ``0 < η <`` this."""
        return 2 * self.dual_norm / curvature if curvature > 0 else math.inf

    @property
    def eta_bound(self) -> float:
        return self.eta(self.certificate.bound)

    @property
    def eta_local(self) -> float:
        return self.eta(self.certificate.local_bound)

    @property
    def eta_measured(self) -> float:
        return self.eta(self.certificate.measured)

    def table(self) -> str:
        c = self.certificate
        direct = "none on the grid" if self.eta_direct is None else f"{self.eta_direct:.4g}"
        return "\n".join(
            [
                "largest stable step of normalized gradient descent w − η·dualize(g, 1), from "
                "L(w − ηd) ≤ L(w) − η‖g‖_* + (S/2)η²:",
                f"  loss L(w) = {self.loss:.4g}, dual norm ‖g‖_* = {self.dual_norm:.4g}",
                f"  η < 2‖g‖_*/S with the certificate S = {c.bound:.4g}: {self.eta_bound:.4g}"
                f"  (best guaranteed decrease at half of it)",
                f"  with this batch's constants S = {c.local_bound:.4g}: {self.eta_local:.4g}",
                f"  with the measured curvature {c.measured:.4g} (not a guarantee): "
                f"{self.eta_measured:.4g}",
                f"  largest η on a 2^(k/4) grid where one step lowers the loss: {direct}",
            ]
        )

    def __str__(self) -> str:
        return self.table()


def stable_step(
    module: Module,
    loss_fn: str = "cross_entropy",
    batch: tuple[Tensor, Tensor] | None = None,
    *,
    certificate: SharpnessCertificate | None = None,
    generator: torch.Generator | None = None,
) -> StableStep:
    """The step size the descent lemma guarantees to lower ``L(w) = loss_fn(f(x; w), y)``.

    If ``|Δ·∇²L(w')·Δ| ≤ S‖Δ‖_M²`` at every ``w'`` between ``w`` and ``w + Δ`` (Taylor with
    the integral remainder), then ``L(w + Δ) ≤ L(w) + ⟨g, Δ⟩ + (S/2)‖Δ‖_M²``. For the step
    ``Δ = −η·d``, ``d = dualize(g, 1)`` (``‖d‖_M = 1``, ``⟨g, d⟩ = ‖g‖_*``, the dual norm):

        ``L(w − η·d) ≤ L(w) − η‖g‖_* + (S/2)·η²``,

    which is below ``L(w)`` for ``0 < η < 2‖g‖_*/S`` and lowest, ``L(w) − ‖g‖_*²/(2S)``, at
    ``η = ‖g‖_*/S``. ``S = σ·α + τ`` is `sharpness_check`'s bound (computed unless
    ``certificate`` is given), a constant along the segment under its assumptions (unit
    inputs; for cross-entropy ``σ`` and ``τ`` are global). Float64, SVD dual map.
    """
    if batch is None:
        raise ValueError("stable_step needs batch=(x, y)")
    cert = certificate or sharpness_check(module, loss_fn, batch, generator=generator)
    x, y = batch
    probe = _Probe(module, x)
    params = [p.clone().requires_grad_(True) for p in probe.params]
    with torch.enable_grad(), _math_attention():
        value = _loss(loss_fn, probe(params), y)
        grads = torch.autograd.grad(value, params)
    d = probe.net.dualize(list(grads), 1.0, method="svd")
    dual = sum(float((g * e).sum()) for g, e in zip(grads, d, strict=True))

    def loss_at(eta: float) -> float:
        with torch.no_grad():
            moved = [p - eta * e for p, e in zip(probe.params, d, strict=True)]
            return float(_loss(loss_fn, probe(moved), y))

    base = float(value.detach())
    # the largest grid η below which every grid point still lowers the loss
    direct = None
    for k in range(-40, 17):
        if loss_at(2.0 ** (k / 4)) >= base:
            break
        direct = 2.0 ** (k / 4)
    return StableStep(loss=base, dual_norm=dual, certificate=cert, eta_direct=direct)

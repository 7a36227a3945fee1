"""Optimizers that take steps of a fixed size in the modular norm (DESIGN §1–2).

Every step is the same short chain of small pieces (as optax's transformations):

    d  = direction(g, state)                  # SGD momentum, Adam moments, any torch.optim step
    u  = module.normalize(d, target=lr)       # SGD, Adam, AdamW, Normalized: ‖u‖_M = lr
       | module.dualize(d, target=lr)         # Dual: steepest descent, ‖u‖_M = lr
    w ← (w − u)·(1 − lr·λ·share)              # weight decay in the modular norm, per atom
    w ← project(w)                            # only with project=True

so the learning rate is the modular norm of every update, whatever the base optimizer, and a
learning-rate scheduler's lr is that target norm. ``share`` is the atom's fraction of a target
(`modnorm.Module.atom_shares`); atoms of share 0 (mass 0) never move. Weight decay skips the
atoms with ``decays = False`` (`Bias`, `Gain`), as AdamW recipes skip biases and gains. The
optimizers are ``torch.optim.Optimizer`` s with one parameter group that holds exactly
``list(module.parameters())``: schedulers, ``zero_grad``, ``state_dict`` and closures work as
in PyTorch, and gradient accumulation is PyTorch's (``.grad`` adds up over micro-batches; call
``step`` once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from modnorm.distributed import global_sums, share_warm_starts
from modnorm.linalg import PRECISIONS
from modnorm.modules import Atom, Module

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Dual",
    "ModularOptimizer",
    "Normalized",
    "adam_direction",
    "apply_update_",
    "ema_direction",
    "first_nonfinite",
    "sgd_direction",
]

# ---- the functional core: lists of tensors in, lists of tensors out ----------------------


def first_nonfinite(tensors: Sequence[Tensor | None]) -> int | None:
    """Index of the first tensor holding a NaN or an infinity (``None`` entries skipped), or
    ``None`` when all are finite. Tests each tensor's sum, which NaN and ±∞ make non-finite
    (15× cheaper than ``isfinite(t).all()`` on a CPU; a sum that overflows, which takes
    entries near 1e32 in float32, counts as non-finite too); one host synchronization."""
    present = [(i, t) for i, t in enumerate(tensors) if t is not None]
    if not present:
        return None
    flags = torch.isfinite(global_sums([t for _, t in present])).cpu()  # DTensors: all slices
    if bool(flags.all()):
        return None
    return present[int((~flags).nonzero()[0])][0]


def sgd_direction(
    grads: Sequence[Tensor], bufs: list[Tensor | None], momentum: float, nesterov: bool
) -> list[Tensor]:
    """Heavy-ball momentum as ``torch.optim.SGD``: ``m ← μ·m + g`` (``m = g`` at first);
    direction ``g + μ·m`` (Nesterov) or ``m``. Updates ``bufs`` in place."""
    if momentum == 0:
        return list(grads)
    out = []
    for i, g in enumerate(grads):
        buf = bufs[i]
        if buf is None:
            buf = bufs[i] = g.detach().clone()
        else:
            buf.mul_(momentum).add_(g)
        out.append(g.add(buf, alpha=momentum) if nesterov else buf)
    return out


def adam_direction(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Adam with PyTorch's bias correction: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    direction ``(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)``, ``t`` the step (from 1). Updates the
    moments in place. With ``ε = 0`` a coordinate whose ``v`` is 0 gets direction 0."""
    out = []
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        d = m.div(denom).mul_(1 / (1 - beta1**t))
        out.append(d.nan_to_num_(nan=0.0) if eps == 0 else d)
    return out


def ema_direction(
    grads: Sequence[Tensor], bufs: list[Tensor | None], momentum: float, nesterov: bool
) -> list[Tensor]:
    """Momentum as an average (Muon's): ``m ← β·m + (1−β)·g`` (``m = g`` at first);
    direction ``(1−β)·g + β·m`` (Nesterov) or ``m``. Updates ``bufs`` in place."""
    if momentum == 0:
        return list(grads)
    out = []
    for i, g in enumerate(grads):
        buf = bufs[i]
        if buf is None:
            buf = bufs[i] = g.detach().clone()
        else:
            buf.lerp_(g, 1 - momentum)
        out.append(g.lerp(buf, momentum) if nesterov else buf)
    return out


@torch.no_grad()
def apply_update_(
    params: Sequence[Tensor],
    updates: Sequence[Tensor | None],
    shares: Sequence[float],
    decay: float = 0.0,
) -> None:
    """``w ← (w − u)·(1 − decay·share)`` per parameter (``u = None``: left alone). With
    ``decay = lr·λ`` this is the reference's ``regularize``: weight decay in the modular norm,
    each atom shrinking by its share of the strength."""
    for p, u, share in zip(params, updates, shares, strict=True):
        if u is None:
            continue
        p.sub_(u.to(p.dtype))
        if decay > 0 and share > 0:
            p.mul_(1 - decay * share)


# ---- validation ----------------------------------------------------------------------------


def _finite_at_least(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be finite and at least {low:g}, got {value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _unwrap(module: Any) -> Any:
    """The modnorm module inside a ``torch.compile`` or DistributedDataParallel wrapper."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module, nn.Module):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


# ---- the optimizer classes -----------------------------------------------------------------


class ModularOptimizer(Optimizer):
    """Base class: ``step`` = direction → normalize or dualize to ``lr`` → apply with decay.

    Holds one parameter group, exactly ``list(module.parameters())`` in order, and keeps the
    module (``self.module``) for its norm. Subclasses define `_direction` (the base
    update, reading and writing ``self.state``) and may override `_shape`.

    Non-finite gradients raise a ``ValueError`` naming the atom, before anything (weights or
    state) changes; with ``skip_nonfinite=True`` the step is skipped instead and counted in
    ``skipped_steps``. Parameters whose ``.grad`` is ``None`` are left alone (as torch.optim).
    """

    def __init__(
        self, module: Module, defaults: dict[str, Any], *, skip_nonfinite: bool = False
    ) -> None:
        module = _unwrap(module)
        if not isinstance(module, Module):
            raise TypeError(
                "a modnorm optimizer is built from a modnorm module (it needs the module's "
                f"modular norm), not from {type(module).__name__}; e.g. mn.optim.Adam(model, lr)"
            )
        params = list(module.parameters())
        if not params:
            raise ValueError("the module has no parameters to optimize")
        names = [name for name, _ in module.named_parameters()]
        atoms = [atom for atom, _ in module.atom_shares()]
        owner = {id(atom.weight): atom for atom in atoms}
        for name, p in zip(names, params, strict=True):
            if id(p) not in owner:
                raise ValueError(
                    f"parameter {name!r} of shape {tuple(p.shape)} belongs to no modnorm atom: "
                    "the modular norm cannot measure it"
                )
        if [id(a.weight) for a in atoms] != [id(p) for p in params]:
            raise ValueError("the module's atoms are not in parameter order (a core bug)")
        self.module: Module = module
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0
        self._names = names
        self._check_group(defaults)
        super().__init__(params, defaults)

    # ---- the torch.optim contract ----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the first group, the module's parameters, is accepted: the modular norm
        measures the whole network at once, so one ``lr`` (the target norm) governs it."""
        if self.param_groups:
            raise ValueError(
                "a modnorm optimizer holds exactly one parameter group, the module's parameters; "
                "build a separate optimizer for parameters outside the module"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        expected = list(self.module.parameters())
        if not _same_objects(params, expected):
            raise ValueError(
                "the parameters must be exactly list(module.parameters()), in order: got "
                f"{len(params)} tensors for a module of {len(expected)} parameters, or tensors "
                "that do not belong to the module"
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, plus ``"modnorm"``: skipped steps and the atoms'
        spectral-norm warm starts, so that a resumed run repeats the original exactly."""
        sd = super().state_dict()
        share_warm_starts(self.module)  # FSDP2: each atom's from the rank that computed it
        warm: list[dict[str, Tensor]] = []
        for atom, _ in self.module.atom_shares():
            warm.append({n: b.detach().clone() for n, b in _warm_start_buffers(atom)})
        sd["modnorm"] = {"skipped_steps": self.skipped_steps, "warm_start": warm}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("modnorm", None)
        super().load_state_dict(state_dict)
        self._check_group(self.param_groups[0])
        if extra is None:
            return
        self.skipped_steps = int(extra["skipped_steps"])
        atoms = [atom for atom, _ in self.module.atom_shares()]
        if len(extra["warm_start"]) != len(atoms):
            raise ValueError(
                f"the state dict has warm starts for {len(extra['warm_start'])} atoms, the "
                f"module has {len(atoms)}"
            )
        for atom, buffers in zip(atoms, extra["warm_start"], strict=True):
            for name, value in buffers.items():
                setattr(atom, name, value.to(atom.weight.device))

    # ---- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_module()
        group = self.param_groups[0]
        self._check_group(group)
        params: list[Tensor] = group["params"]
        grads = [p.grad for p in params]
        bad = first_nonfinite(grads)
        if bad is not None:
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            atom = self.module.atom_shares()[bad][0]
            raise ValueError(
                f"non-finite gradient for {atom._name()} (parameter {self._names[bad]!r}); "
                "no weight or state was changed. Pass skip_nonfinite=True to skip such steps"
            )
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return loss
        lr = float(group["lr"])
        ds = self._direction(group, [params[i] for i in live], [g for g in grads if g is not None])
        if lr > 0:
            direction = [torch.zeros_like(p) for p in params] if len(live) < len(params) else ds
            for i, d in zip(live, ds, strict=True):
                direction[i] = d
            update = self._shape(group, direction, lr)
            applied: list[Tensor | None] = [None] * len(params)
            for i in live:
                applied[i] = update[i]
            decayed = [share * atom.decays for atom, share in self.module.atom_shares()]
            apply_update_(params, applied, decayed, lr * group["weight_decay"])
        if group["project"]:
            self.module.project_()
        return loss

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        """The base optimizer's update direction for the parameters that have a gradient
        (``params`` and ``grads`` list only those), reading and writing ``self.state``."""
        raise NotImplementedError

    def _shape(self, group: dict[str, Any], direction: list[Tensor], lr: float) -> list[Tensor]:
        """Scale the direction to modular norm ``lr`` (default: normalize)."""
        return self.module.normalize(direction, target=lr)

    # ---- checks ----------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        _finite_at_least("lr", group["lr"])
        _finite_at_least("weight_decay", group["weight_decay"])

    def _check_module(self) -> None:
        """The module's parameters must still be the objects this optimizer was built on."""
        held = self.param_groups[0]["params"]
        current = list(self.module.parameters())
        if not _same_objects(current, held):
            raise ValueError(
                "the module's parameters changed after the optimizer was built (a parameter was "
                "added, removed or replaced, e.g. by FSDP2's fully_shard); build the optimizer "
                "after wrapping the model, on its current parameters"
            )

    # copy.deepcopy and pickle go through these: keep the module and the counters.
    _EXTRA: tuple[str, ...] = ("module", "skip_nonfinite", "skipped_steps", "_names")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._EXTRA}}


def _with_buffers(
    state: Any,
    params: list[Tensor],
    grads: list[Tensor],
    group: dict[str, Any],
    direction: Callable[..., list[Tensor]],
) -> list[Tensor]:
    """Run a momentum ``direction`` with each parameter's ``"momentum_buffer"`` state."""
    bufs: list[Tensor | None] = [state[p].get("momentum_buffer") for p in params]
    out = direction(grads, bufs, group["momentum"], group["nesterov"])
    if group["momentum"] > 0:
        for p, b in zip(params, bufs, strict=True):
            state[p]["momentum_buffer"] = b
    return out


def _warm_start_buffers(atom: Atom) -> list[tuple[str, Tensor]]:
    """An atom's non-persistent buffers: the warm starts of its norm's iteration."""
    skip = atom._non_persistent_buffers_set
    return [(n, b) for n, b in atom.named_buffers(recurse=False) if n in skip]


class SGD(ModularOptimizer):
    r"""Normalized SGD with momentum: ``m ← μ·m + g``, ``d = g + μ·m`` (Nesterov) or ``m``,
    ``u = normalize(d, lr)`` so ``‖u‖_M = lr``, then ``w ← (w − u)·(1 − lr·λ·share)``.

    Args:
        module: the modnorm module whose parameters are optimized.
        lr: the modular norm of each update (``≥ 0``; a scheduler may change it).
        momentum: ``μ ∈ [0, 1)``; nesterov: Nesterov's variant.
        weight_decay: ``λ ≥ 0``, decoupled and in the modular norm (see module docstring).
        project: call ``module.project_()`` after each step.
        skip_nonfinite: skip (and count) steps with non-finite gradients instead of raising.
    """

    def __init__(
        self,
        module: Module,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        project: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, project=project
        )
        super().__init__(module, defaults, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _fraction("momentum", group["momentum"])

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        return _with_buffers(self.state, params, grads, group, sgd_direction)


class Adam(ModularOptimizer):
    r"""Normalized Adam: the Adam direction ``d = m̂/(√v̂ + ε)`` with
    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``,
    then ``u = normalize(d, lr)`` and ``w ← (w − u)·(1 − lr·λ·share)``.

    Bias correction is PyTorch's standard one, not the reference's time-varying averaging
    ``(1−β)^{t/(t+1)}``: ``m̂/√v̂ = (√(1−β₂ᵗ)/(1−β₁ᵗ))·m/√v`` differs from the uncorrected
    ratio by one scalar per step, which normalization removes, so the correction only sets
    how large ``ε`` is next to ``√v`` early on; and it makes this optimizer step for step
    equal to ``Normalized(module, torch.optim.Adam, lr)``. Weight decay ``λ`` is decoupled
    (AdamW's) and in the modular norm: an L2 term added to the gradient would be rescaled by
    the normalization along with it.

    Args:
        lr: the modular norm of each update (``≥ 0``); betas: ``(β₁, β₂) ∈ [0, 1)²``;
        eps: ``ε ≥ 0``; weight_decay, project, skip_nonfinite: as `SGD`.
    """

    def __init__(
        self,
        module: Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        project: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, project=project)
        super().__init__(module, defaults, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (β₁, β₂), got {betas!r}")
        _fraction("betas[0]", betas[0])
        _fraction("betas[1]", betas[1])
        _finite_at_least("eps", group["eps"])

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states, strict=True):
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
        beta1, beta2 = group["betas"]
        return adam_direction(
            grads,
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [st["step"] for st in states],
            beta1,
            beta2,
            group["eps"],
        )


class AdamW(Adam):
    r"""`Adam` under AdamW's name and default ``weight_decay=0.01``: modnorm's weight
    decay is always decoupled (AdamW's), so the two differ only in that default."""

    def __init__(
        self,
        module: Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        project: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            module,
            lr,
            betas,
            eps,
            weight_decay,
            project=project,
            skip_nonfinite=skip_nonfinite,
        )


class Dual(ModularOptimizer):
    r"""Steepest descent in the modular norm ("Muon for any architecture"): momentum
    ``m ← β·m + (1−β)·g``, direction ``d = (1−β)·g + β·m`` (Nesterov) or ``m``, then
    ``u = dualize(d, lr)``: each atom's dual map (``UVᵀ`` for Linear and Conv2d, unit rows for
    Embedding) scaled to ``lr·share``, so ``‖u‖_M = lr``; then
    ``w ← (w − u)·(1 − lr·λ·share)``. One momentum buffer per parameter.

    Args:
        lr: the modular norm of each update (``≥ 0``).
        momentum: ``β ∈ [0, 1)``.
        nesterov: Nesterov's variant.
        weight_decay: as `SGD`.
        method: ``"newton_schulz"`` or ``"svd"`` for the orthogonalization.
        precision: Newton–Schulz in ``"full"`` float32 or ``"mixed"`` bfloat16 precision
            (faster where bfloat16 is native; adds spurious directions to low-rank
            gradients: `modnorm.linalg.orthogonalize`).
        project: as `SGD`.
        skip_nonfinite: as `SGD`.
    """

    def __init__(
        self,
        module: Module,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        method: str = "newton_schulz",
        precision: str = "full",
        project: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        if method not in ("newton_schulz", "svd"):
            raise ValueError(f"method must be 'newton_schulz' or 'svd', got {method!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            method=method,
            precision=precision,
            project=project,
        )
        super().__init__(module, defaults, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _fraction("momentum", group["momentum"])

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        return _with_buffers(self.state, params, grads, group, ema_direction)

    def _shape(self, group: dict[str, Any], direction: list[Tensor], lr: float) -> list[Tensor]:
        method, precision = group["method"], group.get("precision", "full")
        return self.module.dualize(direction, target=lr, method=method, precision=precision)


class Normalized(ModularOptimizer):
    r"""Normalize the update of any ``torch.optim`` optimizer: ``base_cls`` computes its step
    as usual, the step's change ``d = w_before − w_after`` is taken back, and
    ``u = normalize(d, lr)`` is applied instead, then ``w ← (w − u)·(1 − lr·λ·share)``.

    The base optimizer (``self.base``) is built on the same parameters with ``lr=base_lr`` and
    ``**base_kwargs``; it keeps its own state (saved under ``"base"`` in `state_dict`)
    and its own weight decay, which becomes part of ``d``. ``lr`` here is the target norm (what
    a scheduler changes); ``base_lr`` only matters where the base's step is not proportional
    to its lr (e.g. decoupled weight decay) and for rounding: ``d`` is recovered to about one
    unit in the last place of ``w``, so a larger ``base_lr·|step|`` is recovered more exactly.

    Each step briefly holds a copy of the parameters. Optimizers that call the closure several
    times per step (LBFGS) are not supported.

    Args:
        base_cls: an optimizer class (or factory) taking ``(params, lr=..., **base_kwargs)``.
        lr: the modular norm of each update (``≥ 0``).
        base_lr: the base optimizer's lr (``None``: its default).
        modular_weight_decay: ``λ ≥ 0`` in the modular norm (``weight_decay`` in
            ``base_kwargs`` goes to the base optimizer).
        project: as `SGD`.
        skip_nonfinite: as `SGD`.
    """

    def __init__(
        self,
        module: Module,
        base_cls: Callable[..., Optimizer],
        lr: float,
        *,
        base_lr: float | None = 1.0,
        modular_weight_decay: float = 0.0,
        project: bool = False,
        skip_nonfinite: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=modular_weight_decay, project=project)
        super().__init__(module, defaults, skip_nonfinite=skip_nonfinite)
        if base_lr is not None:
            base_kwargs["lr"] = base_lr
        self.base = base_cls(self.param_groups[0]["params"], **base_kwargs)
        if not isinstance(self.base, Optimizer):
            raise TypeError(f"base_cls must build a torch.optim.Optimizer, got {self.base!r}")
        if isinstance(self.base, torch.optim.LBFGS):
            raise ValueError("LBFGS evaluates the closure several times per step: not supported")

    _EXTRA = (*ModularOptimizer._EXTRA, "base")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base = state_dict.pop("base", None)
        if base is None:
            raise ValueError("the state dict has no 'base' entry: it is not from Normalized")
        super().load_state_dict(state_dict)
        self.base.load_state_dict(base)

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        every: list[Tensor] = group["params"]  # restore all, in case the base touches any
        live = {id(p) for p in params}
        copies: list[Tensor | None] = [p.detach().clone() for p in every]
        self.base.step()
        changed: dict[int, Tensor] = {}
        for i, p in enumerate(every):
            before = copies[i]
            assert before is not None
            if id(p) in live:
                changed[id(p)] = torch.sub(before, p)
            p.copy_(before)  # the normalized update is applied by the caller
            copies[i] = None  # free each copy as its difference is made: ~1 extra set at peak
        out = [changed[id(p)] for p in params]
        bad = first_nonfinite(out)
        if bad is not None:
            index = [id(p) for p in every].index(id(params[bad]))
            atom = self.module.atom_shares()[index][0]
            raise ValueError(
                f"{type(self.base).__name__} produced a non-finite update for {atom._name()}; "
                "the weights were left unchanged"
            )
        return out

"""The methods the transfer benchmark compares, each a builder for ``modnorm.experiments``:
``(cfg, data, width, depth, lr, device) → (model, optimizers)``.

Peers are optional (``pip install -e .[bench]``): a method whose package is missing is
reported and skipped by the harness, never imported here at module level.

- ``torch-adam``, ``torch-adamw``: the plain ``torch.nn`` models of ``modnorm.baselines``
  with PyTorch's default initialization and optimizer hyperparameters (standard practice).
- ``mup-adam``: the same models with a ``MuReadout`` head, ``set_base_shapes`` against the
  sweep's smallest width (and a delta model at twice that width), and ``MuAdam``.
- ``umup-adam``: a ResMLP of ``unit_scaling`` layers (unit-scaled Linear, LayerNorm without
  affine weights, ``LinearReadout``), residual branches through ``residual_split`` /
  ``residual_add`` with u-μP's residual rule, in a ``DepthModuleList``, and ``uu.optim.Adam``.
- ``muon``: ``torch.optim.Muon`` for the hidden matrices and AdamW for everything else (input
  layer, embeddings, head, biases, gains), as Muon's documentation recommends; Muon's step is
  rescaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``) so one lr serves both. The
  ResCNN's hidden convolutions are trained as ``(out, in·k·k)`` matrices, as Muon's reference
  implementation flattens conv kernels.
- ``modula-adam``: the reference Modula (PyPI ``modula==0.0.0.0.0.2``), its compounds and the
  normalized Adam loop of its README, wrapped as a ``torch.optim.Optimizer``.
- ``modnorm-adam``, ``modnorm-sgd``, ``modnorm-dual``: modnorm's compounds and optimizers.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.compounds import GPT, ResMLP
from modnorm.data import Dataset
from modnorm.diagnostics import calibrate_
from modnorm.modules import Module

Built = tuple[nn.Module, list[torch.optim.Optimizer]]


@dataclass(frozen=True)
class Method:
    """One entry of the comparison: what it needs installed (``module`` or
    ``module:attribute``), which models it can build."""

    name: str
    build: ex.Builder
    models: tuple[str, ...]
    requires: tuple[str, ...] = ()
    note: str = ""
    min_blocks: int = 1

    def missing(self) -> str | None:
        """What is not installed, or None when the method can run."""
        for req in self.requires:
            module, _, attr = req.partition(":")
            try:
                found = importlib.import_module(module)
            except ImportError:
                return f"{module} is not installed (pip install -e .[bench])"
            if attr and not hasattr(found, attr):
                return f"{module}.{attr} is missing (torch {torch.__version__})"
        return None


# ---- standard practice and modnorm -----------------------------------------------------------


def _plain(cfg: ex.SweepConfig, data: Dataset, width: int, depth: int) -> nn.Module:
    return ex.build_model(cfg, "adam", width, depth, data)


def torch_adam(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    model = _plain(cfg, data, width, depth).to(device)
    return model, [torch.optim.Adam(model.parameters(), lr=lr)]


def torch_adamw(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    model = _plain(cfg, data, width, depth).to(device)
    return model, [torch.optim.AdamW(model.parameters(), lr=lr)]  # default weight decay 0.01


# The parametrized builders are partials of module-level functions, so that a sweep can send
# them to worker processes (``--jobs``).


def _modnorm(
    cfg: ex.SweepConfig,
    data: Dataset,
    width: int,
    depth: int,
    lr: float,
    device: str,
    *,
    name: str,
    calibrate: bool = False,
    output_scale: float = 1.0,
    head_mass: float = 1.0,
    affine_mass: float | None = None,
) -> Built:
    if affine_mass is not None:
        cfg = replace(cfg, affine_mass=affine_mass)
    model = ex.build_model(
        cfg, name, width, depth, data, output_scale=output_scale, head_mass=head_mass
    ).to(device)
    if calibrate:
        x, _ = data.batch(256, torch.Generator().manual_seed(12_345), cfg.context)
        calibrate_(cast(Module, model), x.to(device))
    return model, [ex.build_optimizer(name, model, lr)]


def modnorm_method(name: str, calibrate: bool = False) -> ex.Builder:
    """modnorm's compound and optimizer ``name`` (one of ``modnorm.experiments.OPTIMIZERS``);
    with ``calibrate``, each RMSDivide first declares the input RMS it sees on a batch of 256
    (`modnorm.diagnostics.calibrate_`), drawn from its own generator."""
    return functools.partial(_modnorm, name=name, calibrate=calibrate)


def modnorm_adam_head(output_scale: float = 1.0, head_mass: float = 1.0) -> ex.Builder:
    """modnorm-adam on a residual compound whose head is multiplied by ``output_scale`` and
    has mass ``head_mass``."""
    return functools.partial(
        _modnorm, name="modnorm-adam", output_scale=output_scale, head_mass=head_mass
    )


def modnorm_dual_unfolded(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    """modnorm-dual on the affine ResCNN whose blocks' convolutions are unfolded matrices
    (``--affine-mass 0.25 --unfolded``: ``ResCNN(affine_mass=0.25, unfolded=True)``; the
    stem per kernel position; benchmarks/rescnn_gap.py)."""
    if cfg.model != "rescnn":
        raise ValueError(f"modnorm-dual-unfolded trains the rescnn, not {cfg.model}")
    cfg = replace(cfg, unfolded=True)
    return _modnorm(cfg, data, width, depth, lr, device, name="modnorm-dual", affine_mass=0.25)


def modnorm_dual_unfolded_all(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    """`modnorm_dual_unfolded` with the stem's convolution unfolded too: every convolution
    one matrix (the first unfolded runs of the published grid; the unfolded stem costs loss
    on one-channel digits, benchmarks/rescnn_gap.py, and ties on three channels,
    stem_unfolding.py). One-channel images in ten classes (the harness's digits)."""
    from benchmarks.rescnn_gap import affine_rescnn  # rescnn_gap imports this module

    if cfg.model != "rescnn" or data.in_shape[0] != 1 or data.num_classes != 10:
        raise ValueError(
            "modnorm-dual-unfolded-all trains the rescnn on one-channel images in ten "
            f"classes, not {cfg.model} on {data.in_shape} in {data.num_classes}"
        )
    model = affine_rescnn(width, depth, unfolded=(True, True))
    return model.to(device), [ex.build_optimizer("modnorm-dual", model, lr)]


def modnorm_adam_affine(mass: float) -> ex.Builder:
    """modnorm-adam on a ResCNN or GPT with biases and gains of mass ``mass``, where
    ``torch.nn``'s have them (`modnorm.ResCNN`'s and `modnorm.GPT`'s ``affine_mass``)."""
    return functools.partial(_modnorm, name="modnorm-adam", affine_mass=mass)


def modnorm_adam_split(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    """modnorm-adam on a ResMLP whose masses grow with width as tuned torch Adam's split of a
    step does (benchmarks/adam_split.py): head ``width/d_in``, blocks that over √2, input 1;
    at widths 256 and 1024 on 64 inputs, the masses closest to torch Adam's split (on 256
    input features the heavy head trains better: benchmarks/RESULTS.md)."""
    d_in = math.prod(data.in_shape)
    head = width / d_in
    model = ResMLP(d_in, data.num_classes, width, depth, blocks_mass=head / 2**0.5, head_mass=head)
    return model.to(device), [mn_optim.Adam(model, lr=lr)]


def modnorm_dual_mixed(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    """modnorm-dual with Newton–Schulz in bfloat16 but for its last step (as Muon does)."""
    model = ex.build_model(cfg, "modnorm-dual", width, depth, data).to(device)
    return model, [mn_optim.Dual(cast(Module, model), lr, precision="mixed")]


def _modnorm_dual_gpt(
    cfg: ex.SweepConfig,
    data: Dataset,
    width: int,
    depth: int,
    lr: float,
    device: str,
    *,
    blocks_mass: float = 5.0,
    affine_mass: float | None = None,
) -> Built:
    model = GPT(
        data.num_classes,
        cfg.context,
        width,
        cfg.num_heads,
        depth,
        blocks_mass=blocks_mass,
        affine_mass=affine_mass,
    )
    return model.to(device), [mn_optim.Dual(model, lr)]


def modnorm_dual_gpt_blocks_mass(mass: float) -> ex.Builder:
    """modnorm-dual on a GPT whose residual blocks carry mass ``mass`` (5 by default)."""
    return functools.partial(_modnorm_dual_gpt, blocks_mass=mass)


def modnorm_dual_gpt_affine(mass: float) -> ex.Builder:
    """modnorm-dual on a GPT with biases and LayerNorm gains, each atom of mass ``mass``."""
    return functools.partial(_modnorm_dual_gpt, affine_mass=mass)


# ---- μP ----------------------------------------------------------------------------------------


def _base_width(cfg: ex.SweepConfig) -> int:
    """μP's base: the smallest width of a width sweep, the fixed width of a depth sweep."""
    return min(cfg.values) if cfg.scale == "width" else cfg.width


def _mup_model(cfg: ex.SweepConfig, data: Dataset, width: int, depth: int) -> nn.Module:
    from mup import MuReadout

    model = _plain(cfg, data, width, depth)
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise ValueError(f"mup-adam: no linear head to replace in the {cfg.model} model")
    head = model[-1]
    model[-1] = MuReadout(head.in_features, head.out_features)
    return model


def mup_adam(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    from mup import MuAdam, set_base_shapes

    model = _mup_model(cfg, data, width, depth)
    base = _base_width(cfg)
    with torch.device("meta"):  # only their shapes are read
        base_model = _mup_model(cfg, data, base, depth)
        delta_model = _mup_model(cfg, data, 2 * base, depth)
    # PyTorch's default init already has variance ∝ 1/fan_in; rescale_params fixes the readout.
    set_base_shapes(model, base_model, delta=delta_model)
    model.to(device)
    return model, [MuAdam(model.parameters(), lr=lr)]


# ---- u-μP --------------------------------------------------------------------------------------


class _UnitBlock(nn.Module):
    """``x ↦ residual_add(|Linear(LayerNorm(x))|, x, τ)`` with unit-scaled layers."""

    def __init__(self, width: int, tau: float) -> None:
        import unit_scaling as uu

        super().__init__()
        self.tau = tau
        self.norm = uu.LayerNorm(width)
        self.linear = uu.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        import unit_scaling.functional as U

        residual, skip = U.residual_split(x, tau=self.tau)
        residual = self.linear(self.norm(residual)).abs()  # |N(0,1)| has unit RMS
        return U.residual_add(residual, skip, tau=self.tau)


class UnitResMLP(nn.Module):
    """The ResMLP of ``modnorm.baselines`` in u-μP: unit-scaled input layer, blocks in a
    ``DepthModuleList`` (their learning rates scale as 1/√depth), final LayerNorm and a
    ``LinearReadout``; residual weights from ``transformer_residual_scaling_rule``."""

    def __init__(self, in_features: int, out_features: int, width: int, num_blocks: int) -> None:
        import unit_scaling as uu

        super().__init__()
        rule = uu.transformer_residual_scaling_rule()
        self.input = uu.Linear(in_features, width)
        self.blocks = uu.DepthModuleList(
            [_UnitBlock(width, rule(i, num_blocks)) for i in range(num_blocks)]
        )
        self.norm = uu.LayerNorm(width)
        self.head = uu.LinearReadout(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def umup_adam(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    import unit_scaling as uu

    model = UnitResMLP(math.prod(data.in_shape), data.num_classes, width, depth).to(device)
    return model, [uu.optim.Adam(model.parameters(), lr=lr)]


# ---- Muon ----------------------------------------------------------------------------------------


class _FlatConv2d(nn.Module):
    """A ``Conv2d`` whose kernel is held as an ``(out, in·k·k)`` matrix, the shape
    ``torch.optim.Muon`` takes; the same function and initialization as ``conv``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r}: only 'zeros' is flattened")
        self.kernel = conv.weight.shape
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone())
        self.bias = conv.bias
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.view(self.kernel)
        return nn.functional.conv2d(x, w, self.bias, *self.args)


def _flatten_hidden_convs(model: nn.Module) -> None:
    """Every ``Conv2d`` but the first (the input layer) becomes a `_FlatConv2d`."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs[1:]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _FlatConv2d(conv))


def _hidden_matrices(model: nn.Module) -> Iterator[Tensor]:
    """Weights of the linear layers (and flattened convolutions) between the input layer (or
    embeddings) and the head."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
    inner = linears[:-1] if has_embedding else linears[1:-1]
    yield from (m.weight for m in inner)
    yield from (m.weight for m in model.modules() if isinstance(m, _FlatConv2d))


def muon(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    model = _plain(cfg, data, width, depth).to(device)
    return model, muon_optimizers(model, lr)


def muon_optimizers(model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """``muon``'s optimizers for a plain ``torch.nn`` model (whose hidden convolutions it
    flattens in place): ``torch.optim.Muon`` for the hidden matrices, AdamW for the rest."""
    _flatten_hidden_convs(model)
    hidden = list(_hidden_matrices(model))
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(rest, lr=lr)]
    if hidden:
        opts.append(torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="match_rms_adamw"))
    return opts


# ---- the reference Modula ------------------------------------------------------------------------


class ModulaNet(nn.Module):
    """A Modula module and its weight vector as an ``nn.Module``: the weights become this
    module's parameters, and the same tensors stay in Modula's ``Vector``."""

    def __init__(self, net: Any, device: str) -> None:
        from modula.vector import Vector

        super().__init__()
        self.net = net
        weights = net.initialize(device=device)
        self.params = nn.ParameterList(nn.Parameter(w.detach()) for w in weights)
        self.weights = Vector(list(self.params))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.weights)


class ModulaAdam(torch.optim.Optimizer):
    """The reference README's loop: Adam moments with its ``(1−β)^(t/(t+1))`` warm-up, the
    update normalized by ``net.normalize`` to modular norm ``lr``, then subtracted."""

    def __init__(self, model: ModulaNet, lr: float, betas: tuple[float, float] = (0.9, 0.99)):
        super().__init__(model.parameters(), dict(lr=lr, betas=betas))
        self.model = model
        self.t = 0
        self.mom1: Any = None
        self.mom2: Any = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        from modula.vector import Vector

        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        weights = self.model.weights
        grad = Vector([p.grad if p.grad is not None else torch.zeros_like(p) for p in weights])
        if self.mom1 is None:
            self.mom1, self.mom2 = 0 * grad, 0 * grad
        t = self.t
        self.mom1 += (1 - beta1) ** (t / (t + 1)) * (grad - self.mom1)
        self.mom2 += (1 - beta2) ** (t / (t + 1)) * (grad**2 - self.mom2)
        update = self.mom1 / self.mom2**0.5
        update.zero_nans()
        if group["lr"] > 0:
            self.model.net.normalize(update, target_norm=group["lr"])
            weights -= update
        self.t = t + 1


def modula_adam(
    cfg: ex.SweepConfig, data: Dataset, width: int, depth: int, lr: float, device: str
) -> Built:
    from modula import compound

    if cfg.model == "resmlp":
        net = compound.ResMLP(width, depth, 1, math.prod(data.in_shape), data.num_classes)
    elif cfg.model == "rescnn":
        net = compound.ResCNN(width, depth, 1, data.in_shape[0], data.num_classes)
    else:
        d_head = width // cfg.num_heads
        net = compound.GPT(
            data.num_classes, cfg.context, cfg.num_heads, width, d_head, d_head, depth
        )
    model = ModulaNet(net, device)
    return model, [ModulaAdam(model, lr)]


# ---- the registry ------------------------------------------------------------------------------

ALL_MODELS = ("resmlp", "rescnn", "gpt")
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("torch-adam", torch_adam, ALL_MODELS, note="torch.optim.Adam, default init"),
        Method("torch-adamw", torch_adamw, ALL_MODELS, note="torch.optim.AdamW, wd 0.01"),
        Method("mup-adam", mup_adam, ("resmlp", "rescnn"), ("mup",), "MuReadout + MuAdam"),
        Method("umup-adam", umup_adam, ("resmlp",), ("unit_scaling",), "unit_scaling + Adam"),
        Method("muon", muon, ALL_MODELS, ("torch.optim:Muon",), "torch.optim.Muon + AdamW"),
        # Modula's residual stack weights Identity by 1 − 1/L, and refuses 0 · Identity at L = 1.
        Method("modula-adam", modula_adam, ALL_MODELS, ("modula",), "reference Modula", 2),
        Method("modnorm-adam", modnorm_method("modnorm-adam"), ALL_MODELS),
        Method("modnorm-sgd", modnorm_method("modnorm-sgd"), ALL_MODELS),
        Method("modnorm-dual", modnorm_method("modnorm-dual"), ALL_MODELS),
        Method(
            "modnorm-dual-mixed",
            modnorm_dual_mixed,
            ALL_MODELS,
            note="modnorm-dual, Newton–Schulz in bfloat16 but for its last step",
        ),
        Method(
            "modnorm-dual-blocks20",
            modnorm_dual_gpt_blocks_mass(20.0),
            ("gpt",),
            note="modnorm-dual on GPT(blocks_mass=20) (benchmarks/gpt_gap.py)",
        ),
        Method(
            "modnorm-adam-logits4",
            modnorm_adam_head(output_scale=4.0),
            ("resmlp", "rescnn", "gpt"),
            note="output_scale=4: logits × 4 (benchmarks/adam_gap.py)",
        ),
        Method(
            "modnorm-adam-head8",
            modnorm_adam_head(head_mass=8.0),
            ("resmlp", "rescnn", "gpt"),
            note="head_mass=8: the head's share of each step ×8 (benchmarks/logit_scale.py)",
        ),
        Method(
            "modnorm-adam-affine",
            modnorm_adam_affine(0.25),
            ("rescnn",),  # the mass is the ResCNN's (rescnn_gap.py); the GPT's is untuned
            note="affine_mass=0.25: biases and gains as atoms (benchmarks/rescnn_gap.py)",
        ),
        Method(
            "modnorm-dual-unfolded",
            modnorm_dual_unfolded,
            ("rescnn",),
            note="affine_mass=0.25, unfolded=True: Muon's view of the blocks' kernels",
        ),
        Method(
            "modnorm-dual-unfolded-all",
            modnorm_dual_unfolded_all,
            ("rescnn",),
            note="as modnorm-dual-unfolded with the stem unfolded too (rescnn_gap.py)",
        ),
        Method(
            "modnorm-adam-split",
            modnorm_adam_split,
            ("resmlp",),
            note="masses by width: head width/d_in, blocks that /√2 (benchmarks/adam_split.py)",
        ),
        Method(
            "modnorm-adam-calibrated",
            modnorm_method("modnorm-adam", calibrate=True),
            ALL_MODELS,
            note="RMSDivide ν = 1/(input RMS at init)",
        ),
    ]
}

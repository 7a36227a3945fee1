"""Where the GPT's loss gap to Muon comes from (issue #6).

On the transfer benchmark's GPT width sweep (Shakespeare characters, 300 steps of 12 windows
of 64, linear decay, seed 0; the `models` suite) Muon on the ``torch.nn`` GPT reaches a
training loss of 1.805 at width 256, modnorm-dual 1.882 and modnorm-adam 2.185. This trains
one width under variants that each change one thing, on a small lr grid around each one's
best:

* the optimizer on modnorm's own GPT: ``torch.optim.Muon`` for the hidden matrices and AdamW
  for the embeddings and the head, as the ``muon`` method does on the ``torch.nn`` GPT;
* the network: more or less mass on the blocks (5 by default); nanoGPT's plain residuals
  ``x + block(x)``; token and position embeddings summed, not averaged; ``1/√d_head``
  attention scaling (modnorm's is ``1/d_head``); queries, keys and values not scaled by 1/3;
  biases and LayerNorm gains as atoms (``GPT(affine_mass=m)``, three masses, each kind alone);
* the references: ``muon`` on the ``torch.nn`` GPT (and on it without biases and LayerNorm
  gains, or initialized as modnorm's GPT), modnorm-dual and modnorm-adam.

    python -m benchmarks.gpt_gap --jobs 2               # about 20 minutes on 2 cores
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import peers
from benchmarks.adam_gap import Job, ablate, train_row
from benchmarks.transfer import SUITES
from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.atoms import Bias, Embedding, Gain, Linear
from modnorm.bonds import (
    CausalAttention,
    Identity,
    LayerNorm,
    MergeHeads,
    Mul,
    Positions,
    ScaledGELU,
    SplitHeads,
)
from modnorm.modules import Module, TupleModule

CONFIG = next(s.config for s in SUITES["models"] if s.name == "gpt-width")

Builder = Callable[[ex.SweepConfig, Any, int, int, float, str], Any]


class _SqrtAttention(CausalAttention):
    """Causal attention with the usual ``1/√d_head`` scaling."""

    def forward(self, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        q, k, v = x
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gpt(
    vocab: int,
    context: int,
    width: int,
    heads: int,
    blocks: int,
    residual: str = "convex",
    embed: str = "half",
    attention: str = "1/d",
    qkv_scale: float = 1 / 3,
) -> Module:
    """modnorm's GPT (the defaults: `compounds.GPT`, its weights drawn in the same order) with
    a part changed that `compounds.GPT` has no option for."""
    tok, pos = Embedding(vocab, width), Embedding(context, width) @ Positions()
    embedding = 0.5 * tok + 0.5 * pos if embed == "half" else tok + pos
    embedding.tare(1.0)
    q, k, v = (SplitHeads(heads) @ Linear(width, width) for _ in range(3))
    out = Linear(width, width) @ MergeHeads(heads)
    bond = CausalAttention() if attention == "1/d" else _SqrtAttention()
    attn = out @ bond @ Mul(qkv_scale) @ TupleModule(q, k, v) @ LayerNorm()
    mlp = Linear(4 * width, width) @ ScaledGELU() @ Linear(width, 4 * width) @ LayerNorm()
    if residual == "convex":  # (1 − 1/(2L))·x + 1/(2L)·block(x)
        share = 1 / (2 * blocks)
        block = compounds._residual(mlp, blocks, share) @ compounds._residual(attn, blocks, share)
    else:  # x + block(x), as nanoGPT
        block = (Identity() + mlp) @ (Identity() + attn)
    stack = block**blocks
    stack.tare(5.0)
    return Linear(width, vocab) @ LayerNorm() @ stack @ embedding


def _variant(**kw: Any) -> Builder:
    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = gpt(data.num_classes, cfg.context, width, cfg.num_heads, depth, **kw)
        return net, [mn_optim.Dual(net, lr)]

    return build


def muon_on_modnorm_gpt(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
    """``muon``'s split on modnorm's GPT: Muon for every Linear but the head, AdamW for the
    embeddings and the head (the same lr for both, as the ``muon`` method)."""
    net = cast(Module, ex.build_model(cfg, "modnorm-dual", width, depth, data))
    atoms = [a for a, _ in net.atom_shares()]
    head = atoms[-1]
    hidden = [a.weight for a in atoms if not isinstance(a, Embedding) and a is not head]
    rest = [a.weight for a in atoms if isinstance(a, Embedding) or a is head]
    muon = torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="match_rms_adamw")
    return net, [torch.optim.AdamW(rest, lr=lr), muon]


def muon_without_biases_or_gains(
    cfg: Any, data: Any, width: int, depth: int, lr: float, device: str
) -> Any:
    """``muon`` on the ``torch.nn`` GPT with its biases held at 0 and its LayerNorm gains at 1
    (as modnorm's GPT, which has neither)."""
    model = peers._plain(cfg, data, width, depth)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
                m.bias.zero_()
                m.bias.requires_grad_(False)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.requires_grad_(False)
    hidden = list(peers._hidden_matrices(model))
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    muon = torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="match_rms_adamw")
    return model, [torch.optim.AdamW(rest, lr=lr), muon]


def muon_with_modnorms_init(
    cfg: Any, data: Any, width: int, depth: int, lr: float, device: str
) -> Any:
    """``muon`` on the ``torch.nn`` GPT initialized as modnorm's: every Linear weight
    ``√(out/in)`` times an orthogonal matrix (modnorm's scale factor folded in), every
    embedding row of RMS 1; biases and gains as PyTorch sets them."""
    model, opts = peers.muon(cfg, data, width, depth, lr, device)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.orthogonal_(m.weight)
                m.weight.mul_((m.out_features / m.in_features) ** 0.5)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.div_(m.weight.square().mean(1, keepdim=True).sqrt())
    return model, opts


def _affine_frozen(
    cfg: Any, data: Any, width: int, depth: int, lr: float, device: str, *, frozen: type
) -> Any:
    """modnorm-dual on the GPT with biases and gains of mass 0.25, the atoms of type
    ``frozen`` (`Bias` or `Gain`) of mass 0: held at their start (0 or 1), taking no share."""
    net, opts = peers.modnorm_dual_gpt_affine(0.25)(cfg, data, width, depth, lr, device)
    for atom, _ in net.atom_shares():
        if isinstance(atom, frozen):
            atom.mass = 0.0
    return net, opts


Variant = tuple[Builder, list[int]]
VARIANTS: dict[str, Variant] = {
    "muon on the torch.nn GPT": (peers.muon, [-8, -7, -6, -5, -4]),
    "muon on the torch.nn GPT without biases or gains": (
        muon_without_biases_or_gains,
        [-9, -8, -7, -6, -5, -4],
    ),
    "muon on the torch.nn GPT with modnorm's init": (
        muon_with_modnorms_init,
        [-8, -7, -6, -5, -4],
    ),
    "Muon + AdamW on modnorm's GPT": (muon_on_modnorm_gpt, [-8, -7, -6, -5, -4, -3, -2]),
    "modnorm-dual": (peers.modnorm_method("modnorm-dual"), [-4, -3, -2, -1, 0]),
    "modnorm-adam": (peers.modnorm_method("modnorm-adam"), [-2, -1, 0, 1]),
    "modnorm-dual with blocks mass 20": (
        peers.modnorm_dual_gpt_blocks_mass(20.0),
        [-4, -3, -2, -1, 0],
    ),
    "modnorm-dual with blocks mass 1": (
        peers.modnorm_dual_gpt_blocks_mass(1.0),
        [-3, -2, -1, 0, 1],
    ),
    "modnorm-dual with blocks mass 80": (
        peers.modnorm_dual_gpt_blocks_mass(80.0),
        [-4, -3, -2, -1],
    ),
    "modnorm-dual with biases and gains of mass 1": (
        peers.modnorm_dual_gpt_affine(1.0),
        [-4, -3, -2, -1, 0],
    ),
    "modnorm-dual with biases and gains of mass 0.25": (
        peers.modnorm_dual_gpt_affine(0.25),
        [-4, -3, -2, -1, 0],
    ),
    "modnorm-dual with biases and gains of mass 0.05": (
        peers.modnorm_dual_gpt_affine(0.05),
        [-4, -3, -2, -1, 0],
    ),
    "modnorm-dual with biases of mass 0.25 (gains held at 1)": (
        functools.partial(_affine_frozen, frozen=Gain),
        [-3, -2, -1],
    ),
    "modnorm-dual with gains of mass 0.25 (biases held at 0)": (
        functools.partial(_affine_frozen, frozen=Bias),
        [-3, -2, -1],
    ),
    "modnorm-dual with plain residuals": (_variant(residual="plain"), [-2, -1, 0, 1, 2, 3]),
    "modnorm-dual with tok + pos embeddings": (_variant(embed="sum"), [-3, -2, -1, 0]),
    "modnorm-dual with unscaled qkv": (_variant(qkv_scale=1.0), [-3, -2, -1, 0]),
    "modnorm-dual with 1/sqrt(d) attention": (
        _variant(attention="1/sqrt(d)"),
        [-6, -5, -4, -3, -2],
    ),
}


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    cfg = replace(CONFIG, depth=blocks, steps=steps)
    return train_row(job, cfg, mn_data.load(cfg.data), VARIANTS[name][0])


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        {name: grid for name, (_, grid) in VARIANTS.items()},
        run,
        256,
        Path(__file__).parent / "results" / "gpt_gap",
        lambda w, b, n: (
            f"GPT width {w}, {b} blocks, Shakespeare; train loss (last 10 % of {n} "
            f"steps of {CONFIG.batch_size} × {CONFIG.context} characters)"
        ),
        CONFIG.steps,
    )


if __name__ == "__main__":
    main()

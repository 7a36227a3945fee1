"""Tensor parallelism for modnorm's atoms: ``torch.distributed.tensor.parallel``'s styles,
taught to shard :class:`modnorm.Linear` and :class:`modnorm.Embedding` (and, with the
features of a Linear cut by rows, :class:`modnorm.Bias` and :class:`modnorm.Gain`).

PyTorch's ``ColwiseParallel`` and ``RowwiseParallel`` accept only ``nn.Linear`` and
``nn.Embedding``; modnorm's atoms keep their weights in the same layout (``(out, in)`` and
``(vocab, dim)``) and compute with ``F.linear``/``F.embedding``, so the same partitions apply.
Use them with ``parallelize_module`` as PyTorch's::

    from torch.distributed.tensor.parallel import parallelize_module
    from modnorm.parallel import ColwiseParallel, RowwiseParallel

    net = mn.Linear(4 * d, d) @ mn.GELU() @ mn.Linear(d, 4 * d)
    parallelize_module(net, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(net, mesh=mesh["dp"])  # optional: FSDP2 over the other dimension

The optimizers then see DTensors sharded over one or two mesh dimensions; the norms and dual
maps stay those of the full matrices (:mod:`modnorm.distributed`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel as _Colwise
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
)
from torch.distributed.tensor.parallel import RowwiseParallel as _Rowwise

from modnorm.atoms import Bias, Embedding, Gain, Linear
from modnorm.bonds import CausalAttention, MergeHeads, Mul, SplitHeads, _Elementwise
from modnorm.modules import Atom, Compose, Module, TupleModule

__all__ = ["ColwiseParallel", "RowwiseParallel", "megatron_plan"]


def _kind(module: nn.Module, style: str) -> str:
    """How a style cuts ``module`` (as a Linear, an Embedding or, by columns only, a vector
    atom); a clear error for anything else."""
    if isinstance(module, (Linear, nn.Linear)):
        return "linear"
    if isinstance(module, (Embedding, nn.Embedding)):
        return "embedding"
    vector = isinstance(module, (Bias, Gain))
    if isinstance(module, (Bias, Gain)) and module.dim != -1:  # a Linear's rows: the last dim
        raise ValueError(f"{style} cuts a Bias or Gain on the last dimension, not {module._name()}")
    if vector and style == "ColwiseParallel":
        return "vector"
    what = module._name() if isinstance(module, Atom) else type(module).__name__
    cuts = (
        "Linear, Embedding, Bias or Gain" if style == "ColwiseParallel" else "Linear or Embedding"
    )
    hint = (
        "cut it with ColwiseParallel, as the Linear before it"
        if vector
        else "leave it out of the plan (it stays replicated) or shard it with fully_shard"
    )
    raise ValueError(f"{style} shards a modnorm {cuts} (or torch's), not {what}: {hint}")


def _distribute(
    style: _Colwise | _Rowwise,
    module: nn.Module,
    mesh: DeviceMesh,
    partition: Any,
    inputs: tuple[tuple[Placement, ...], tuple[Placement, ...]] | None = None,
) -> nn.Module:
    """What torch's styles do once they have picked the partition: cut the weights, and
    lay the inputs (given, desired: the style's unless ``inputs``) and outputs out as the
    style says."""
    given, desired = inputs or (style.input_layouts, style.desired_input_layouts)
    return distribute_module(
        module,
        mesh,
        partition,
        partial(style._prepare_input_fn, given, desired),
        partial(style._prepare_output_fn, style.output_layouts, style.use_local_output),
    )


class ColwiseParallel(_Colwise):
    """PyTorch's ``ColwiseParallel`` (output features sharded: the weight's rows of a
    Linear, an Embedding's columns) for modnorm's atoms too. On a `Bias` or `Gain` it
    continues the cut of the Linear before it: the vector is cut as the features are, and
    its input is by default that Linear's slice of them (``input_layouts=Shard(-1)``)."""

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__(
            input_layouts=input_layouts,
            output_layouts=output_layouts,
            use_local_output=use_local_output,
        )
        self._vector_input = (input_layouts or Shard(-1),)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        kind = _kind(module, "ColwiseParallel")
        if kind == "embedding":
            return _distribute(self, module, device_mesh, self._partition_embedding_fn)
        # a vector's (d,) weight is cut by Shard(0), as a Linear's bias is
        inputs = (self._vector_input, (Shard(-1),)) if kind == "vector" else None
        return _distribute(self, module, device_mesh, self._partition_linear_fn, inputs)


class RowwiseParallel(_Rowwise):
    """PyTorch's ``RowwiseParallel`` (input features sharded: the weight's columns of a
    Linear, an Embedding's rows; the outputs summed) for modnorm's atoms too."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        kind = _kind(module, "RowwiseParallel")
        if kind == "linear":
            partition = self._partition_linear_fn
            self.desired_input_layouts = (Shard(-1),)  # as torch's: the input's features cut
        else:
            partition = self._partition_embedding_fn
            self.desired_input_layouts = (Replicate(),)  # as torch's: every index everywhere
        return _distribute(self, module, device_mesh, partition)


def megatron_plan(module: Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """A plan for ``parallelize_module``: Megatron's cuts of the hidden matrices, found in the
    architecture. An attention's query, key and value Linears (each into `SplitHeads` with a
    ``head_dim``) are cut by rows, so that each rank holds whole heads, and the Linear after
    its `MergeHeads` by columns; two Linears with only elementwise bonds between them (an
    MLP) are cut by rows, then columns. A `Bias` or `Gain` between a row-cut Linear and what
    follows it is cut with the features. Everything else (embeddings, the head, the other
    vector atoms) stays whole: add entries for it, or shard it with FSDP2. The number of
    heads and the hidden widths must divide by the ``tp`` mesh size.

    With ``sequence_parallel`` the residual stream between the cut blocks is cut along the
    positions (dimension 1) as well, as in Megatron's sequence parallelism: the cut Linears
    all-gather it and reduce-scatter back into it; it is sliced where it enters the first cut
    block and gathered where it leaves the last one.
    Every atom between them must be cut (a `LayerNorm`'s `Gain`, or a `Bias` after a summed
    output, would see one rank's positions only): otherwise a `ValueError` names it."""
    plan: dict[str, ParallelStyle] = {}
    for name, node in module.named_modules():
        if not isinstance(node, Compose):
            continue
        prefix = f"{name}." if name else ""
        steps = list(node.named_children())
        for i, (key, child) in enumerate(steps):
            if isinstance(child, TupleModule) and i + 4 <= len(steps):
                heads = [_head_linear(branch) for branch in child.children()]
                after = [c for _, c in steps[i + 1 : i + 5]]
                tail = after[1:] if after and isinstance(after[0], Mul) else after
                if (
                    heads
                    and all(h is not None for h in heads)
                    and len(tail) >= 3
                    and isinstance(tail[0], CausalAttention)
                    and isinstance(tail[1], MergeHeads)
                    and isinstance(tail[2], Linear)
                ):
                    for b, names in enumerate(heads):
                        for n in names or ():
                            plan[f"{prefix}{key}.{b}.{n}"] = ColwiseParallel()
                    out = steps[i + 1 + after.index(tail[2])][0]
                    plan[f"{prefix}{out}"] = RowwiseParallel()
            if isinstance(child, Linear) and f"{prefix}{key}" not in plan:
                j = i + 1
                while j < len(steps) and isinstance(steps[j][1], (_Elementwise, Bias, Gain)):
                    j += 1
                if j > i + 1 and j < len(steps) and isinstance(steps[j][1], Linear):
                    plan[f"{prefix}{key}"] = ColwiseParallel()
                    for between, step in steps[i + 1 : j]:
                        if isinstance(step, (Bias, Gain)):
                            plan[f"{prefix}{between}"] = ColwiseParallel()
                    plan[f"{prefix}{steps[j][0]}"] = RowwiseParallel()
    return _sequence_parallel(module, plan) if sequence_parallel else plan


def _sequence_parallel(module: Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """``plan`` with the residual stream between its first and last cut top-level modules cut
    along the positions (see `megatron_plan`)."""
    top = list(module.named_children()) if isinstance(module, Compose) else []
    cut = [i for i, (key, _) in enumerate(top) if any(n.split(".")[0] == key for n in plan)]
    if not cut:
        raise ValueError(f"sequence parallelism: megatron_plan cuts nothing in {module._name()}")
    first, last = cut[0], cut[-1]
    end = last + 1 if isinstance(top[last][1], TupleModule) else last
    if end == len(top) or top[first][0] in plan or top[end][0] in plan:
        raise ValueError(
            "sequence parallelism needs the cut Linears inside blocks (residual tuples, as in "
            f"GPT), with a module after the last one to merge its outputs; {module._name()} "
            "has its cuts at the top level or nothing after them"
        )
    for key, child in top[first : last + 1]:
        for name, atom in child.named_modules():
            full = f"{key}.{name}" if name else key
            if isinstance(atom, Atom) and full not in plan:
                raise ValueError(
                    f"sequence parallelism: {atom._name()} at {full!r} is not cut with the "
                    "features, so its gradient would come from one rank's positions only "
                    "(leave it out of the network, or use sequence_parallel=False)"
                )
    out: dict[str, ParallelStyle] = {}
    for name, style in plan.items():
        if isinstance(style, RowwiseParallel):  # reduce-scattered back into the stream
            out[name] = RowwiseParallel(output_layouts=Shard(1))
        elif isinstance(module.get_submodule(name), Linear):  # reads the stream: all-gathered
            out[name] = ColwiseParallel(input_layouts=Shard(1))
        else:
            out[name] = style
    # the stream is sliced where it enters the first cut block, and gathered where it leaves
    # the last one: at its output, or at the merge after it (a residual tuple's `Add`)
    out[top[first][0]] = PrepareModuleInput(
        input_layouts=Replicate(), desired_input_layouts=Shard(1), use_local_output=True
    )
    out[top[end][0]] = PrepareModuleOutput(
        output_layouts=Shard(1), desired_output_layouts=Replicate()
    )
    return out


def _head_linear(branch: nn.Module) -> list[str] | None:
    """The names of the Linear and of the vector atoms after it in a ``SplitHeads(h,
    head_dim) ∘ [Bias | Gain …] ∘ Linear`` branch, else None."""
    steps = list(branch.named_children()) if isinstance(branch, Compose) else []
    if (
        len(steps) >= 2
        and isinstance(steps[0][1], Linear)
        and all(isinstance(step, (Bias, Gain)) for _, step in steps[1:-1])
        and isinstance(steps[-1][1], SplitHeads)
        and steps[-1][1].head_dim is not None
    ):
        return [name for name, _ in steps[:-1]]
    return None

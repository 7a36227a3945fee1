"""Tensor parallelism for modnorm's atoms: ``torch.distributed.tensor.parallel``'s styles,
taught to shard :class:`modnorm.Linear` and :class:`modnorm.Embedding`.

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

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel as _Colwise
from torch.distributed.tensor.parallel import RowwiseParallel as _Rowwise

from modnorm.atoms import Embedding, Linear
from modnorm.modules import Atom

__all__ = ["ColwiseParallel", "RowwiseParallel"]


def _kind(module: nn.Module, style: str) -> str:
    """ "linear" or "embedding", or a clear error for what the style cannot shard."""
    if isinstance(module, (Linear, nn.Linear)):
        return "linear"
    if isinstance(module, (Embedding, nn.Embedding)):
        return "embedding"
    what = module._name() if isinstance(module, Atom) else type(module).__name__
    raise ValueError(
        f"{style} shards a modnorm Linear or Embedding (or torch's), not {what}: "
        "leave it out of the plan (it stays replicated) or shard it with fully_shard"
    )


class ColwiseParallel(_Colwise):
    """PyTorch's ``ColwiseParallel`` (output features sharded: the weight's rows of a
    Linear, an Embedding's columns) for modnorm's atoms too."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        kind = _kind(module, "ColwiseParallel")
        partition = self._partition_linear_fn if kind == "linear" else self._partition_embedding_fn
        return distribute_module(
            module,
            device_mesh,
            partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


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
        return distribute_module(
            module,
            device_mesh,
            partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )

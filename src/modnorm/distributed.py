"""The modular norm of sharded parameters (FSDP2's DTensors, ``torch.distributed``).

Under DistributedDataParallel nothing here is needed: every rank holds the full weights and,
after DDP's all-reduce, the same gradient, so each computes the same norm and update.

Under FSDP2 (``fully_shard``) a parameter is a DTensor of which each rank holds a slice, but
the norm of an atom is global: the spectral norm of a sharded matrix is not the largest of its
slices' norms. So :meth:`modnorm.Module.norm`, ``normalize`` and ``dualize`` send DTensors
here, and the atoms are split across ranks (as scalable Muon implementations split their
matrices), balanced by the cost of their dual maps: each atom of positive share belongs to
one rank, which gathers its full tensor and runs the single-process code on it. An atom
costing more than an even share (a large vocabulary's head) is computed by every rank on its
own slice of the matrix's longer side instead, through all-reduced Gram matrices of the
shorter side (`_split_atoms`).

* **norm / normalize**: the owner computes the atom's norm (batched, warm-started Lanczos);
  one all-reduce shares the norms, and each rank scales its own slices.
* **dualize**: the owner computes the dual map (Newton–Schulz, batched by shape) and
  scatters it back in slices.

Gathering, not a distributed power iteration: a sharded Lanczos needs two latency-bound
collectives per iteration (``Aᵀu`` and the reorthogonalization) over 4 to tens of iterations,
and the dual map needs the whole matrix anyway; a gather is one collective per atom. The
warm starts live on the owners; :func:`share_warm_starts` copies them everywhere for a state
dict. The work happens in one layout (`_canonical`): every tensor cut over at most one
dimension of the device mesh, ``Shard(d)`` (any ``d``), and replicated over the others. That
is what ``fully_shard`` makes on a 1-D mesh, and HSDP's ``(Replicate(), Shard(0))`` on a 2-D
one, where the replicas split the atoms too: each atom is computed in one replica (gathered
among its ranks), which broadcasts its slices of the dual map to the same ranks of the others;
the norms are all-reduced over both dimensions. (Split atoms are still computed in every
replica.) Tensor parallelism (:mod:`modnorm.parallel`), alone or with FSDP2, cuts tensors over
two dimensions: they are all-gathered over the first, computed as under HSDP, and cut again.

:func:`save_checkpoint` / :func:`load_checkpoint` save and resume a modnorm optimizer and its
module with ``torch.distributed.checkpoint`` (sharded, resumable on any number of ranks), and
:func:`init_from_env` joins the process group that ``torchrun`` launched.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from modnorm.atoms import _MatrixAtom as _MatrixAtomT
    from modnorm.modules import Atom, Module

__all__ = [
    "PendingSave",
    "any_sharded",
    "dualize",
    "gather",
    "global_sums",
    "init_from_env",
    "load_checkpoint",
    "norm",
    "normalize",
    "save_checkpoint",
    "save_checkpoint_async",
    "share_warm_starts",
]


def any_sharded(tensors: Sequence[object]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a parameter or gradient under FSDP2)."""
    # Importing torch.distributed.tensor takes ~0.7 s: until someone has, no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or isinstance(tensors, Tensor):  # one tensor: the caller's error
        return False
    return any(isinstance(t, module.DTensor) for t in tensors)


def _layout(tensors: Sequence[Tensor]) -> tuple[Any, int] | None:
    """The DTensors' device mesh (the root mesh where some live on a submesh of it) and the
    dimension of it the canonical layout (`_canonical`) shards over: the last one over which
    some tensor is sharded (tensor parallel's, under FSDP2 with TP), or the last one if none
    is; ``None`` without DTensors; a clear error for other layouts. From placements only."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dtensors = [(i, t) for i, t in enumerate(tensors) if isinstance(t, DTensor)]
    if not dtensors:
        return None
    for i, t in dtensors:
        for p in t.placements:
            if not (_is_cut(p) or isinstance(p, Replicate)):
                raise ValueError(
                    f"tensor {i} has placement {p!r}: modnorm supports Shard(dim) and Replicate "
                    "(a Partial tensor must be reduced first)"
                )
    mesh = _root_mesh(dtensors)
    lifted = [_lifted(t, mesh) for _, t in dtensors]
    plain = {d for ps in lifted for d, p in enumerate(ps) if isinstance(p, Shard)}
    cut = {d for ps in lifted for d, p in enumerate(ps) if _is_cut(p)}
    return mesh, max(plain or cut, default=mesh.ndim - 1)


def _is_cut(placement: Any) -> bool:
    """``Shard(d)``, or the ``_StridedShard(d)`` FSDP2 makes of a tensor-parallel ``Shard(d)``
    (a private class, matched by name)."""
    from torch.distributed.tensor import Shard

    return isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard"


def _root_mesh(dtensors: Sequence[tuple[int, Any]]) -> Any:
    """The one mesh of all the DTensors, or the root mesh of which each lives on a named
    submesh (FSDP2 on ``mesh["dp"]`` puts the tensor-parallel parameters on the 2-D mesh and
    the others on the 1-D one)."""
    i0, t0 = dtensors[0]
    mesh = t0.device_mesh
    if all(t.device_mesh == mesh for _, t in dtensors):
        return mesh
    root = getattr(mesh, "_get_root_mesh", lambda: None)()
    names = root.mesh_dim_names if root is not None else None
    for i, t in dtensors:
        sub = t.device_mesh
        if t.device_mesh == root:
            continue
        lifts = (
            names is not None
            and getattr(sub, "_get_root_mesh", lambda: None)() == root
            and sub.mesh_dim_names is not None
            and set(sub.mesh_dim_names) <= set(names)
        )
        if not lifts:
            raise ValueError(
                f"tensor {i} lives on another device mesh than tensor {i0}'s, and not on a "
                "named submesh of one root mesh: put every parameter on one mesh"
            )
    return root


def _lifted(t: Any, mesh: Any) -> list[Any]:
    """``t``'s placements over the dimensions of ``mesh`` (Replicate over those of its own
    submesh lacks: its ranks there hold the same slice)."""
    from torch.distributed.tensor import Replicate

    if t.device_mesh == mesh:
        return list(t.placements)
    own = t.device_mesh.mesh_dim_names
    return [
        t.placements[own.index(name)] if name in own else Replicate()
        for name in mesh.mesh_dim_names
    ]


def _canonical(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The DTensors laid out as the rest of this module works on them: on one mesh, sharded
    over at most its dimension ``k`` of `_layout` and replicated over the others. FSDP2's and
    HSDP's layouts already are (nothing moves); under tensor parallelism with FSDP2 (say
    ``(_StridedShard(0), Shard(0))`` on a ``(dp, tp)`` mesh) a tensor is all-gathered over the
    other dimensions, so each rank holds its tensor-parallel slice, and the ``dp`` ranks split
    the atoms as HSDP's replicas do. A tensor sharded only elsewhere moves its cut to ``k``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    layout = _layout(tensors)
    if layout is None:
        return list(tensors)
    mesh, k = layout
    out = []
    for t in tensors:
        if not isinstance(t, DTensor):
            out.append(t)
            continue
        placements = _lifted(t, mesh)
        target: list[Any] = [Replicate()] * mesh.ndim
        cuts = [p.dim for p in placements if _is_cut(p)]
        if isinstance(placements[k], Shard):
            target[k] = placements[k]
        elif cuts:
            target[k] = Shard(cuts[-1])
        if t.device_mesh != mesh:
            t = DTensor.from_local(
                t.to_local(), mesh, placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        out.append(t if list(t.placements) == target else t.redistribute(mesh, target))
    return out


def _restore(out: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """``out`` (in the canonical layout) laid out as ``like`` again: this rank's slices cut
    from what it holds (no communication: the canonical layout replicates what ``like``
    shards further)."""
    from torch.distributed.tensor import DTensor

    restored = []
    for o, t in zip(out, like, strict=True):
        if isinstance(o, DTensor) and isinstance(t, DTensor):
            o = o.redistribute(o.device_mesh, _lifted(t, o.device_mesh))
            if t.device_mesh != o.device_mesh:
                o = DTensor.from_local(
                    o.to_local(),
                    t.device_mesh,
                    t.placements,
                    run_check=False,
                    shape=t.shape,
                    stride=t.stride(),
                )
        restored.append(o)
    return restored


class _Groups:
    """Where the DTensors live (checked once): the ``shards`` group (one replica's ranks) and,
    under HSDP (a 2-D mesh whose other dimension has several ranks), the ``replicas`` group
    of this rank's counterparts, which hold the same slices. ``worker``/``workers`` number
    the ranks for `_owners`: rank ``r`` of replica ``ρ`` is worker ``r + ρ·S``."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        layout = _layout(tensors)
        assert layout is not None  # the callers only come here with a DTensor
        mesh, dim = layout
        self.shards = mesh.get_group(dim)
        hsdp = mesh.ndim == 2 and mesh.size(1 - dim) > 1
        self.replicas = mesh.get_group(1 - dim) if hsdp else None
        self.size = dist.get_world_size(self.shards)
        self.rank = dist.get_rank(self.shards)
        self.replica = 0 if self.replicas is None else dist.get_rank(self.replicas)
        copies = 1 if self.replicas is None else dist.get_world_size(self.replicas)
        self.workers, self.worker = self.size * copies, self.rank + self.size * self.replica


def _shard(t: Tensor) -> tuple[int, int] | None:
    """(mesh dimension, tensor dimension) of a DTensor's first ``Shard`` (its one, in the
    canonical layout); ``None`` if it has none or is a plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        for d, p in enumerate(t.placements):
            if _is_cut(p):
                return d, cast(Any, p).dim
    return None


def gather(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Full tensors on every rank: DTensors all-gathered, plain tensors (replicated) as they
    are. For diagnostics such as :meth:`Module.dual_norm`; the optimizers do not need it."""
    from torch.distributed.tensor import DTensor

    _layout(tensors)
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def global_sums(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of each tensor in float32 (NaN or ±∞ if any entry is), stacked; for DTensors
    the sum over all slices, by one all-reduce of the stacked local sums per mesh dimension
    that cuts some tensor (one under FSDP2, two under FSDP2 with tensor parallelism)."""
    if not any_sharded(tensors):
        device = tensors[0].device
        return torch.stack([t.sum().float().to(device) for t in tensors])
    from torch.distributed.tensor import DTensor

    layout = _layout(tensors)
    assert layout is not None
    mesh = layout[0]
    locals_ = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    device = locals_[0].device
    sums = torch.stack([t.sum().float().to(device) for t in locals_])
    placements = [_lifted(t, mesh) if isinstance(t, DTensor) else [] for t in tensors]
    for d in range(mesh.ndim):  # a tensor cut over a dimension: its parts there add up
        cut = [any(_is_cut(p) for p in ps[d : d + 1]) for ps in placements]
        if not any(cut):
            continue
        mask = torch.tensor(cut, device=device)
        part = torch.where(mask, sums, 0.0)
        dist.all_reduce(part, group=mesh.get_group(d))
        sums = torch.where(mask, part, sums)
    return sums


def _owners(
    module: Module, world: int, split: frozenset[int] = frozenset(), size: int | None = None
) -> dict[int, int]:
    """Atom index → the worker (of ``world``) that computes its norm and dual map, for the
    atoms of positive share (mass-0 atoms never move, so nothing is computed for them).
    Balanced by cost: largest first, each to the least loaded worker (ties: the lower), so
    that a GPT's ``4d × d`` MLP matrices and its ``vocab × d`` head do not pile up on one
    rank. The same on every rank: it depends only on the shapes. Under HSDP worker ``w`` is
    rank ``w % S`` of replica ``w // S`` (``S = size`` ranks a replica), so the replicas share
    the work too. A ``split`` atom is computed by all ``S`` ranks of one replica together:
    placed first, it maps to that replica's first worker and loads each of its ranks by a
    1/S of its cost."""
    shares = module.atom_shares()
    live = [i for i, (_, share) in enumerate(shares) if share > 0]
    size = size or world
    load = [0.0] * world
    owners: dict[int, int] = {}
    for i in sorted(live, key=lambda i: (i not in split, -_cost(shares[i][0]))):  # stable
        cost = _cost(shares[i][0])
        if i in split:
            first = min(range(0, world, size), key=lambda w: sum(load[w : w + size]))
            owners[i] = first
            for w in range(first, first + size):
                load[w] += cost / size
        else:
            owners[i] = min(range(world), key=load.__getitem__)
            load[owners[i]] += cost
    return dict(sorted(owners.items()))


def _cost(atom: Atom) -> int:
    """Multiply-adds of the atom's dual map, roughly: Newton–Schulz on the ``m × n``
    matrices of a Linear or Conv2d costs ``size·min(m, n)``; anything else (row
    normalization) its size. From the global shapes only: no tensor is touched."""
    from modnorm.atoms import _MatrixAtom

    size = sum(p.numel() for p in atom.parameters())
    if isinstance(atom, _MatrixAtom):
        return size * min(atom._mat_shape())
    return size


def _split_atoms(module: Module, tensors: Sequence[Tensor], world: int) -> frozenset[int]:
    """The sharded Linear or Conv2d atoms that every rank works on together instead of one
    owner: those costing more than an even share of the dual maps (one rank would be the
    bottleneck, and would hold the whole matrix). Each rank holds a slice of the matrix's
    longer side (`_columns`), so the Gram matrix of the shorter side (say ``WᵀW`` of a tall
    ``W``) is the sum of the ranks' parts: the norm is ``√λ_max`` of that sum, and
    Newton–Schulz needs one all-reduce of it per iteration while each rank updates its own
    slice."""
    from modnorm.atoms import _MatrixAtom

    shares = module.atom_shares()
    live = [i for i, (_, share) in enumerate(shares) if share > 0]
    total = sum(_cost(shares[i][0]) for i in live)
    split = set()
    for i in live:
        atom = shares[i][0]
        if world < 2 or not isinstance(atom, _MatrixAtom) or _cost(atom) * world <= total:
            continue
        if _sharded_dim(tensors[i]) is not None:
            split.add(i)
    return frozenset(split)


def _columns(atom: Atom, t: Tensor) -> tuple[Tensor, Tensor, int]:
    """A split atom's matrices oriented ``(P, short, long)``, of which this rank holds some
    columns (a slice of the longer side); the DTensor ``t`` sharded that way; and the weight
    dimension of the longer side (0: out, 1: in). A matrix sharded along another dimension
    (FSDP2 shards rows, so a wide matrix) is first resharded (an all-to-all) so that the
    Gram matrix summed across ranks is the small one."""
    from torch.distributed.tensor import DTensor, Shard

    from modnorm.linalg import _compute_dtype

    assert isinstance(t, DTensor)
    rows, cols = cast("_MatrixAtomT", atom)._mat_shape()  # an unfolded Conv2d's: (out, in·k²)
    long = 0 if rows >= cols else 1
    where = _shard(t)
    assert where is not None  # split atoms are sharded
    if where[1] != long:
        placements = list(t.placements)
        placements[where[0]] = Shard(long)
        t = t.redistribute(t.device_mesh, placements)
    local = t.to_local()
    mats = cast("_MatrixAtomT", atom)._mats(local).to(_compute_dtype(local))
    return (mats.mT if long == 0 else mats), t, long


def _summed(group: dist.ProcessGroup) -> Callable[[Tensor], Tensor]:
    def reduce(t: Tensor) -> Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=group)
        return t

    return reduce


def _split_norms(
    module: Module, tensors: Sequence[Tensor], split: Sequence[int], group: dist.ProcessGroup
) -> list[Tensor]:
    """The norms of the ``split`` atoms, the same on every rank: the largest eigenvalue of
    each matrix's all-reduced Gram matrix of its shorter side (Lanczos, warm-started),
    square-rooted. The warm starts stay right singular vectors, as on one process."""
    from modnorm.linalg import spectral_norms_batches

    atoms = [cast("_MatrixAtomT", module.atom_shares()[i][0]) for i in split]
    grams, warms, sides = [], [], []
    for atom, i in zip(atoms, split, strict=True):
        x, _, long = _columns(atom, tensors[i])
        grams.append(_summed(group)(x @ x.mT))
        cols = atom._mat_shape()[1]  # in, or in·k² for an unfolded Conv2d
        v = atom._v if atom._v.shape == (x.shape[0], cols) else None
        if v is not None and long == 1:  # WWᵀ's eigenvectors are left ones: u = W v
            unit = cols // atom.weight.shape[1]  # a rank holds whole input channels
            start = _offset(atom.weight.shape[1], group) * unit
            mine = v.to(x).narrow(1, start, x.shape[-1])
            v = _summed(group)((x @ mine[..., None])[..., 0])
        warms.append(v)
        sides.append((x, long))
    out = []
    for atom, (sigma, v), (x, long) in zip(
        atoms, spectral_norms_batches(grams, warms), sides, strict=True
    ):
        if long == 1:  # back to the right ones: v = Wᵀu, each rank its columns, gathered
            n = atom.weight.shape[1]
            v = _all_columns((x.mT @ v[..., None])[..., 0], n, group, atom._mat_shape()[1] // n)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        atom._v = v
        out.append(sigma.clamp_min(0).sqrt().max())
    return out


def _offset(n: int, group: dist.ProcessGroup) -> int:
    """Where this rank's slice of a length-``n`` dimension starts (DTensor cuts as
    ``torch.chunk``)."""
    chunk = -(-n // dist.get_world_size(group))
    return min(n, dist.get_rank(group) * chunk)


def _all_columns(local: Tensor, n: int, group: dist.ProcessGroup, unit: int = 1) -> Tensor:
    """Every rank's slice of the last dimension, concatenated: ``n`` input channels in all,
    cut among the ranks as DTensor cuts them, each ``unit`` columns wide (``k²`` in an
    unfolded Conv2d's matrix, whose columns run over channels, then kernel positions)."""
    chunk = -(-n // dist.get_world_size(group))
    local = local.unflatten(-1, (-1, unit)).transpose(-1, -2)  # (..., unit, channels)
    padded = _pad(local, local.dim() - 1, chunk)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts, -1).narrow(-1, 0, n).transpose(-1, -2).flatten(-2)


class _Work:
    """Who computes what: the shard ``group`` (one replica's ranks) and, under HSDP, the
    ``replicas`` group; ``owners`` maps an atom to the rank of ``group`` that computes it in
    replica ``replica_of[i]``; ``mine`` holds the full tensors this rank computes; ``split``
    are the atoms that every rank of replica ``replica_of[i]`` computes together, and
    ``split_here`` those of this rank's replica."""

    def __init__(self, module: Module, tensors: Sequence[Tensor], splittable: bool) -> None:
        g = _Groups(tensors)
        _check_parts(module, tensors)
        self.group, self.replicas, self.replica = g.shards, g.replicas, g.replica
        split = _split_atoms(module, tensors, g.size) if splittable else frozenset()
        workers = _owners(module, g.workers, split, g.size)
        self.replica_of = {i: w // g.size for i, w in workers.items()}
        self.owners = {i: w % g.size for i, w in workers.items() if i not in split}
        self.split_here = [i for i in sorted(split) if self.replica_of[i] == self.replica]
        # only the owner's replica gathers: the other replicas hold the same slices
        full = {i: _gather_to(tensors[i], r, g.shards) for i, r in self.here().items()}
        self.mine = {i: cast(Tensor, t) for i, t in full.items() if workers[i] == g.worker}

    def here(self) -> dict[int, int]:
        """The owners of the atoms computed in this rank's replica."""
        return {i: r for i, r in self.owners.items() if self.replica_of[i] == self.replica}

    def share(self, out: list[Tensor]) -> None:
        """Under HSDP, give every replica the slices of ``out`` (already laid out in the
        replica that computed them, split atoms too): one broadcast per computing replica and
        dtype, from each rank to its counterparts, which hold the same slices."""
        if self.replicas is None:
            return
        by_source: dict[tuple[int, torch.dtype], list[int]] = {}
        for i in self.replica_of:
            by_source.setdefault((self.replica_of[i], out[i].dtype), []).append(i)
        for (source, _), atoms in sorted(by_source.items(), key=lambda kv: kv[0][0]):
            flat = torch.cat([_local(out[i]).reshape(-1) for i in atoms])
            dist.broadcast(flat, group=self.replicas, group_src=source)
            if source == self.replica:
                continue
            parts = flat.split([_local(out[i]).numel() for i in atoms])
            for i, part in zip(atoms, parts, strict=True):
                out[i] = _like(part.view_as(_local(out[i])), out[i])


def _norms(module: Module, tensors: Sequence[Tensor]) -> Tensor:
    """Every atom's norm ``(n_atoms,)`` in float32 on every rank (0 for mass-0 atoms): each
    computed by its owner from the gathered tensor, then shared by one all-reduce."""
    from modnorm.modules import _atom_norms

    tensors = _canonical(tensors)
    work = _Work(module, tensors, splittable=True)
    shares, mine = module.atom_shares(), work.mine
    norms = _atom_norms([(shares[i][0], shares[i][1], t) for i, t in mine.items()])
    device = _local(tensors[0]).device
    out = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    if mine:
        out[list(mine)] = torch.stack([n.float().to(device) for n in norms])
    dist.all_reduce(out, group=work.group)  # each entry is non-zero on one rank only
    if work.split_here:  # computed alike on every rank of this replica
        together = _split_norms(module, tensors, work.split_here, work.group)
        out[work.split_here] = torch.stack([n.float().to(device) for n in together])
    if work.replicas is not None:  # each entry non-zero in one replica only
        dist.all_reduce(out, group=work.replicas)
    return out


def norm(module: Module, tensors: Sequence[Tensor]) -> Tensor:
    """:meth:`Module.norm` of sharded tensors: ``max_i ‖t_i‖_i / share_i`` with each atom's
    norm computed by one rank."""
    norms = _norms(module, tensors).cpu()
    terms = [
        n / share for n, (_, share) in zip(norms, module.atom_shares(), strict=True) if share > 0
    ]
    return torch.stack(terms).max() if terms else torch.zeros(())


def normalize(module: Module, tensors: Sequence[Tensor], target: float) -> list[Tensor]:
    """:meth:`Module.normalize` of sharded tensors: each rank scales its own slices by the
    shared norms (no slice of the result is communicated)."""
    norms = _norms(module, tensors)
    out = []
    for (_, share), t, n in zip(module.atom_shares(), tensors, norms, strict=True):
        # the arithmetic of Module.normalize, so that sharded and unsharded runs agree
        scale = torch.where(n > 0, (target * share) / n.clamp_min(1e-30), 0.0)
        out.append(_scaled(t, scale))
    return out


def _scaled(t: Tensor, scale: Tensor) -> Tensor:
    """``t·scale`` in float32 (float64 kept), on the local slice of a DTensor."""
    local = _local(t)
    if local.dtype == torch.float64:
        local = local * scale.to(local.device)
    else:
        local = (local.float() * scale.to(local.device)).to(local.dtype)
    return _like(local, t)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _like(local: Tensor, t: Tensor) -> Tensor:
    """``local`` as this rank's slice of a tensor laid out as ``t``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return local
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


def dualize(
    module: Module, tensors: Sequence[Tensor], target: float, method: str, precision: str
) -> list[Tensor]:
    """:meth:`Module.dualize` of sharded tensors, each matrix on one rank: each atom of
    positive share is gathered to its owner (`_owners`), dualized there (batched by shape with
    the owner's other atoms), and scattered back in slices."""
    from modnorm.modules import _atom_duals, _check_target

    target = _check_target(target)
    like, tensors = tensors, _canonical(tensors)
    # an SVD needs the whole matrix: only Newton–Schulz splits one across ranks
    work = _Work(module, tensors, splittable=method == "newton_schulz")
    shares, mine, group = module.atom_shares(), work.mine, work.group
    owned = [(shares[i][0], shares[i][1], t) for i, t in mine.items()]
    dual = {
        i: d * (target * shares[i][1])
        for i, d in zip(mine, _atom_duals(owned, method, precision), strict=True)
    }
    out = [torch.zeros_like(t) for t in tensors]
    for i, r in work.here().items():
        out[i] = _scatter_from(dual.get(i), tensors[i], r, group)
    for i in work.split_here:
        out[i] = _split_dual(shares[i][0], tensors[i], target * shares[i][1], group, precision)
    work.share(out)
    return _restore(out, like)


def _split_dual(
    atom: Atom, t: Tensor, scale: float, group: dist.ProcessGroup, precision: str
) -> Tensor:
    """The dual map of a split matrix atom, each rank computing its own slice of the longer
    side (`_columns`): Newton–Schulz with the Gram matrices all-reduced; the result is laid
    out as ``t`` again."""
    from torch.distributed.tensor import DTensor

    from modnorm.linalg import _newton_schulz

    x, cut, long = _columns(atom, t)
    polar = _newton_schulz(x, precision=precision, reduce=_summed(group))
    assert isinstance(t, DTensor) and isinstance(cut, DTensor)
    local = cut.to_local()
    mats = polar.mT if long == 0 else polar
    dual = (cast("_MatrixAtomT", atom)._unmats(mats.to(local.dtype), local) * scale).contiguous()
    out = DTensor.from_local(
        dual, cut.device_mesh, cut.placements, run_check=False, shape=t.shape, stride=t.stride()
    )
    return out if out.placements == t.placements else out.redistribute(placements=t.placements)


def share_warm_starts(module: Module) -> None:
    """Give every rank each atom's spectral-norm warm starts from the rank that owns the atom
    (one all-gather of small vectors), so that an optimizer's state dict is the same on every
    rank and a run resumed on another number of ranks starts from them too. A collective under
    FSDP2 (every rank calls it, as for FSDP's own state dicts); nothing happens otherwise."""
    from modnorm.optim import _warm_start_buffers

    params = list(module.parameters())
    if not any_sharded(params):
        return
    groups = _Groups(params)
    atoms = [atom for atom, _ in module.atom_shares()]
    split = _split_atoms(module, params, groups.size)
    mine = {
        i: {name: b.detach().cpu() for name, b in _warm_start_buffers(atoms[i])}
        for i, w in _owners(module, groups.workers, split, groups.size).items()
        if w == groups.worker  # a split atom's: the first rank of the replica computing it
    }
    for g in (groups.shards, groups.replicas):  # within the replica, then across replicas
        if g is None:
            continue
        parts: list[Any] = [None] * dist.get_world_size(g)
        dist.all_gather_object(parts, mine, group=g)
        mine = {i: buffers for part in parts for i, buffers in part.items()}
    for i, buffers in mine.items():
        for name, value in buffers.items():
            setattr(atoms[i], name, value.to(_local(atoms[i].weight).device))


def _check_parts(module: Module, tensors: Sequence[Tensor]) -> None:
    """What :meth:`Module._split` checks, on (global) shapes, without gathering anything."""
    shares = module.atom_shares()
    if len(tensors) != len(shares):
        raise ValueError(
            f"expected {len(shares)} tensors (one per parameter of {module._name()}), "
            f"got {len(tensors)}"
        )
    for i, ((atom, _), t) in enumerate(zip(shares, tensors, strict=True)):
        if t.shape != atom.weight.shape:
            raise ValueError(
                f"tensor {i} has shape {tuple(t.shape)} but {atom._name()} has a weight "
                f"of shape {tuple(atom.weight.shape)}"
            )
    finite = global_sums(tensors).isfinite().cpu()
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise ValueError(f"non-finite values in tensor {bad}, for {shares[bad][0]._name()}")


def _sharded_dim(t: Tensor) -> int | None:
    """The dimension a DTensor is sharded along (``None``: replicated or a plain tensor)."""
    where = _shard(t)
    return None if where is None else where[1]


def _gather_to(t: Tensor, owner: int, group: dist.ProcessGroup) -> Tensor | None:
    """The full tensor on rank ``owner`` of ``group`` (``None`` elsewhere): one gather of the
    slices, padded to equal size (DTensor cuts as ``torch.chunk``: the last ones may be short)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dim = _sharded_dim(t)
    if dim is None:  # replicated: the owner has it already
        return t.to_local() if hasattr(t, "to_local") else t
    n = t.shape[dim]
    chunk = -(-n // world)
    local = t.to_local()  # type: ignore[attr-defined]
    local = _pad(local, dim, chunk)
    parts = [torch.empty_like(local) for _ in range(world)] if rank == owner else None
    dist.gather(local, parts, group=group, group_dst=owner)
    return None if parts is None else torch.cat(parts, dim).narrow(dim, 0, n)


def _scatter_from(
    full: Tensor | None, like: Tensor, owner: int, group: dist.ProcessGroup
) -> Tensor:
    """``full`` (held by rank ``owner`` only) laid out as ``like``: slices scattered, or the
    whole tensor broadcast where ``like`` is replicated."""
    from torch.distributed.tensor import DTensor

    world = dist.get_world_size(group)
    dim = _sharded_dim(like)
    if dim is None:
        whole = full.contiguous() if full is not None else torch.empty_like(_local(like))
        dist.broadcast(whole, group=group, group_src=owner)
        if not isinstance(like, DTensor):
            return whole
        return DTensor.from_local(whole, like.device_mesh, like.placements, run_check=False)
    assert isinstance(like, DTensor)
    n = like.shape[dim]
    chunk = -(-n // world)
    mine = like.to_local()
    received = _pad(torch.empty_like(mine), dim, chunk)
    parts = None
    if full is not None:
        parts = [p.contiguous() for p in _pad(full, dim, chunk * world).split(chunk, dim)]
    dist.scatter(received, parts, group=group, group_src=owner)
    local = received.narrow(dim, 0, mine.shape[dim])
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """``t`` padded with zeros along ``dim`` to ``size``, contiguous (as collectives need)."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim).contiguous()


# ---- checkpoints (torch.distributed.checkpoint) ----------------------------------------------

_META = "modnorm"  # the key of modnorm's own entry in a checkpoint


def save_checkpoint(path: str | Path, optimizer: Any, extra: dict[str, Any] | None = None) -> None:
    """Save ``optimizer.module``'s weights and ``optimizer``'s state (a modnorm optimizer) to
    the directory ``path`` with ``torch.distributed.checkpoint``: each rank writes its own
    slices of FSDP2's DTensors, so the checkpoint can be loaded on any number of ranks, or on
    one process. ``extra`` (plain objects: step, scheduler state, …) is saved as rank 0 holds
    it. A collective under a process group: every rank calls it. Atomic: written to
    ``path.tmp``, then renamed, so a crash mid-save leaves the previous checkpoint intact."""
    import torch.distributed.checkpoint as dcp

    save = _SaveTarget(path, optimizer, extra)
    with _single_process(save.distributed):
        dcp.save(save.state, checkpoint_id=save.tmp, no_dist=not save.distributed)
    save.finish()


def save_checkpoint_async(
    path: str | Path, optimizer: Any, extra: dict[str, Any] | None = None
) -> PendingSave:
    """:func:`save_checkpoint` that writes in the background: the state is copied to host
    memory before this returns, so training may go on at once; call ``wait()`` on the result
    (every rank, like the save) to finish it. Until then the previous checkpoint at ``path``
    is the one that loads; a new save to ``path`` waits for this one first. (Without a
    process group it silences DCP's "assuming … a single process" warning for good: the
    background thread would print it at a random moment.)"""
    import torch.distributed.checkpoint as dcp

    save = _SaveTarget(path, optimizer, extra)
    if not save.distributed:
        # DCP's notice that it assumes one process comes from the writing thread, after any
        # catch_warnings here has ended; one process is what is meant, so it is dropped.
        warnings.filterwarnings(
            "ignore", "torch.distributed is disabled", UserWarning, "torch.distributed.checkpoint"
        )
    with _single_process(save.distributed):
        future = dcp.async_save(
            save.state,
            checkpoint_id=save.tmp,
            no_dist=not save.distributed,
            # its own group: the background thread's collectives must not interleave with
            # the training loop's on the default group
            process_group=_checkpoint_group() if save.distributed else None,
        )
    pending = PendingSave(future, save)
    _pending[save.final] = pending
    return pending


class PendingSave:
    """A :func:`save_checkpoint_async` in progress."""

    def __init__(self, future: Any, save: _SaveTarget) -> None:
        self._future, self._save, self._done = future, save, False

    def wait(self) -> None:
        """Block until this rank's files are written, then finish the checkpoint (a collective:
        every rank calls it). A write that failed on any rank raises on every rank (its own
        error where it failed) and leaves the previous checkpoint in place. Idempotent."""
        if self._done:
            return
        self._done = True
        _pending.pop(self._save.final, None)
        error: BaseException | None = None
        try:
            self._future.result()
        except Exception as e:  # every rank must hear of it before anyone waits at a barrier
            error = e
        failed = error is not None
        if self._save.distributed:
            failed = _any_rank(failed)
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(
                f"the checkpoint {self._save.final} was not finished: another rank's write "
                "failed (its error is raised there); the previous checkpoint still loads"
            )
        self._save.finish()


_pending: dict[Path, PendingSave] = {}  # unfinished asynchronous saves, by final path
# (default group, its gloo twin), weakly: torch's registry owns both, so destroy_process_group
# frees them while the interpreter is alive, not at its teardown (gloo's threads abort there)
_checkpoint_groups: list[tuple[weakref.ref[Any], weakref.ref[dist.ProcessGroup]]] = []


def _checkpoint_group() -> dist.ProcessGroup:
    """A gloo group over the default group's ranks, made once per default group (kept with
    it, not by its id: a new default group may reuse a destroyed one's id)."""
    world = dist.group.WORLD
    twin = _checkpoint_groups[0][1]() if _checkpoint_groups else None
    if twin is None or _checkpoint_groups[0][0]() is not world:
        twin = dist.new_group(backend="gloo")
        _checkpoint_groups[:] = [(weakref.ref(world), weakref.ref(twin))]
    return twin


class _SaveTarget:
    """What one save writes and where: ``path.tmp`` while writing; ``finish`` renames it into
    place."""

    def __init__(self, path: str | Path, optimizer: Any, extra: dict[str, Any] | None) -> None:
        final = Path(os.path.abspath(path))  # one key per directory, however it is spelled
        if final in _pending:  # the same temporary directory: the earlier save goes first
            _pending[final].wait()
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.old = final.with_name(final.name + ".old")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.state = _checkpoint_state(optimizer)  # collectives under FSDP2
        self.state[_META] = _blob({**_meta(optimizer), "extra": extra or {}})
        if self.rank == 0 and self.tmp.exists():  # left by a save that crashed
            shutil.rmtree(self.tmp)
        _barrier(self.distributed)

    def finish(self) -> None:
        _barrier(self.distributed)  # every rank's files are written (DCP's .metadata last)
        if self.rank == 0:
            # Two renames, not one (a directory cannot replace a non-empty one atomically): a
            # crash between them leaves path.old, which load_checkpoint falls back to.
            if self.final.exists():
                if self.old.exists():
                    shutil.rmtree(self.old)
                self.final.rename(self.old)
            self.tmp.rename(self.final)
            shutil.rmtree(self.old, ignore_errors=True)
        _barrier(self.distributed)


def load_checkpoint(path: str | Path, optimizer: Any) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``optimizer.module`` and ``optimizer``,
    built as for the saved run (same architecture, same optimizer class) but on any number of
    ranks and any layout (FSDP2, DDP, one process): DCP reshards the saved slices. Returns the
    ``extra`` saved with it. A mismatch (another optimizer class, another architecture, a
    directory that is not a complete checkpoint) raises a ``ValueError`` naming it, before
    anything is changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    where = _complete(Path(path))
    distributed = dist.is_available() and dist.is_initialized()
    header: dict[str, Any] = {_META: io.BytesIO()}
    with _single_process(distributed):
        dcp.load(header, checkpoint_id=where, no_dist=not distributed)  # modnorm's entry
    blob = header[_META]  # DCP pickles each object, so this is _blob's BytesIO again
    blob.seek(0)
    meta = torch.load(blob, weights_only=False)
    _check_meta(meta, _meta(optimizer), where)
    state = _checkpoint_state(optimizer, meta)
    with _single_process(distributed):
        dcp.load(state, checkpoint_id=where, no_dist=not distributed)
    module = optimizer.module
    for opt, key in _optimizers(optimizer):
        if key in state:
            set_optimizer_state_dict(module, opt, state[key])
        else:  # saved before its first step: no state, only the hyperparameters
            groups = meta["param_groups"][key]
            torch.optim.Optimizer.load_state_dict(opt, {"state": {}, "param_groups": groups})
    # the weights last (dcp.load has already written them in place; this is a no-op copy
    # unless a zero step of DCP's optimizer helpers moved them, e.g. with project=True)
    set_model_state_dict(module, state["model"])
    optimizer.skipped_steps = int(meta["skipped_steps"])
    atoms = [atom for atom, _ in module.atom_shares()]
    for atom, buffers in zip(atoms, meta["warm_start"], strict=True):
        for name, value in buffers.items():
            setattr(atom, name, value.to(_local(atom.weight).device))
    return cast(dict[str, Any], meta["extra"])


def _optimizers(optimizer: Any) -> list[tuple[torch.optim.Optimizer, str]]:
    """The optimizers whose per-parameter state is saved: the modnorm optimizer, and the base
    of a ``Normalized`` (whose own state is empty: the base holds it)."""
    out = [(optimizer, "optimizer")]
    base = getattr(optimizer, "base", None)
    if isinstance(base, torch.optim.Optimizer):
        out.append((base, "base_optimizer"))
    return out


def _checkpoint_state(optimizer: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's and the optimizers' state dicts, keyed by parameter names (DCP's standard
    ``get_model_state_dict`` / ``get_optimizer_state_dict``). An optimizer that has no state
    (never stepped; or, when loading, saved so) is left out: those helpers would first take a
    zero-gradient step with lr 0 to create its state, and that step is not harmless for
    modnorm (Adam's step count, Dual's momentum) nor for ``Normalized``'s base."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from modnorm.optim import ModularOptimizer

    if not isinstance(optimizer, ModularOptimizer):
        raise TypeError(
            f"expected a modnorm optimizer (it knows its module), got {type(optimizer).__name__}"
        )
    module = optimizer.module
    state: dict[str, Any] = {"model": get_model_state_dict(module)}
    for opt, key in _optimizers(optimizer):
        saved = bool(opt.state) if meta is None else key in meta["stateful"]
        if saved:
            state[key] = get_optimizer_state_dict(module, opt)
    return state


def _meta(optimizer: Any) -> dict[str, Any]:
    """What modnorm keeps besides the tensors: the optimizer's class, the parameters' names and
    shapes, each atom's description (its mass and norm) and share of a step (to check a
    resume against), the skipped steps and the spectral-norm warm starts
    (non-parameter state that DCP's optimizer helpers drop), and each optimizer's
    hyperparameters."""
    from modnorm.optim import _warm_start_buffers

    share_warm_starts(optimizer.module)  # FSDP2: from the rank that computed each
    atoms, shares = zip(*optimizer.module.atom_shares(), strict=True)
    return {
        "optimizer": type(optimizer).__name__,
        "base": type(getattr(optimizer, "base", None)).__name__,
        "shapes": {n: tuple(p.shape) for n, p in optimizer.module.named_parameters()},
        "atoms": [_describe(atom) for atom in atoms],
        "shares": list(shares),
        "skipped_steps": optimizer.skipped_steps,
        "warm_start": [
            {n: b.detach().cpu().clone() for n, b in _warm_start_buffers(a)} for a in atoms
        ],
        "stateful": [key for opt, key in _optimizers(optimizer) if opt.state],
        "param_groups": {  # torch.optim's, not the subclasses' (Normalized adds its base's)
            key: torch.optim.Optimizer.state_dict(opt)["param_groups"]
            for opt, key in _optimizers(optimizer)
        },
    }


def _describe(atom: Any) -> str:
    """``Linear(100, 5, mass=1)``: the atom's modnorm class (FSDP2 subclasses it) and
    description, the same under any layout."""
    cls = next(c for c in type(atom).__mro__ if c.__module__.startswith("modnorm."))
    return f"{cls.__name__}({atom.extra_repr()})"


def _check_meta(saved: dict[str, Any], here: dict[str, Any], path: Path) -> None:
    """A clear error for a checkpoint that cannot resume this optimizer and module."""
    for key, what in (("optimizer", "optimizer"), ("base", "base optimizer of Normalized")):
        if saved[key] != here[key]:
            raise ValueError(
                f"{path} was saved with {what} {saved[key]}, this is {here[key]}: build the "
                "optimizer the checkpoint was saved with"
            )
    want, have = saved["shapes"], here["shapes"]
    if list(want) != list(have):
        gone = [n for n in want if n not in have]
        new = [n for n in have if n not in want]
        detail = (
            f"its parameter {gone[0]!r} is not in this model"
            if gone
            else f"this model's parameter {new[0]!r} is not in it"
            if new
            else "the parameters come in another order"
        )
        raise ValueError(
            f"{path} was saved from another architecture ({len(want)} parameters there, "
            f"{len(have)} here): {detail}"
        )
    for name, shape in want.items():
        if tuple(have[name]) != tuple(shape):
            raise ValueError(
                f"{path} was saved from another architecture: parameter {name!r} has shape "
                f"{tuple(shape)} there and {tuple(have[name])} here"
            )
    # fields a checkpoint predates go unchecked
    there = saved.get("atoms", here["atoms"])
    if there != here["atoms"]:
        i = next(
            (i for i, (a, b) in enumerate(zip(there, here["atoms"], strict=False)) if a != b),
            min(len(there), len(here["atoms"])),
        )
        a, b = (d[i] if i < len(d) else "absent" for d in (there, here["atoms"]))
        raise ValueError(
            f"{path} was saved from a module of other masses or norms: its atom {i} is {a} "
            f"there and {b} here"
        )
    shares = saved.get("shares", here["shares"])
    if not all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(shares, here["shares"], strict=True)
    ):
        raise ValueError(
            f"{path} was saved from a module whose atoms share a step otherwise (other masses, "
            f"sensitivities or output scale): {_fmt(shares)} there, {_fmt(here['shares'])} here"
        )


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


def _complete(path: Path) -> Path:
    """``path`` if it is a complete DCP checkpoint; ``path.old`` if a save crashed between its
    renames; a clear error otherwise."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / ".metadata").exists():
        warnings.warn(
            f"{path} is missing but {old} is complete (a save was interrupted): loading it",
            stacklevel=3,
        )
        return old
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / ".metadata").exists():
        raise ValueError(f"{path} is not a complete checkpoint (no .metadata file)")
    return path


def _blob(obj: Any) -> io.BytesIO:
    """``obj`` pickled into one bytes entry: DCP would flatten a dict and expect its tensors
    (the warm starts, empty before the first step) to have the saved shapes when loading."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@contextlib.contextmanager
def _single_process(distributed: bool) -> Iterator[None]:
    """Silence DCP's warning that it assumes one process: without a process group, it is."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: a collective on the checkpoints' gloo group (a CPU
    tensor under any backend; each rank's background writes on it have ended by now)."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_checkpoint_group())
    return bool(t.item())


# ---- launching -----------------------------------------------------------------------------


def init_from_env(device: str = "cpu") -> str:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), if it launched this process (one
    process too: FSDP shards over a group of one): NCCL with one GPU per process
    (``cuda:LOCAL_RANK``) when ``device`` is CUDA, gloo otherwise. Returns the device this
    process uses; without torchrun, ``device`` unchanged."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device

"""modnorm under torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo) against one
process that sees the combined batch (float64, so agreement to 1e-6 is a real check)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import faulthandler
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import modnorm as mn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed+gloo"
)

WORLD = 2
STEPS = 20
RESUME = 4  # checkpoint tests: steps before the checkpoint, and after it
CHECKPOINTED = ("sgd", "adam", "dual", "radam")
SPLIT = ("adam", "dual")  # normalize and dualize of a matrix split across ranks
AFFINE = ("sgd", "adam", "dual")  # a GPT with biases and gains under FSDP2
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda m: mn.optim.SGD(m, lr=0.1, momentum=0.9),
    "adam": lambda m: mn.optim.Adam(m, lr=0.1),
    "adamw": lambda m: mn.optim.AdamW(m, lr=0.1, weight_decay=0.5),
    "dual": lambda m: mn.optim.Dual(m, lr=0.1),
    "radam": lambda m: mn.optim.Normalized(m, torch.optim.RAdam, lr=0.1),
}


def _net() -> mn.Module:
    # Width 100: the 100×100 Linears take the Lanczos path (exact SVD is used up to 96), and
    # the 5-row head splits unevenly (3 + 2 rows) under FSDP2.
    # Built in float64: a float32 orthogonal init differs by ~1e-7 between processes running
    # different thread counts, which is what the test would then measure.
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return mn.ResMLP(12, 5, width=100, num_blocks=2)
    finally:
        torch.set_default_dtype(default)


def _vector_net() -> mn.Module:
    """A Linear with a LayerNorm's gain and bias and a bias on the logits, in float64 (small
    enough for exact SVDs): the vector atoms' slices under FSDP2 are 3 + 2 and 6 + 6."""
    torch.manual_seed(2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        norm = mn.Bias(12) @ mn.Gain(12) @ mn.LayerNorm()
        return mn.Bias(5) @ mn.Linear(12, 5) @ norm
    finally:
        torch.set_default_dtype(default)


def _mlp(widths: tuple[int, int]) -> mn.Module:
    """``12 → a → b → 5`` with GELUs, in float64, seed 1."""
    a, b = widths
    torch.manual_seed(1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return mn.Linear(b, 5) @ mn.GELU() @ mn.Linear(a, b) @ mn.GELU() @ mn.Linear(12, a)
    finally:
        torch.set_default_dtype(default)


def _tall_net() -> mn.Module:
    # The 300 × 120 matrix costs more than an even share of the dual maps: the ranks split it
    # (its Gram matrix is 120 × 120, above 96: Lanczos), and the others go to owners.
    return _mlp((120, 300))


def _wide_net() -> mn.Module:
    # The same with a 120 × 300 matrix: FSDP2 cuts its short side (rows), so the ranks
    # reshard it along its columns to share the 120 × 120 Gram matrix of its rows.
    return _mlp((300, 120))


SPLIT_NETS = {"tall": (_tall_net, (300, 120)), "wide": (_wide_net, (120, 300))}


def _conv_net() -> mn.Module:
    """An unfolded 3 × 3 Conv2d whose ``98 × 99`` matrix (11 input channels × 9 positions)
    the ranks split, in float64: 11 channels cut 6 + 5, so the ranks' columns are uneven
    whole channels (54 + 45), and its Gram matrix (98 × 98, above 96) goes to Lanczos."""
    torch.manual_seed(3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return mn.Conv2d(98, 2, 1) @ mn.Conv2d(11, 98, 3, unfolded=True)
    finally:
        torch.set_default_dtype(default)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 5, (16,), generator=gen)


def _train(
    model: Any,
    opt: torch.optim.Optimizer,
    rank: int,
    world: int,
    steps: range = range(STEPS),
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """``steps`` steps; this rank sees its slice of each batch (the mean loss over its slice:
    DDP and FSDP2 average the gradients, so together that is the mean over the batch). The
    loss and its backward pass run in ``context()`` (``loss_parallel`` for cut logits)."""
    for step in steps:
        x, y = _batch(step)
        with context():
            loss = F.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank])
            opt.zero_grad()
            loss.backward()
        opt.step()


def _full(tensors: Any) -> list[torch.Tensor]:
    """Detached full copies of plain tensors or DTensors (all-gathered: every rank calls)."""
    return [
        t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()
        for t in tensors
    ]


def _grads(net: Callable[[], mn.Module] = _net) -> list[torch.Tensor]:
    """A fixed gradient-shaped list (the same on every rank)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in net().parameters()]


def _maps(net: mn.Module, grads: list[Any]) -> dict[str, Any]:
    """norm, normalize and dualize of ``grads``, in this order on one network (the warm
    starts of the spectral norms carry over from call to call, identically everywhere)."""
    return {
        "norm": net.norm(grads),
        "normalize": _full(net.normalize(grads, 0.3)),
        "dualize": _full(net.dualize(grads, 0.3)),
    }


def _spawn(
    worker: Callable[..., None], tmp: Path, timeout: float = 120.0, nprocs: int = WORLD
) -> list[dict[str, Any]]:
    """Run ``worker(rank, init_file, out_dir)`` on ``nprocs`` processes (a hang is killed, an
    error in one re-raised here); the results each saved. A worker killed by a signal (gloo
    on CPU has crashed a worker mid-run once in many runs, not reproducibly) gets the whole
    spawn run once more, with a warning, after everything in ``tmp`` (the caller's fresh
    directory) is deleted; a second crash, an error or a hang fails. (If a peer's gloo error
    is seen before the crash, that error is raised: no retry.)"""
    for attempt in (1, 2):
        ctx = mp.start_processes(
            worker, args=(str(tmp / "init"), str(tmp)), nprocs=nprocs, join=False,
            start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"{worker.__name__} did not finish within {timeout:.0f} s")
        except mp.ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise
            warnings.warn(f"{worker.__name__}: {e}; running it again", stacklevel=2)
            for path in tmp.iterdir():  # the crashed run's files and store: start afresh
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            continue
        break
    return [torch.load(tmp / f"rank{r}.pt") for r in range(nprocs)]


def _crash_once(rank: int, init_file: str, out_dir: str) -> None:
    marker = Path(out_dir).parent / f"{Path(out_dir).name}-crashed"  # outside what a retry clears
    if rank == 0 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGSEGV)
    torch.save({"rank": rank}, Path(out_dir) / f"rank{rank}.pt")


def test_spawn_runs_a_crashed_worker_once_more_and_not_twice(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.pt").touch()
    with pytest.warns(UserWarning, match="SIGSEGV; running it again"):
        assert _spawn(_crash_once, out, nprocs=2) == [{"rank": 0}, {"rank": 1}]
    assert not (out / "stale.pt").exists()  # the crashed run's files went first
    with pytest.raises(mp.ProcessExitedException), pytest.warns(UserWarning):
        _spawn(_always_crash, tmp_path, nprocs=2)  # a second crash fails


def _always_crash(rank: int, init_file: str, out_dir: str) -> None:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSEGV)


# ---- the 2-process side: one spawn runs every scenario --------------------------------------


def _ddp(rank: int, out_dir: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

    from modnorm.distributed import save_checkpoint

    result: dict[str, Any] = {}
    for name, make in OPTIMIZERS.items():
        net = _net()
        model = DDP(net)
        opt = make(model)  # the optimizer unwraps DDP
        _train(model, opt, rank, WORLD)
        result[name] = _full(net.parameters())
        if name == "adam":  # replicated tensors: DCP writes each once
            save_checkpoint(out_dir / "ddp_adam", opt)
    # DDP keeps the module's parameters (FSDP2 replaces them): an optimizer built before the
    # wrapper is as good as one built after it
    net = _net()
    opt = OPTIMIZERS["adam"](net)
    _train(DDP(net), opt, rank, WORLD)
    result["adam_built_before"] = _full(net.parameters())
    return result


def _fsdp(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    result: dict[str, Any] = {}
    for name, make in OPTIMIZERS.items():
        net = _net()
        for atom, _ in net.atom_shares():
            fully_shard(atom)
        fully_shard(net)
        opt = make(net)
        _train(net, opt, rank, WORLD)
        result[name] = _full(net.parameters())
        result[f"{name}_warm_start"] = opt.state_dict()["modnorm"]["warm_start"]
        net = _vector_net()
        for atom, _ in net.atom_shares():
            fully_shard(atom)
        fully_shard(net)
        _train(net, make(net), rank, WORLD)
        result[f"vectors_{name}"] = _full(net.parameters())
        if name in AFFINE:
            net = _gpt(affine_mass=0.05)
            for atom, _ in net.atom_shares():
                fully_shard(atom)
            fully_shard(net)
            _train_gpt(net, make(net), rank, WORLD)
            result[f"gpt_affine_{name}"] = _full(net.parameters())

    mesh = init_device_mesh("cpu", (WORLD,))
    # FSDP2 shards dim 0; any dim works (slices are gathered), and so does a replicated tensor
    layouts = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}
    for key, placement in layouts.items():
        sharded = [distribute_tensor(g, mesh, [placement]) for g in _grads()]
        result[key] = _maps(_net(), sharded)
        out = _net().dualize(sharded, 0.3)
        result[f"{key}_layout"] = [
            (o.placements == (placement,), o.to_local().shape == g.to_local().shape)
            for o, g in zip(out, sharded, strict=True)
        ]

    # one matrix too large for an even share: every rank computes its own slice of it
    from modnorm.distributed import _split_atoms

    for dim in (0, 1):  # twice through the warm start of a split unfolded convolution
        sharded = [distribute_tensor(g, mesh, [Shard(dim)]) for g in _grads(_conv_net)]
        result[f"conv_split{dim}"] = sorted(_split_atoms(_conv_net(), sharded, WORLD))
        net = _conv_net()
        result[f"conv_maps{dim}"] = [_maps(net, sharded) for _ in range(2)]

    for kind, (make_net, _) in SPLIT_NETS.items():
        for dim in (0, 1):
            sharded = [distribute_tensor(g, mesh, [Shard(dim)]) for g in _grads(make_net)]
            result[f"{kind}_split{dim}"] = sorted(_split_atoms(make_net(), sharded, WORLD))
            result[f"{kind}_maps{dim}"] = _maps(make_net(), sharded)
            result[f"{kind}_layout{dim}"] = [
                d.placements == (Shard(dim),) for d in make_net().dualize(sharded, 0.3)
            ]
        with warnings.catch_warnings():  # bfloat16 is emulated on this CPU: slow, and said so
            warnings.simplefilter("ignore", RuntimeWarning)
            result[f"{kind}_mixed"] = _full(make_net().dualize(sharded, 0.3, precision="mixed"))
        for name in SPLIT:
            net = _sharded(make_net())
            _train(net, OPTIMIZERS[name](net), rank, WORLD)
            result[f"{kind}_{name}"] = _full(net.parameters())

    def error(fn: Callable[[], Any]) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    grads = _grads()
    partial = [DTensor.from_local(g, mesh, [Partial()]) for g in grads]
    result["partial_error"] = error(lambda: _net().norm(partial))
    mesh2d = init_device_mesh("cpu", (1, WORLD))
    # HSDP's layout, here with one replica (4 ranks test two below)
    result["hsdp"] = _maps(
        _net(), [distribute_tensor(g, mesh2d, [Replicate(), Shard(0)]) for g in grads]
    )
    # cut over both mesh dimensions (tensor parallel with FSDP2), or over either
    two = [distribute_tensor(g, mesh2d, [Shard(0), Shard(1)]) for g in grads]
    mixed = [distribute_tensor(g, mesh2d, [Replicate(), Shard(0)]) for g in grads]
    mixed[1] = distribute_tensor(grads[1], mesh2d, [Shard(1), Replicate()])
    for key, tensors in {"two_dims": two, "mixed_dims": mixed}.items():
        result[key] = _maps(_net(), tensors)
        result[f"{key}_layout"] = [
            o.placements == t.placements and o.to_local().shape == t.to_local().shape
            for o, t in zip(_net().dualize(tensors, 0.3), tensors, strict=True)
        ]
    elsewhere = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
    elsewhere[1] = mixed[1]  # an unnamed 2-D mesh: not a submesh of the 1-D one, nor its root
    result["mesh_error"] = error(lambda: _net().dualize(elsewhere))
    sharded = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
    result["count_error"] = error(lambda: _net().dualize(sharded[:-1]))
    local = sharded[2].to_local().clone()
    local[-1, -1] = float("nan") if rank == 1 else local[-1, -1]  # on one rank's slice only
    sharded[2] = DTensor.from_local(local, mesh, [Shard(0)])  # 100 rows: even slices
    result["nan_error"] = error(lambda: _net().normalize(sharded))

    net = _net()
    opt = mn.optim.Adam(net, lr=0.1)  # built before fully_shard replaced the parameters
    fully_shard(net)
    x, y = _batch(0)
    F.cross_entropy(net(x), y).backward()
    result["stale_error"] = error(opt.step)
    return result


def _sharded(net: mn.Module) -> mn.Module:
    from torch.distributed.fsdp import fully_shard

    for atom, _ in net.atom_shares():
        fully_shard(atom)
    fully_shard(net)
    return net


def _state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state and modnorm's entry, with full tensors (a collective)."""
    sd = opt.state_dict()
    if "base" in sd:  # Normalized: the state is its base's
        sd = {**sd["base"], "modnorm": sd["modnorm"]}
    state = {
        i: {k: _full([v])[0] if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        for i, st in sd["state"].items()
    }
    return {"state": state, "modnorm": sd["modnorm"]}


def _checkpoints(rank: int, out_dir: Path) -> dict[str, Any]:
    """Under FSDP2: ``RESUME`` steps, a checkpoint, ``RESUME`` more steps; and the same
    checkpoint loaded into a fresh sharded model and optimizer, which takes those steps too."""
    from modnorm.distributed import load_checkpoint, save_checkpoint

    result: dict[str, Any] = {}
    for name in CHECKPOINTED:
        net = _sharded(_net())
        opt = OPTIMIZERS[name](net)
        if name == "adam":  # saved before the first step: no state yet, and none is made
            save_checkpoint(out_dir / "fresh", opt, extra={"step": 0})
            result["fresh_untouched"] = not opt.state
        _train(net, opt, rank, WORLD, range(RESUME // 2))
        save_checkpoint(out_dir / name, opt)  # then overwritten: the atomic replacement
        _train(net, opt, rank, WORLD, range(RESUME // 2, RESUME))
        save_checkpoint(out_dir / name, opt, extra={"step": RESUME})
        saved = _state(opt)
        _train(net, opt, rank, WORLD, range(RESUME, 2 * RESUME))
        uninterrupted = _full(net.parameters())

        net = _sharded(_net())
        opt = OPTIMIZERS[name](net)
        extra = load_checkpoint(out_dir / name, opt)
        loaded = _state(opt)
        _train(net, opt, rank, WORLD, range(extra["step"], 2 * RESUME))
        result[name] = {
            "saved": saved,
            "loaded": loaded,
            "uninterrupted": uninterrupted,
            "resumed": _full(net.parameters()),
        }
    result["async"] = _async_checkpoint(rank, out_dir / "async")
    return result


def _async_checkpoint(rank: int, path: Path) -> dict[str, Any]:
    """Under FSDP2: a background save, training going on while it writes, and a resume from
    it that takes the same steps as the uninterrupted run."""
    from modnorm.distributed import load_checkpoint, save_checkpoint_async

    net = _sharded(_net())
    opt = OPTIMIZERS["adam"](net)
    _train(net, opt, rank, WORLD, range(RESUME))
    pending = save_checkpoint_async(path, opt, extra={"step": RESUME})
    saved = _state(opt)
    _train(net, opt, rank, WORLD, range(RESUME, 2 * RESUME))  # changes what is being written
    pending.wait()
    pending.wait()  # idempotent
    uninterrupted = _full(net.parameters())

    net = _sharded(_net())
    opt = OPTIMIZERS["adam"](net)
    extra = load_checkpoint(path, opt)
    loaded = _state(opt)
    _train(net, opt, rank, WORLD, range(extra["step"], 2 * RESUME))
    leftovers = sorted(p.name for p in path.parent.iterdir() if p.name != "async")

    # a write that fails on rank 1 only: both ranks raise (none waits at a barrier for it),
    # and the checkpoint already at the path stays the one that loads
    failing = save_checkpoint_async(path, opt, extra={"step": 2 * RESUME})
    failing._future.result()  # this rank's part is done; rank 1 then "fails"
    if rank == 1:
        failed: concurrent.futures.Future[None] = concurrent.futures.Future()
        failed.set_exception(OSError("disk full"))
        failing._future = failed
    try:
        failing.wait()
        raised = ""
    except (OSError, RuntimeError) as e:
        raised = f"{type(e).__name__}: {e}"
    kept = load_checkpoint(path, OPTIMIZERS["adam"](_sharded(_net())))["step"]
    return {
        "saved": saved,
        "loaded": loaded,
        "uninterrupted": uninterrupted,
        "resumed": _full(net.parameters()),
        "leftovers": leftovers,
        "failed_save": {"raised": raised, "kept_step": kept},
    }


def _join(rank: int, init_file: str, world: int = WORLD) -> None:
    faulthandler.enable()  # a worker that crashes (a rare SIGSEGV seen once) says where
    torch.set_num_threads(1)  # several processes on a small machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    _join(rank, init_file)
    result = {
        "ddp": _ddp(rank, Path(out_dir) / "checkpoints"),
        "fsdp": _fsdp(rank),
        "checkpoints": _checkpoints(rank, Path(out_dir) / "checkpoints"),
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # ranks tear gloo down together: one leaving early can abort
    dist.destroy_process_group()


def _hsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Four ranks, HSDP: two replicas of two shards each (``fully_shard`` on a 2-D mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import modnorm.distributed as distributed
    import modnorm.modules as modules

    _join(rank, init_file, 4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    result: dict[str, Any] = {}
    # the atoms this rank computes a norm or dual map of alone, and the split atoms it takes
    # part in computing
    computed: list[int] = []
    together: list[int] = []
    for fn in ("_atom_norms", "_atom_duals"):
        original = getattr(modules, fn)

        def counting(items: Any, *args: Any, original: Any = original) -> Any:
            computed.append(len(items))
            return original(items, *args)

        setattr(modules, fn, counting)
    split_norms, split_dual = distributed._split_norms, distributed._split_dual

    def counting_norms(module: Any, tensors: Any, split: Any, group: Any) -> Any:
        together.append(len(split))
        return split_norms(module, tensors, split, group)

    def counting_dual(*args: Any) -> Any:
        together.append(1)
        return split_dual(*args)

    distributed._split_norms, distributed._split_dual = counting_norms, counting_dual
    for kind, make_net in {"resmlp": _net, "tall": _tall_net, "wide": _wide_net}.items():
        for name in SPLIT:
            net = make_net()
            for atom, _ in net.atom_shares():
                fully_shard(atom, mesh=mesh)
            fully_shard(net, mesh=mesh)
            opt = OPTIMIZERS[name](net)
            computed.clear()
            together.clear()
            _train(net, opt, rank, 4)
            result[f"{kind}_{name}_computed"] = sum(computed)
            result[f"{kind}_{name}_together"] = sum(together)
            result[f"{kind}_{name}_warm_start"] = opt.state_dict()["modnorm"]["warm_start"]
            result[f"{kind}_{name}"] = _full(net.parameters())
            result[f"{kind}_{name}_placements"] = [p.placements for p in net.parameters()]
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _gpt(affine_mass: float | None = None) -> mn.Module:
    """A 2-block GPT with 4 heads of 4 (float64, seed 4): two heads and half of each MLP on
    each of two tensor-parallel ranks."""
    torch.manual_seed(4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return mn.GPT(11, 8, 16, 4, 2, affine_mass=affine_mass)
    finally:
        torch.set_default_dtype(default)


def _train_gpt(model: Any, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """As `_train`, on 4 sequences of 8 random tokens a step, next-token loss."""
    for step in range(STEPS // 2):
        tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(step))
        x, y = tokens[:, :-1].chunk(world)[rank], tokens[:, 1:].chunk(world)[rank]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _cut_over_tp(t: Any) -> bool:
    names = getattr(getattr(t, "device_mesh", None), "mesh_dim_names", None) or ()
    return "tp" in names and t.placements[names.index("tp")].is_shard()


# the GPT's tensor-parallel runs: a key's suffix, affine_mass, sequence parallelism
GPT_TP_RUNS = (("", None, False), ("_affine", 0.05, False), ("_sp", None, True))
# the tensor-parallel runs: a plan, and whether FSDP2 shards over the other mesh dimension;
# "loss" cuts the head too and leaves its logits cut for loss_parallel
TP_RUNS = {
    "tp": ("mlp", False),
    "fsdp_tp": ("mlp", True),
    "fsdp_tp_all": ("all", True),
    "fsdp_tp_loss": ("loss", True),
}


def _tp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Four ranks as a ``(dp, tp) = (2, 2)`` mesh: tensor parallel alone (each pair of ``tp``
    ranks trains on the whole batch), and with FSDP2 over ``dp`` (each pair on its half)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from modnorm.parallel import ColwiseParallel, RowwiseParallel, megatron_plan

    _join(rank, init_file, 4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()
    result: dict[str, Any] = {}
    for key, (plan, fsdp) in TP_RUNS.items():
        for name in SPLIT:
            net = _tall_net()
            # Megatron's MLP cut: the first Linear's rows, the second's columns; "all" cuts the
            # head's rows too, "mlp" leaves it whole (under FSDP2 it lives on the dp submesh)
            styles: dict[str, Any] = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            if plan == "all":
                styles["4"] = ColwiseParallel(output_layouts=Replicate())
            if plan == "loss":
                styles["4"] = ColwiseParallel(use_local_output=False)
            parallelize_module(net, mesh["tp"], styles)
            if fsdp:
                fully_shard(net, mesh=mesh["dp"])
            opt = OPTIMIZERS[name](net)
            context = loss_parallel if plan == "loss" else contextlib.nullcontext
            _train(net, opt, dp if fsdp else 0, 2 if fsdp else 1, context=context)
            result[f"{key}_{name}"] = _full(net.parameters())
            result[f"{key}_{name}_placements"] = [
                tuple(getattr(p, "placements", ())) for p in net.parameters()
            ]
            result[f"{key}_{name}_warm_start"] = opt.state_dict()["modnorm"]["warm_start"]
    for key, fsdp in {"gpt_tp": False, "gpt_fsdp_tp": True}.items():
        for name, (suffix, affine, sp) in itertools.product(SPLIT, GPT_TP_RUNS):
            key_ = f"{key}{suffix}"
            net = _gpt(affine)
            parallelize_module(net, mesh["tp"], megatron_plan(net, sequence_parallel=sp))
            if fsdp:
                fully_shard(net, mesh=mesh["dp"])
            positions: list[int] = []  # how many the first block's branches see on this rank
            net.get_submodule("2.1").register_forward_pre_hook(
                lambda _, args, seen=positions: seen.append(args[0].shape[1])
            )
            _train_gpt(net, OPTIMIZERS[name](net), dp if fsdp else 0, 2 if fsdp else 1)
            result[f"{key_}_{name}"] = _full(net.parameters())
            result[f"{key_}_{name}_tp_cuts"] = sum(map(_cut_over_tp, net.parameters()))
            result[f"{key_}_{name}_positions"] = set(positions)
    torch.manual_seed(3)
    whole = mn.Embedding(10, 6)
    indices = torch.tensor([[1, 9, 3], [0, 0, 7]])
    result["embedding"] = whole(indices).detach()
    # (as with torch's styles, a row-cut Embedding is told that its indices are whole)
    for style in (
        ColwiseParallel(output_layouts=Replicate()),
        RowwiseParallel(input_layouts=Replicate()),
    ):
        cut = mn.Embedding(10, 6)
        cut.load_state_dict(whole.state_dict())
        parallelize_module(cut, mesh["tp"], style)
        result[f"embedding_{type(style).__name__}"] = cut(indices).detach()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned() -> Iterator[tuple[list[dict[str, Any]], Path]]:
    """The 2-process results, and the directory of the checkpoints they saved."""
    with tempfile.TemporaryDirectory() as tmp:
        yield _spawn(_worker, Path(tmp)), Path(tmp) / "checkpoints"


@pytest.fixture(scope="module")
def runs(spawned: tuple[list[dict[str, Any]], Path]) -> list[dict[str, Any]]:
    return spawned[0]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[torch.Tensor]]:
    """One process, the combined batch: the weights after ``STEPS`` steps per optimizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronization (5-20× here)
    try:
        out = {}
        for name, make in OPTIMIZERS.items():
            net = _net()
            _train(net, make(net), 0, 1)
            out[name] = _full(net.parameters())
        return out
    finally:
        torch.set_num_threads(threads)


# ---- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_atoms_are_split_across_ranks_by_cost(world: int) -> None:
    from modnorm.distributed import _cost, _owners

    gpt = mn.GPT(65, 16, 64, num_heads=4, num_blocks=3)  # 4d×d MLPs and a vocab×d head
    shares = gpt.atom_shares()
    owners = _owners(gpt, world)
    assert set(owners) == {i for i, (_, s) in enumerate(shares) if s > 0}
    assert set(owners.values()) == set(range(world))
    cost = [_cost(atom) for atom, _ in shares]
    assert cost[-1] == 65 * 64 * 64  # the head: Newton–Schulz on a 65 × 64 matrix
    assert cost[0] == 65 * 64  # an embedding: row normalization
    load = [sum(cost[i] for i, r in owners.items() if r == k) for k in range(world)]
    round_robin = [
        sum(cost[i] for n, i in enumerate(owners) if n % world == k) for k in range(world)
    ]
    # greedy, largest first: within the largest atom of a perfect split, and never worse
    # than the round-robin it replaced
    assert max(load) <= sum(cost) / world + max(cost)
    assert max(load) <= max(round_robin)
    assert owners == _owners(gpt, world)  # deterministic: every rank computes the same


def test_a_convolutions_cost_follows_its_matrices() -> None:
    from modnorm.distributed import _cost

    # 9 matrices of 6 × 4 per position, or one of 6 × 36 unfolded: size · the shorter side
    assert _cost(mn.Conv2d(4, 6, 3)) == 6 * 4 * 9 * 4
    assert _cost(mn.Conv2d(4, 6, 3, unfolded=True)) == 6 * 4 * 9 * 6


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_processes_match_one_process_on_the_combined_batch(
    strategy: str,
    name: str,
    runs: list[dict[str, Any]],
    reference: dict[str, list[torch.Tensor]],
) -> None:
    for rank, run in enumerate(runs):
        for i, (got, want) in enumerate(zip(run[strategy][name], reference[name], strict=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"rank {rank}, param {i}")
    # the weights did move: the comparison is not between two untrained networks
    start = _full(_net().parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(reference[name], start, strict=True))
    assert moved > 1e-2


def _assert_every_parameter_as_on_one_process(
    runs: list[dict[str, Any]],
    key: str,
    make: Callable[[], mn.Module],
    train: Callable[[Any, torch.optim.Optimizer, int, int], None],
    name: str,
    moved: float,
) -> None:
    """Each rank's FSDP2 run ``key`` against one process trained by ``train`` on the combined
    batch, to 1e-9 for every parameter, each of which moved by more than ``moved``."""
    net = make()
    train(net, OPTIMIZERS[name](net), 0, 1)
    want = _full(net.parameters())
    start = _full(make().parameters())
    for rank, run in enumerate(runs):
        for i, (g, w, s) in enumerate(zip(run["fsdp"][key], want, start, strict=True)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9, msg=f"rank {rank}, param {i}")
            assert (w - s).abs().max() > moved, f"param {i} did not move"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_biases_and_gains_train_as_on_one_process(
    name: str, runs: list[dict[str, Any]]
) -> None:
    # every atom, biases and gain too, moved by more than 1e-2
    _assert_every_parameter_as_on_one_process(
        runs, f"vectors_{name}", _vector_net, _train, name, moved=1e-2
    )


@pytest.mark.parametrize("name", AFFINE)
def test_a_sharded_gpt_with_biases_and_gains_trains_as_on_one_process(
    name: str, runs: list[dict[str, Any]]
) -> None:
    # every Bias and Gain of a GPT, each sliced across the ranks, and its matrices; this
    # failed by 0.07 on the key biases when the keys had one (their gradient is rounding
    # error, which a normalized step scales up to a full step in a direction of its own)
    _assert_every_parameter_as_on_one_process(
        runs, f"gpt_affine_{name}", lambda: _gpt(affine_mass=0.05), _train_gpt, name, moved=1e-3
    )


def _assert_same_maps(got: dict[str, Any], want: dict[str, Any]) -> None:
    """`_maps` of sharded tensors against those of the full ones: dual maps to rounding;
    spectral norms (and so normalize) to Lanczos's tolerance (1e-5), not to rounding: the
    owning rank batches other matrices together than one process does, and a batch iterates
    until all its members have converged, so a matrix may stop at another step."""
    for g, w in zip(got["dualize"], want["dualize"], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
    torch.testing.assert_close(got["norm"], want["norm"], rtol=1e-5, atol=0)
    for g, w in zip(got["normalize"], want["normalize"], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("layout", ["shard0", "shard1", "replicate"])
def test_norm_normalize_dualize_of_sharded_tensors_are_those_of_the_full_tensors(
    layout: str, runs: list[dict[str, Any]]
) -> None:
    want = _maps(_net(), _grads())
    for run in runs:
        _assert_same_maps(run["fsdp"][layout], want)
        # the results keep the input's layout: each rank holds its slice, not the full tensor
        assert all(a and b for a, b in run["fsdp"][f"{layout}_layout"])


def test_hsdp_layout_gives_the_maps_of_the_full_tensors(runs: list[dict[str, Any]]) -> None:
    want = _maps(_net(), _grads())
    for run in runs:
        _assert_same_maps(run["fsdp"]["hsdp"], want)


@pytest.mark.parametrize("layout", ["two_dims", "mixed_dims"])
def test_tensors_cut_over_two_mesh_dimensions_give_the_maps_of_the_full_tensors(
    layout: str, runs: list[dict[str, Any]]
) -> None:
    # (Shard(0), Shard(1)) as tensor parallelism under FSDP2 makes, and tensors cut over
    # different mesh dimensions: resharded to one cut, computed, and laid out as given again.
    want = _maps(_net(), _grads())
    for run in runs:
        _assert_same_maps(run["fsdp"][layout], want)
        assert all(run["fsdp"][f"{layout}_layout"])


def test_sharded_bad_input_gets_clear_errors(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        errors = run["fsdp"]
        assert "placement Partial" in errors["partial_error"]
        assert "tensor 1 lives on another device mesh than tensor 0's" in errors["mesh_error"]
        assert "put every parameter on one mesh" in errors["mesh_error"]
        assert "expected 4 tensors" in errors["count_error"]
        # a NaN on rank 1's slice is seen by both ranks: neither goes on into a collective alone
        assert "non-finite values in tensor 2" in errors["nan_error"]
        assert "changed after the optimizer was built" in errors["stale_error"]
        assert "fully_shard" in errors["stale_error"]


def test_fsdp2_state_dicts_hold_every_atoms_warm_start_on_every_rank(
    runs: list[dict[str, Any]],
) -> None:
    # Each atom's spectral norm is computed by one rank; state_dict() shares the warm starts.
    for name in ("adam", "radam"):
        first, second = (run["fsdp"][f"{name}_warm_start"] for run in runs)
        # every Linear has one, though each rank computed the norms of half of them only
        assert all(w["_v"].numel() > 0 for run in runs for w in run["fsdp"][f"{name}_warm_start"])
        for a, b in zip(first, second, strict=True):
            torch.testing.assert_close(a["_v"], b["_v"], rtol=0, atol=0)


# ---- checkpoints (torch.distributed.checkpoint) ----------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in `reference`: tiny matrices
    yield
    torch.set_num_threads(threads)


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["state"].keys() == want["state"].keys() and got["state"]
    for i, st in want["state"].items():
        assert got["state"][i].keys() == st.keys()
        for key, value in st.items():  # moments, momentum buffers, step counts
            torch.testing.assert_close(got["state"][i][key], value, rtol=0, atol=0)
    assert got["modnorm"]["skipped_steps"] == want["modnorm"]["skipped_steps"]
    for a, b in zip(got["modnorm"]["warm_start"], want["modnorm"]["warm_start"], strict=True):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_a_sharded_checkpoint_resumes_exactly_on_two_ranks(
    name: str, runs: list[dict[str, Any]]
) -> None:
    for rank, run in enumerate(runs):
        ck = run["checkpoints"][name]
        _assert_same_state(ck["loaded"], ck["saved"])
        assert any(w for w in ck["saved"]["modnorm"]["warm_start"])  # warm starts were saved
        for i, (got, want) in enumerate(zip(ck["resumed"], ck["uninterrupted"], strict=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"rank {rank}, param {i}")


def test_an_asynchronous_checkpoint_holds_the_state_at_the_save_and_resumes_exactly(
    runs: list[dict[str, Any]],
) -> None:
    for rank, run in enumerate(runs):
        ck = run["checkpoints"]["async"]
        _assert_same_state(ck["loaded"], ck["saved"])
        for i, (got, want) in enumerate(zip(ck["resumed"], ck["uninterrupted"], strict=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"rank {rank}, param {i}")
        assert not [n for n in ck["leftovers"] if n.startswith("async.")]  # renamed into place
        failed = ck["failed_save"]
        assert failed["kept_step"] == RESUME
        want = "OSError: disk full" if rank == 1 else "RuntimeError: the checkpoint"
        assert failed["raised"].startswith(want), failed["raised"]


def test_an_asynchronous_save_on_one_process_waits_for_the_one_before(tmp_path: Path) -> None:
    from modnorm.distributed import load_checkpoint, save_checkpoint_async

    net = _net()
    opt = OPTIMIZERS["adam"](net)
    _train(net, opt, 0, 1, range(2))
    first = save_checkpoint_async(tmp_path / "ck", opt, extra={"step": 2})
    _train(net, opt, 0, 1, range(2, 3))
    second = save_checkpoint_async(tmp_path / "ck", opt, extra={"step": 3})  # finishes first
    assert (tmp_path / "ck").is_dir()
    want = _full(net.parameters())
    _train(net, opt, 0, 1, range(3, 4))
    second.wait()
    first.wait()  # already finished: nothing happens
    fresh = _net()
    assert load_checkpoint(tmp_path / "ck", OPTIMIZERS["adam"](fresh)) == {"step": 3}
    for got, expected in zip(_full(fresh.parameters()), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_a_sharded_checkpoint_resumes_exactly_on_one_process(
    name: str, spawned: tuple[list[dict[str, Any]], Path], one_thread: None
) -> None:
    from modnorm.distributed import load_checkpoint

    runs, checkpoints = spawned
    ck = runs[0]["checkpoints"][name]
    net = _net()
    before = _full(net.parameters())
    opt = OPTIMIZERS[name](net)
    extra = load_checkpoint(checkpoints / name, opt)  # no process group: DCP reshards
    assert extra == {"step": RESUME}
    _assert_same_state(_state(opt), ck["saved"])
    _train(net, opt, 0, 1, range(RESUME, 2 * RESUME))  # the combined batch
    for i, (got, want) in enumerate(zip(_full(net.parameters()), ck["uninterrupted"], strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"param {i}")
    moved = zip(before, ck["uninterrupted"], strict=True)
    assert max((a - b).abs().max().item() for a, b in moved) > 1e-2  # the load did something


def test_a_ddp_checkpoint_loads_on_one_process(
    spawned: tuple[list[dict[str, Any]], Path], one_thread: None
) -> None:
    from modnorm.distributed import load_checkpoint

    runs, checkpoints = spawned
    net = _net()
    assert load_checkpoint(checkpoints / "ddp_adam", OPTIMIZERS["adam"](net)) == {}
    for got, want in zip(_full(net.parameters()), runs[0]["ddp"]["adam"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ddp_keeps_the_parameters_an_optimizer_was_built_on(
    runs: list[dict[str, Any]], reference: dict[str, list[torch.Tensor]]
) -> None:
    # FSDP2 replaces them, and the optimizer then raises (test_sharded_bad_input_...)
    for run in runs:
        for got, want in zip(run["ddp"]["adam_built_before"], reference["adam"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_checkpoint_saved_before_the_first_step_changes_nothing(
    spawned: tuple[list[dict[str, Any]], Path], one_thread: None
) -> None:
    from modnorm.distributed import load_checkpoint

    runs, checkpoints = spawned
    # DCP's get_optimizer_state_dict would take a zero-gradient step to create the state
    assert all(run["checkpoints"]["fresh_untouched"] for run in runs)
    net = _net()
    opt = OPTIMIZERS["adam"](net)
    assert load_checkpoint(checkpoints / "fresh", opt) == {"step": 0}
    assert not opt.state
    _train(net, opt, 0, 1, range(2))
    assert opt.state_dict()["state"][0]["step"] == 2


def test_a_checkpoint_that_does_not_fit_gets_a_clear_error(
    spawned: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    from modnorm.distributed import load_checkpoint

    checkpoints = spawned[1]
    net = _net()
    with pytest.raises(ValueError, match="saved with optimizer Adam, this is Dual"):
        load_checkpoint(checkpoints / "adam", mn.optim.Dual(net, lr=0.1))
    with pytest.raises(ValueError, match="saved with base optimizer of Normalized RAdam, this"):
        load_checkpoint(checkpoints / "radam", mn.optim.Normalized(net, torch.optim.Adam, lr=0.1))
    other = mn.ResMLP(12, 5, width=64, num_blocks=2)
    with pytest.raises(ValueError, match=r"parameter '.*' has shape \(100, 12\) there and \(64"):
        load_checkpoint(checkpoints / "adam", mn.optim.Adam(other, lr=0.1))
    deeper = mn.ResMLP(12, 5, width=100, num_blocks=3)
    with pytest.raises(ValueError, match=r"\(4 parameters there, 5 here\): its parameter '6"):
        load_checkpoint(checkpoints / "adam", mn.optim.Adam(deeper, lr=0.1))
    scaled = mn.ResMLP(12, 5, width=100, num_blocks=2, output_scale=3.0)  # same atoms
    with pytest.raises(ValueError, match=r"share a step otherwise .*\[0.3333, .*\[0.1111, "):
        load_checkpoint(checkpoints / "adam", mn.optim.Adam(scaled, lr=0.1))
    heavier = mn.ResMLP(12, 5, width=100, num_blocks=2, head_mass=2.0)  # same shapes
    with pytest.raises(ValueError, match=r"its atom 3 is Linear\(100, 5, mass=1\) there and Lin"):
        load_checkpoint(checkpoints / "adam", mn.optim.Adam(heavier, lr=0.1))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "missing", mn.optim.Adam(net, lr=0.1))
    (tmp_path / "half").mkdir()  # what a save that crashed before DCP's .metadata leaves
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "half", mn.optim.Adam(net, lr=0.1))
    # nothing was changed by the failed loads
    for got, want in zip(_full(net.parameters()), _full(_net().parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_save_interrupted_between_its_renames_loads_the_previous_checkpoint(
    tmp_path: Path, one_thread: None
) -> None:
    from modnorm.distributed import load_checkpoint, save_checkpoint

    net = _net()
    opt = OPTIMIZERS["adam"](net)
    _train(net, opt, 0, 1, range(2))
    save_checkpoint(tmp_path / "ck", opt, extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no .tmp or .old left
    (tmp_path / "ck").rename(tmp_path / "ck.old")  # the state between the two renames
    with pytest.warns(UserWarning, match="a save was interrupted"):
        assert load_checkpoint(tmp_path / "ck", OPTIMIZERS["adam"](_net())) == {"step": 2}


# ---- `modnorm train` under torchrun ----------------------------------------------------------


def _torchrun(
    args: list[str], cwd: Path, nproc: int = WORLD, launch: bool = True
) -> subprocess.CompletedProcess[str]:
    """``modnorm`` under torchrun with ``nproc`` processes; ``launch=False``: without it."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *(torchrun if launch else []), "-m", "modnorm.cli", *args]
    # PYTHONFAULTHANDLER: a worker that aborts shows where each of its threads was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_modnorm_train_under_torchrun_runs_checkpoints_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    from modnorm import experiments as ex
    from modnorm.data import load

    gen = torch.Generator().manual_seed(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    picks = torch.randint(0, len(words), (3000,), generator=gen).tolist()
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in picks))
    cfg = ex.TrainConfig(
        model="gpt", data="text:t.txt", width=16, depth=1, num_heads=2, context=16, steps=6,
        batch_size=4, eval_every=3, checkpoint_every=3,
    )  # fmt: skip
    args = ["train", "--model", "gpt", "--data", cfg.data, "--width", "16", "--depth", "1"]
    args += ["--heads", "2", "--context", "16", "--steps", "6", "--batch-size", "4"]
    args += ["--eval-every", "3", "--checkpoint-every", "3", "--no-progress"]

    whole = _torchrun([*args, "--out", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert (tmp_path / "whole" / "checkpoint.pt").exists()
    assert whole.stdout.count("train loss") == 1  # rank 0 alone reports
    first = _torchrun([*args, "--out", "split", "--stop-after", "3"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _torchrun([*args, "--out", "split", "--resume"], tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    # an error after the group is joined: the worker leaves through os._exit with code 2
    other = _torchrun([*args, "--out", "split", "--resume", "--lr", "0.1"], tmp_path)
    assert other.returncode != 0 and "exitcode  : 2" in other.stderr, other.stderr
    assert "modnorm train: error:" in other.stderr and "different configuration" in other.stderr

    runs = [json.loads((tmp_path / d / "train.json").read_text()) for d in ("whole", "split")]
    assert (
        runs[0]["world_size"] == 2
        and runs[0]["device"] == "cpu"
        and len(runs[0]["train_curve"]) == 6
    )
    assert runs[1]["train_curve"] == pytest.approx(runs[0]["train_curve"], rel=1e-6, abs=0)
    assert [v["step"] for v in runs[1]["val"]] == [3, 6]

    # Each rank draws its own batches: rank 0 draws what one process draws, so the logged mean
    # of the two ranks' first losses is not the loss of one process's first batch.
    data = load(f"text:{tmp_path / 't.txt'}")
    one = ex.train(cfg, tmp_path / "one", data, progress=False, log=lambda _: None, stop_after=1)
    assert abs(one["train_curve"][0] - runs[0]["train_curve"][0]) > 1e-4

    # The checkpoint holds two data streams: one process cannot continue it exactly.
    single = _torchrun([*args, "--out", "whole", "--resume"], tmp_path, launch=False)
    assert single.returncode == 2
    assert "saved by 2 process(es) and this run has 1" in single.stderr


def test_modnorm_train_with_fsdp2_matches_ddp_and_resumes_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    picks = torch.randint(0, len(words), (3000,), generator=gen).tolist()
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in picks))
    args = ["train", "--model", "gpt", "--data", "text:t.txt", "--width", "16", "--depth", "1"]
    args += ["--heads", "2", "--context", "16", "--steps", "6", "--batch-size", "4"]
    args += ["--eval-every", "3", "--checkpoint-every", "3", "--no-progress"]
    fsdp = [*args, "--strategy", "fsdp"]

    ddp = _torchrun([*args, "--out", "ddp"], tmp_path)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    whole = _torchrun([*fsdp, "--out", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert (tmp_path / "whole" / "checkpoint" / ".metadata").exists()  # DCP, every rank's slices
    first = _torchrun([*fsdp, "--out", "split", "--stop-after", "3"], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _torchrun([*fsdp, "--out", "split", "--resume"], tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "at step 3" in second.stdout

    runs = {
        d: json.loads((tmp_path / d / "train.json").read_text()) for d in ("ddp", "whole", "split")
    }
    # the same mathematics as DDP: gradients averaged over the ranks, norms of whole matrices
    assert runs["whole"]["train_curve"] == pytest.approx(runs["ddp"]["train_curve"], rel=1e-4)
    assert [v["loss"] for v in runs["whole"]["val"]] == pytest.approx(
        [v["loss"] for v in runs["ddp"]["val"]], rel=1e-4
    )
    assert runs["split"]["train_curve"] == pytest.approx(runs["whole"]["train_curve"], rel=1e-6)

    torch_adam = _torchrun([*fsdp, "--optimizer", "adam", "--out", "adam"], tmp_path)
    # each rank exits with 2 (a ValueError); torchrun itself reports 1
    assert torch_adam.returncode != 0 and "needs a modnorm optimizer" in torch_adam.stderr
    alone = _torchrun([*fsdp, "--out", "alone"], tmp_path, launch=False)
    assert alone.returncode == 2 and "launch with torchrun" in alone.stderr
    # one process under torchrun is a process group of one: FSDP runs there (one GPU, say)
    one = _torchrun([*fsdp, "--out", "one"], tmp_path, nproc=1)
    assert one.returncode == 0, one.stdout + one.stderr
    assert json.loads((tmp_path / "one" / "train.json").read_text())["world_size"] == 1
    assert (tmp_path / "one" / "checkpoint").is_dir()


def test_a_split_unfolded_convolution_matches_one_process(runs: list[dict[str, Any]]) -> None:
    # its matrix's columns are whole input channels, cut unevenly among the ranks; the warm
    # start of its norm is reused on the second pass
    net = _conv_net()
    want = [_maps(net, _grads(_conv_net)) for _ in range(2)]
    for run in runs:
        got = run["fsdp"]
        for dim in (0, 1):
            assert got[f"conv_split{dim}"] == [0]  # the unfolded one (applied first)
            for maps, ref in zip(got[f"conv_maps{dim}"], want, strict=True):
                torch.testing.assert_close(maps["norm"], ref["norm"], rtol=1e-5, atol=0)
                for g, w in zip(maps["normalize"], ref["normalize"], strict=True):
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item())
                for g, w in zip(maps["dualize"], ref["dualize"], strict=True):
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", list(SPLIT_NETS))
def test_a_matrix_larger_than_an_even_share_is_computed_by_every_rank(
    kind: str, runs: list[dict[str, Any]]
) -> None:
    # Its norm from the all-reduced Gram matrix of its short side, its dual map by
    # Newton–Schulz on each rank's slice of its long side: the same maps and the same
    # training as one process, without gathering it, however it was sharded.
    make_net, big = SPLIT_NETS[kind]
    shapes = [tuple(atom.weight.shape) for atom, _ in make_net().atom_shares()]
    want = _maps(make_net(), _grads(make_net))
    reference = {}
    for name in SPLIT:
        net = make_net()
        _train(net, OPTIMIZERS[name](net), 0, 1)
        reference[name] = _full(net.parameters())
    for run in runs:
        got = run["fsdp"]
        for dim in (0, 1):
            assert got[f"{kind}_split{dim}"] == [shapes.index(big)]
            maps = got[f"{kind}_maps{dim}"]
            torch.testing.assert_close(maps["norm"], want["norm"], rtol=1e-5, atol=0)
            for g, w in zip(maps["normalize"], want["normalize"], strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item())
            for g, w in zip(maps["dualize"], want["dualize"], strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-9)  # the sums' order, no more
            assert all(got[f"{kind}_layout{dim}"])  # each rank gets its own slice back
        # bfloat16 steps but the last: the same dual pairing ⟨G, dualize(G)⟩ to 1e-3
        grads = _grads(make_net)
        pair = [(g * d).sum() for g, d in zip(grads, want["dualize"], strict=True)]
        mixed = [(g * d).sum() for g, d in zip(grads, got[f"{kind}_mixed"], strict=True)]
        torch.testing.assert_close(torch.stack(mixed), torch.stack(pair), rtol=1e-3, atol=0)
        for name in SPLIT:
            for g, w in zip(got[f"{kind}_{name}"], reference[name], strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_hsdp_on_four_ranks_matches_one_process(tmp_path: Path) -> None:
    # The replicas (2 ranks each) split the atoms between them, each atom computed on one
    # rank of the four (split atoms: by the two ranks of one replica); they agree with one
    # process on the combined batch, and their state dicts hold the same warm starts.
    from torch.distributed.tensor import Replicate, Shard  # also: loading DTensors needs it

    runs = _spawn(_hsdp_worker, tmp_path, timeout=180.0, nprocs=4)

    for kind, make_net in {"resmlp": _net, "tall": _tall_net, "wide": _wide_net}.items():
        for name in SPLIT:
            net = make_net()
            live = sum(share > 0 for _, share in net.atom_shares())
            split = 0 if kind == "resmlp" else 1  # the 300 × 120 matrix (SPLIT_NETS)
            # every step computes each other atom once in the world (a norm or a dual map)
            computed = [run[f"{kind}_{name}_computed"] for run in runs]
            assert sum(computed) == STEPS * (live - split), computed
            together = [run[f"{kind}_{name}_together"] for run in runs]
            assert sum(together) == STEPS * split * 2, together  # one replica's two ranks
            first = runs[0][f"{kind}_{name}_warm_start"]
            for run in runs[1:]:
                for a, b in zip(run[f"{kind}_{name}_warm_start"], first, strict=True):
                    torch.testing.assert_close(a["_v"], b["_v"], rtol=0, atol=0)
            _train(net, OPTIMIZERS[name](net), 0, 1)
            want = _full(net.parameters())
            for rank, run in enumerate(runs):
                assert run[f"{kind}_{name}_placements"][0] == (Replicate(), Shard(0))
                for i, (g, w) in enumerate(zip(run[f"{kind}_{name}"], want, strict=True)):
                    torch.testing.assert_close(
                        g, w, rtol=0, atol=1e-6, msg=f"{kind} {name} rank {rank} param {i}"
                    )


def test_tensor_parallel_on_four_ranks_matches_one_process(tmp_path: Path) -> None:
    # modnorm's Linears cut by tensor parallelism (alone, and with FSDP2 over the other mesh
    # dimension, whose ranks then split the atoms as HSDP's replicas do) train as on one
    # process on the combined batch: the norms and dual maps are those of the full matrices.
    from torch.distributed.tensor import Shard

    from modnorm.parallel import megatron_plan

    runs = _spawn(_tp_worker, tmp_path, timeout=180.0, nprocs=4)
    for name in SPLIT:
        net = _tall_net()
        _train(net, OPTIMIZERS[name](net), 0, 1)
        want = _full(net.parameters())
        for key in TP_RUNS:
            for rank, run in enumerate(runs):
                for i, (g, w) in enumerate(zip(run[f"{key}_{name}"], want, strict=True)):
                    torch.testing.assert_close(
                        g, w, rtol=0, atol=1e-6, msg=f"{key} {name} rank {rank} param {i}"
                    )
                warm = [w["_v"] for w in run[f"{key}_{name}_warm_start"]]
                first = [w["_v"] for w in runs[0][f"{key}_{name}_warm_start"]]
                for a, b in zip(warm, first, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
        placements = runs[0][f"tp_{name}_placements"]
        assert placements[:2] == [(Shard(0),), (Shard(1),)] and placements[2] == ()
        placements = runs[0][f"fsdp_tp_{name}_placements"]
        assert [p[1] for p in placements[:2]] == [Shard(0), Shard(1)]  # cut over both
        assert placements[2] == (Shard(0),)  # FSDP2's alone, on the dp submesh
        # loss parallel: the head's rows (the classes) cut over tp, the logits left cut
        assert runs[0][f"fsdp_tp_loss_{name}_placements"][2][1] == Shard(0)
    # the GPT cut by megatron_plan: heads and MLPs split over tp, with the biases of q, v
    # and the MLP's input cut along (and the others whole) in the affine one, and with the
    # residual stream cut along the positions too under sequence parallelism
    cuts = {"": 12, "_affine": 18, "_sp": 12}
    for name, (suffix, affine, _) in itertools.product(SPLIT, GPT_TP_RUNS):
        net = _gpt(affine)
        _train_gpt(net, OPTIMIZERS[name](net), 0, 1)
        want = _full(net.parameters())
        for key in ("gpt_tp", "gpt_fsdp_tp"):
            key = f"{key}{suffix}"
            assert runs[0][f"{key}_{name}_tp_cuts"] == cuts[suffix]
            # the 8 positions of a sequence, or each tp rank's 4 under sequence parallelism
            assert runs[0][f"{key}_{name}_positions"] == {4 if suffix == "_sp" else 8}
            assert len(megatron_plan(_gpt(affine))) == cuts[suffix]
            for rank, run in enumerate(runs):
                for i, (g, w) in enumerate(zip(run[f"{key}_{name}"], want, strict=True)):
                    torch.testing.assert_close(
                        g, w, rtol=0, atol=1e-6, msg=f"{key} {name} rank {rank} param {i}"
                    )
    for run in runs:
        for style in ("ColwiseParallel", "RowwiseParallel"):
            torch.testing.assert_close(run[f"embedding_{style}"], run["embedding"], rtol=0, atol=0)

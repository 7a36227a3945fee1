"""modnorm under torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo) against one
process that sees the combined batch (float64, so agreement to 1e-6 is a real check)."""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Callable
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


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 5, (16,), generator=gen)


def _train(model: Any, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """``STEPS`` steps; this rank sees its slice of each batch (the mean loss over its slice:
    DDP and FSDP2 average the gradients, so together that is the mean over the batch)."""
    for step in range(STEPS):
        x, y = _batch(step)
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


def _grads() -> list[torch.Tensor]:
    """A fixed gradient-shaped list (the same on every rank)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in _net().parameters()]


def _maps(net: mn.Module, grads: list[Any]) -> dict[str, Any]:
    """norm, normalize and dualize of ``grads``, in this order on one network (the warm
    starts of the spectral norms carry over from call to call, identically everywhere)."""
    return {
        "norm": net.norm(grads),
        "normalize": _full(net.normalize(grads, 0.3)),
        "dualize": _full(net.dualize(grads, 0.3)),
    }


def _spawn(worker: Callable[..., None], tmp: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run ``worker(rank, init_file, out_dir)`` on ``WORLD`` processes (a hang is killed, an
    error in one re-raised here); the results each saved."""
    ctx = mp.start_processes(
        worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{worker.__name__} did not finish within {timeout:.0f} s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


# ---- the 2-process side: one spawn runs every scenario --------------------------------------


def _ddp(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

    result: dict[str, Any] = {}
    for name, make in OPTIMIZERS.items():
        net = _net()
        model = DDP(net)
        _train(model, make(model), rank, WORLD)  # the optimizer unwraps DDP
        result[name] = _full(net.parameters())
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
    on_2d = [distribute_tensor(g, mesh2d, [Replicate(), Shard(0)]) for g in grads]
    result["mesh_error"] = error(lambda: _net().normalize(on_2d))
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


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes on a small machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    result = {"ddp": _ddp(rank), "fsdp": _fsdp(rank)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return _spawn(_worker, Path(tmp))


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


@pytest.mark.parametrize("layout", ["shard0", "shard1", "replicate"])
def test_norm_normalize_dualize_of_sharded_tensors_are_those_of_the_full_tensors(
    layout: str, runs: list[dict[str, Any]]
) -> None:
    want = _maps(_net(), _grads())
    for run in runs:
        got = run["fsdp"][layout]
        for g, w in zip(got["dualize"], want["dualize"], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
        # Spectral norms agree to Lanczos's tolerance (1e-5), not to rounding: the owning rank
        # batches other matrices together than one process does, and a batch iterates until
        # all its members have converged, so a matrix may stop at another step.
        torch.testing.assert_close(got["norm"], want["norm"], rtol=1e-5, atol=0)
        for g, w in zip(got["normalize"], want["normalize"], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * w.abs().max().item())
        # the results keep the input's layout: each rank holds its slice, not the full tensor
        assert all(a and b for a, b in run["fsdp"][f"{layout}_layout"])


def test_sharded_bad_input_gets_clear_errors(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        errors = run["fsdp"]
        assert "placement Partial" in errors["partial_error"]
        assert "2-D device mesh" in errors["mesh_error"]
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

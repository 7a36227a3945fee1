"""Step time of modnorm's optimizers under DDP, FSDP2 and tensor parallelism (2 CPU
processes, gloo).

For a character-level GPT (random tokens: the data does not change the time), each process
trains with ``torch.optim.AdamW``, ``mn.optim.Adam`` and ``mn.optim.Dual``, first wrapped in
DistributedDataParallel, then sharded with ``fully_shard`` (one FSDP unit per atom), then cut
by ``megatron_plan`` over the 2 ranks (tensor parallel: both ranks see the same batch, of
twice the sequences, so that every strategy's step covers the same tokens), and rank 0
prints the median time per step of

* forward + backward (with DDP's all-reduce or FSDP2's all-gathers and reduce-scatter),
* ``optimizer.step``,
* inside it, ``normalize`` / ``dualize`` (``opt._shape``), in wall time and in the CPU time
  of the calling thread (which leaves out waiting: on a shared machine the steadier number),
* inside ``step``, modnorm's own communication (``torch.distributed.gather``, ``scatter``,
  ``broadcast``, ``all_reduce``, ``all_gather_object``): gathering each atom's tensor to the
  rank that owns it, scattering dual maps back, sharing the norms and the finiteness check.
  Collective time includes waiting for the other rank.

    python benchmarks/distributed.py --width 256
    python benchmarks/distributed.py --width 256 --strategies tp   # writes ..._w256_tp.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import modnorm as mn
from modnorm import experiments as ex

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "torch_adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "mn_adam": lambda m: mn.optim.Adam(m, lr=0.5),
    "mn_dual": lambda m: mn.optim.Dual(m, lr=0.1),
}


def _timed(clock: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding its wall time to ``clock[0]`` and this thread's CPU time to ``clock[1]``
    (the CPU time does not count waiting, for the CPU or for the other rank)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - t
            clock[1] += time.thread_time() - c

    return wrapper


def build(strategy: str, args: argparse.Namespace) -> Any:
    """The GPT (same weights on every rank), wrapped in DDP, sharded by FSDP2 or cut by
    tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from modnorm.parallel import megatron_plan

    torch.manual_seed(0)
    model = mn.GPT(65, args.context, args.width, max(2, args.width // 64), args.blocks)
    if strategy == "ddp":
        return DistributedDataParallel(model)
    if strategy == "tp":
        return parallelize_module(model, init_device_mesh("cpu", (2,)), megatron_plan(model))
    for atom, _ in model.atom_shares():
        fully_shard(atom)
    return fully_shard(model)


def measure(strategy: str, opt_name: str, args: argparse.Namespace, rank: int) -> dict[str, float]:
    wrapped = build(strategy, args)
    opt = OPTIMIZERS[opt_name](wrapped)
    tp = strategy == "tp"  # the same batch on both ranks, the whole one
    gen = torch.Generator().manual_seed(1 if tp else 1 + rank)
    batch = 2 * args.batch if tp else args.batch
    shape, comm = [0.0, 0.0], [0.0, 0.0]
    patches = [
        mock.patch.object(dist, name, _timed(comm, getattr(dist, name)))
        for name in ("gather", "scatter", "broadcast", "all_reduce", "all_gather_object")
    ]
    if isinstance(opt, mn.optim.ModularOptimizer):
        patches.append(mock.patch.object(opt, "_shape", _timed(shape, opt._shape)))
    rows: list[tuple[float, ...]] = []
    for p in patches:
        p.start()
    try:
        for _ in range(args.warmup + args.steps):
            tokens = torch.randint(0, 65, (batch, args.context + 1), generator=gen)
            dist.barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(wrapped(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            shape[:] = comm[:] = [0.0, 0.0]  # only what happens inside step
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1, shape[0], shape[1], comm[0]))
    finally:
        for p in patches:
            p.stop()
    keys = (
        "fwd_bwd_ms",
        "step_ms",
        "normalize_or_dualize_ms",
        "normalize_or_dualize_cpu_ms",
        "modnorm_comm_ms",
    )
    return {
        k: 1e3 * statistics.median(r[i] for r in rows[args.warmup :]) for i, k in enumerate(keys)
    }


def worker(rank: int, args: argparse.Namespace, init_file: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(minutes=5),
    )
    rows = []
    for strategy in args.strategies.split(","):
        for opt_name in OPTIMIZERS:
            row = {
                "strategy": strategy,
                "optimizer": opt_name,
                **measure(strategy, opt_name, args, rank),
            }
            rows.append(row)
            if rank == 0:
                print(
                    f"{strategy:>5} {opt_name:>11} | fwd+bwd {row['fwd_bwd_ms']:7.1f} ms | "
                    f"step {row['step_ms']:7.1f} ms | normalize/dualize "
                    f"{row['normalize_or_dualize_ms']:7.1f} ms (CPU "
                    f"{row['normalize_or_dualize_cpu_ms']:7.1f} ms) | modnorm communication "
                    f"{row['modnorm_comm_ms']:6.1f} ms",
                    flush=True,
                )
    if rank == 0:
        torch.save(rows, Path(out) / "rows.pt")
    dist.barrier()  # ranks tear gloo down together: one leaving early can abort
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--strategies", default="ddp,fsdp2", help="of ddp, fsdp2, tp")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    unknown = set(args.strategies.split(",")) - {"ddp", "fsdp2", "tp"}
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}: choose from ddp, fsdp2, tp")
    print(
        f"torch {torch.__version__}, 2 processes × {args.threads} threads, GPT width "
        f"{args.width}, {args.blocks} blocks, {args.batch}×{args.context} tokens per rank"
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, str(Path(tmp) / "init"), tmp), nprocs=2)
        rows = torch.load(Path(tmp) / "rows.pt")
    result = {
        "torch": torch.__version__,
        "machine": platform.platform(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.strategies == "ddp,fsdp2" else "_" + args.strategies.replace(",", "_")
    path = args.out / f"distributed_cpu_w{args.width}{suffix}.json"
    ex.write_json_atomic(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Train a character-level GPT on Shakespeare, sharded with FSDP2, with a modnorm optimizer.

torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --steps 100 --optimizer dual
torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --stop-after 50 --checkpoint ck
torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --checkpoint ck   # steps 51 to 200
torchrun --nproc-per-node 4 examples/train_gpt_fsdp.py --replicas 2      # HSDP: 2 × 2 ranks
torchrun --nproc-per-node 4 examples/train_gpt_fsdp.py --tp 2            # FSDP2 × tensor parallel
torchrun --nproc-per-node 4 examples/train_gpt_fsdp.py --tp 2 --sequence-parallel

``fully_shard`` turns every parameter into a DTensor of which each rank holds a slice. The
modular norm of an atom is global, so each atom's norm and dual map (Newton–Schulz) are
computed by one rank, the atoms balanced across ranks by cost (a matrix too large for one
rank by all of them together), and each rank keeps its slice of the result
(docs/distributed.md). Build the optimizer after ``fully_shard``: it replaces the
parameters. With ``--tp``, each block's heads and MLP are first cut across ``tp`` ranks
(``megatron_plan``), which see the same batches; ``--sequence-parallel`` also cuts the
residual stream between the blocks along the positions. Runs on CPU with gloo, or on GPUs
with NCCL.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module

import modnorm as mn
from modnorm.data import text, text_windows
from modnorm.distributed import load_checkpoint, save_checkpoint
from modnorm.parallel import megatron_plan

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = {
    "adam": lambda m, lr: mn.optim.AdamW(m, lr, betas=(0.9, 0.95), weight_decay=0.01),
    "dual": lambda m, lr: mn.optim.Dual(m, lr),
    "sgd": lambda m, lr: mn.optim.SGD(m, lr, momentum=0.9, nesterov=True),
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", type=Path, default=ROOT / "../shared/data/shakespeare.txt")
parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
parser.add_argument("--lr", type=float, default=1.0, help="modular norm of each update")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
parser.add_argument("--context", type=int, default=64)
parser.add_argument("--width", type=int, default=128)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--blocks", type=int, default=2)
parser.add_argument(
    "--checkpoint", type=Path, help="a directory: resumed from if it exists, saved at the end"
)
parser.add_argument("--stop-after", type=int, help="stop after this step (and checkpoint)")
parser.add_argument("--replicas", type=int, default=1, help="HSDP: shard within each replica")
parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (cut heads, MLPs)")
parser.add_argument("--sequence-parallel", action="store_true", help="with --tp: cut positions")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
torch.set_flush_denormal(True)

data = text(args.data)
torch.manual_seed(0)  # the same initial weights everywhere, before each rank keeps a slice
model = mn.GPT(data.num_classes, args.context, args.width, args.heads, args.blocks).to(device)
mesh = None  # all ranks shard every weight; with --replicas, HSDP on a 2-D mesh
for n in (args.replicas, args.tp):
    if world % n:
        raise SystemExit(f"--replicas {args.replicas} / --tp {args.tp} must divide {world} ranks")
if args.replicas > 1 and args.tp > 1:
    raise SystemExit("--replicas and --tp together need a 3-D mesh, which this script lacks")
data_rank = rank  # ranks with the same data rank see the same batches
if args.replicas > 1:
    shape = (args.replicas, world // args.replicas)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
if args.tp > 1:
    tp_mesh = init_device_mesh(
        device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp")
    )
    plan = megatron_plan(model, sequence_parallel=args.sequence_parallel)
    parallelize_module(model, tp_mesh["tp"], plan)
    mesh, data_rank = tp_mesh["dp"], tp_mesh["dp"].get_local_rank()
for atom, _ in model.atom_shares():  # one FSDP unit per weight matrix (a block would do too)
    fully_shard(atom, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = OPTIMIZERS[args.optimizer](model, args.lr)  # after fully_shard, on the DTensors
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / args.steps)
windows = torch.Generator().manual_seed(1 + data_rank)  # different batches on different ranks
first = 1
if args.checkpoint is not None and args.checkpoint.exists():
    # DCP reshards: the checkpoint may come from another number of ranks (or one process)
    took = time.perf_counter()
    extra = load_checkpoint(args.checkpoint, optimizer)
    schedule.load_state_dict(extra["schedule"])
    first = extra["step"] + 1
    if len(extra["windows"]) == world:  # the same ranks: each continues its own batches
        windows.set_state(extra["windows"][rank])
    if rank == 0:
        print(f"resumed at step {first} in {time.perf_counter() - took:.2f} s")


def batch(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = text_windows(tokens, args.batch, args.context, windows)
    return x.to(device), y.to(device)


start = time.perf_counter()
last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
for step in range(first, last + 1):
    x, y = batch(data.train)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad()
    loss.backward()  # FSDP2 reduce-scatters (averages) the gradients here
    optimizer.step()
    schedule.step()
    if step % max(1, args.steps // 10) == 0 or step == last:
        with torch.no_grad():
            x, y = batch(data.val)
            val = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        losses = torch.stack([loss.detach(), val])
        dist.all_reduce(losses)  # the mean over ranks, for the log
        train_loss, val_loss = (losses / world).tolist()
        if rank == 0:
            took = time.perf_counter() - start
            print(f"step {step:5d}  train {train_loss:.3f}  val {val_loss:.3f}  ({took:.0f} s)")

if args.checkpoint is not None:
    took = time.perf_counter()
    streams: list = [None] * world
    dist.all_gather_object(streams, windows.get_state())  # each rank's batches, to resume them
    extra = {"step": last, "schedule": schedule.state_dict(), "windows": streams}
    save_checkpoint(args.checkpoint, optimizer, extra)  # every rank writes its slices
    if rank == 0:
        print(f"saved {args.checkpoint} in {time.perf_counter() - took:.2f} s")

held = sum(p.to_local().numel() for p in model.parameters())
total = sum(p.numel() for p in model.parameters())
print(f"rank {rank} holds {held} of the {total} weights")
dist.barrier()  # ranks tear gloo down together: one leaving early can abort
dist.destroy_process_group()

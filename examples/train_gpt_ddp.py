"""Train a character-level GPT on Shakespeare with DistributedDataParallel and a modnorm optimizer.

torchrun --nproc-per-node 2 examples/train_gpt_ddp.py --steps 100 --optimizer dual

Nothing changes for modnorm under DDP: DDP averages the gradients across ranks during
``backward``, so every rank normalizes (or dualizes) the same gradient and takes the same step.
Each rank reads its own random windows; the batch per step is ``--batch`` times the world size.
Runs on CPU with gloo, or on GPUs with NCCL (one per rank) when CUDA is available.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import modnorm as mn
from modnorm.data import text, text_windows

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
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
torch.set_flush_denormal(True)

data = text(args.data)
torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
model = mn.GPT(data.num_classes, args.context, args.width, args.heads, args.blocks).to(device)
ddp = DistributedDataParallel(model)
optimizer = OPTIMIZERS[args.optimizer](ddp, args.lr)  # the optimizer unwraps DDP
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / args.steps)
windows = torch.Generator().manual_seed(1 + rank)  # different batches on different ranks


def batch(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = text_windows(tokens, args.batch, args.context, windows)
    return x.to(device), y.to(device)


start = time.perf_counter()
for step in range(1, args.steps + 1):
    x, y = batch(data.train)
    loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad()
    loss.backward()  # DDP all-reduces (averages) the gradients here
    optimizer.step()
    schedule.step()
    if step % max(1, args.steps // 10) == 0 or step == args.steps:
        with torch.no_grad():
            x, y = batch(data.val)
            val = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        losses = torch.stack([loss.detach(), val])
        dist.all_reduce(losses)  # the mean over ranks, for the log
        train_loss, val_loss = (losses / world).tolist()
        if rank == 0:
            took = time.perf_counter() - start
            print(f"step {step:5d}  train {train_loss:.3f}  val {val_loss:.3f}  ({took:.0f} s)")

# Every rank holds the same weights: check it, as DDP itself never does.
first = torch.cat([p.detach().flatten() for p in model.parameters()])
spread = first.clone()
dist.all_reduce(spread, op=dist.ReduceOp.MAX)
if rank == 0:
    print(f"largest difference between ranks' weights: {(spread - first).abs().max().item():.1e}")
dist.barrier()  # ranks tear gloo down together: one leaving early can abort
dist.destroy_process_group()

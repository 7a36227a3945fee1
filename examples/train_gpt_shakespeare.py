"""Train a character-level GPT on Shakespeare with a modnorm optimizer (never downloads).

python examples/train_gpt_shakespeare.py --steps 200 --optimizer dual
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modnorm as mn

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
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--context", type=int, default=64)
parser.add_argument("--width", type=int, default=128)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--blocks", type=int, default=2)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()
torch.set_flush_denormal(True)
torch.manual_seed(0)

text = args.data.read_text(encoding="utf-8")
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text])
split = int(0.9 * len(data))
train, val = data[:split], data[split:]


def get_batch(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(source) - args.context - 1, (args.batch, 1))
    idx = start + torch.arange(args.context + 1)
    chunk = source[idx].to(args.device)
    return chunk[:, :-1], chunk[:, 1:]


def loss_on(model: mn.Module, source: torch.Tensor) -> torch.Tensor:
    x, y = get_batch(source)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


model = mn.GPT(len(chars), args.context, args.width, args.heads, args.blocks).to(args.device)
optimizer = OPTIMIZERS[args.optimizer](model, args.lr)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / args.steps)
start = time.perf_counter()
for step in range(1, args.steps + 1):
    loss = loss_on(model, train)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    if step % max(1, args.steps // 10) == 0 or step == args.steps:
        with torch.no_grad():
            val_loss = sum(loss_on(model, val).item() for _ in range(4)) / 4
        took = time.perf_counter() - start
        print(f"step {step:5d}  train {loss.item():.3f}  val {val_loss:.3f}  ({took:.0f} s)")

tokens = torch.zeros(1, 1, dtype=torch.long, device=args.device)  # the first character
with torch.no_grad():
    for _ in range(200):
        logits = model(tokens[:, -args.context :])[:, -1]
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
print("".join(chars[i] for i in tokens[0].tolist()))

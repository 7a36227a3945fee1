"""Train a residual MLP on sklearn's handwritten digits with each modnorm optimizer.

A plain PyTorch loop: only the optimizer line changes. ``lr`` is the modular norm of every
update, and a scheduler decays it linearly to zero.

    python examples/train_digits.py --steps 300 --width 128
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import modnorm as mn

OPTIMIZERS = {
    "sgd": lambda m, lr: mn.optim.SGD(m, lr, momentum=0.9, nesterov=True),
    "adam": lambda m, lr: mn.optim.Adam(m, lr),
    "adamw": lambda m, lr: mn.optim.AdamW(m, lr, weight_decay=0.1),
    "dual": lambda m, lr: mn.optim.Dual(m, lr),
    "normalized-radam": lambda m, lr: mn.optim.Normalized(m, torch.optim.RAdam, lr),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5, help="modular norm of each update")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # near-zero losses make denormals that slow CPUs down

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 8 - 1, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]

    for name in args.optimizers:
        torch.manual_seed(0)
        model = mn.ResMLP(64, 10, width=args.width, num_blocks=args.blocks)
        optimizer = OPTIMIZERS[name](model, args.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / args.steps)
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = train[torch.randint(0, len(train), (args.batch,))]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        seconds = time.perf_counter() - start
        print(
            f"{name:>17}: train loss {loss.item():.4f}  test accuracy {accuracy:.3f}  "
            f"({seconds:.1f} s)"
        )


if __name__ == "__main__":
    main()

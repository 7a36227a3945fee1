"""Small GPT on Shakespeare: modnorm against the reference Modula (PyPI modula==0.0.0.0.0.2)
on the same corpus, data stream, configuration and seed.

The configuration is the reference README's: context 64, 4 heads, width 128, 4 blocks,
batch 12, 2000 steps, normalized Adam (β = 0.9, 0.99) at lr 0.5 decayed linearly to 0,
weight decay 0.01. Modula reports train 1.65 / test 1.80 on tinyshakespeare; our corpus is a
different Shakespeare text (see shared/data/README.md), so the numbers compare the two
libraries here, not with that report.

    python benchmarks/gpt_shakespeare.py [--data ../shared/data/shakespeare.txt] [--steps 2000]

Writes benchmarks/results/gpt_shakespeare.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modnorm as mn
from modnorm import experiments as ex
from modnorm.data import text, text_windows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    context=64, heads=4, width=128, blocks=4, batch=12, lr=0.5, wd=0.01, betas=(0.9, 0.99)
)


def eval_loss(forward, tokens: torch.Tensor, device: str, batches: int = 50) -> float:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = text_windows(tokens, 32, CONFIG["context"], gen)  # type: ignore[arg-type]
            logits = forward(x.to(device))
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))
            )
    return total / batches


def run_modnorm(data, steps: int, seed: int, device: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    torch.manual_seed(seed)
    c = CONFIG
    net = mn.GPT(data.num_classes, c["context"], c["width"], c["heads"], c["blocks"]).to(device)
    opt = mn.optim.Adam(net, lr=c["lr"], betas=c["betas"], weight_decay=c["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    return _loop(net, lambda: (opt.step(), sched.step()), opt.zero_grad, data, steps, seed, device)


def run_modula(data, steps: int, seed: int, device: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    from modula.compound import GPT  # type: ignore[import-not-found]

    torch.manual_seed(seed)
    c = CONFIG
    d_head = c["width"] // c["heads"]
    net = GPT(data.num_classes, c["context"], c["heads"], c["width"], d_head, d_head, c["blocks"])
    weights = net.initialize(device=device)
    with torch.no_grad():
        mom1, mom2 = 0 * weights, 0 * weights
    state = {"step": 0}
    beta1, beta2 = c["betas"]

    def step() -> None:
        # The reference README's loop: Adam moments with its (1−β)^(t/(t+1)) warm-up,
        # normalize in the modular norm, regularize, subtract.
        t = state["step"]
        schedule = 1 - t / steps
        with torch.no_grad():
            grad = weights.grad()
            mom1.__iadd__((1 - beta1) ** (t / (t + 1)) * (grad - mom1))
            mom2.__iadd__((1 - beta2) ** (t / (t + 1)) * (grad**2 - mom2))
            update = mom1 / mom2**0.5
            update.zero_nans()
            net.normalize(update, target_norm=c["lr"] * schedule)
            net.regularize(weights, strength=c["lr"] * schedule * c["wd"])
            weights.__isub__(update)
        state["step"] = t + 1

    class Wrapped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x, weights)

    return _loop(Wrapped(), step, weights.zero_grad, data, steps, seed, device)


def _loop(model, step, zero_grad, data, steps: int, seed: int, device: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    gen = torch.Generator().manual_seed(10_000 + seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = data.batch(CONFIG["batch"], gen, CONFIG["context"])
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))
        zero_grad()
        loss.backward()
        step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    tail = losses[-max(1, steps // 10) :]
    return {
        "train_loss": sum(tail) / len(tail),
        "train_eval": eval_loss(model, data.train, device),
        "test_loss": eval_loss(model, data.val, device),
        "wall_time": wall,
        "curve": losses[:: max(1, steps // 100)],
    }


def _stat(rs: list[dict], key: str) -> str:  # type: ignore[type-arg]
    xs = [r[key] for r in rs]
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))
    return f"{m:.3f}" + (f" ± {sd:.3f}" if len(xs) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "shakespeare.txt"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpt_shakespeare.json"))
    args = p.parse_args()
    torch.set_flush_denormal(True)
    data = text(args.data)
    runners = {"modnorm": run_modnorm}
    try:
        import modula  # type: ignore[import-not-found]  # noqa: F401

        runners["modula (PyPI 0.0.0.0.0.2)"] = run_modula
    except ImportError:
        print("modula is not installed (pip install -e .[bench]): skipping the reference")
    results: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for name, fn in runners.items():
        for seed in range(args.seeds):
            r = fn(data, args.steps, seed, args.device)
            results.setdefault(name, []).append(r)
            print(
                f"{name} seed {seed}: train {r['train_loss']:.3f} "
                f"test {r['test_loss']:.3f} ({r['wall_time']:.0f}s)"
            )
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    out = {
        "config": {
            **CONFIG,
            "steps": args.steps,
            "data": Path(args.data).name,
            "seeds": args.seeds,
        },
        "device": device,
        "torch": torch.__version__,
        "results": results,
    }
    ex.write_json_atomic(Path(args.out), out)
    print("\n| library | train loss (last 10% of steps) | train loss (eval) | test loss | time |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        cells = [_stat(rs, key) for key in ("train_loss", "train_eval", "test_loss", "wall_time")]
        print(f"| {name} | " + " | ".join(cells) + " s |")
    print(f"\ndevice: {device}; wrote {args.out}")


if __name__ == "__main__":
    main()

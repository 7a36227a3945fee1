"""How often Lanczos checks its stopping rule: host synchronizations against extra steps.

Each check of the Lanczos stopping rule copies (α, β) to the host, which on a GPU waits for
every queued kernel; a network's matrix shapes run side by side, so one check copies them all
(`modnorm.linalg.spectral_norms_batches`). This trains a ResMLP and a GPT with
`mn.optim.Adam` for a few steps under several check intervals (`linalg._CHECK_EVERY`, the
entry for the device's kind) and reports, per norm computation after the warm-up: host
copies, Lanczos steps of the slowest shape, the worst relative error against an exact SVD
(computed outside the timed region), and the wall time of the steps.

    python benchmarks/lanczos_checks.py                 # CPU, one thread
    python benchmarks/lanczos_checks.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import modnorm as mn
import modnorm.atoms
import modnorm.linalg
from modnorm import experiments as ex


def problems(device: str) -> dict[str, tuple[Callable[[], mn.Module], Callable[..., Any]]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen).to(device)
    y = torch.randint(0, 10, (256,), generator=gen).to(device)
    tokens = torch.randint(0, 65, (8, 65), generator=gen).to(device)

    def mlp_loss(net: mn.Module) -> torch.Tensor:
        return F.cross_entropy(net(x + torch.randn_like(x)), y)  # fresh input noise

    def gpt_loss(net: mn.Module) -> torch.Tensor:
        return F.cross_entropy(net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    return {
        "resmlp 512x4": (lambda: mn.ResMLP(64, 10, width=512, num_blocks=4), mlp_loss),
        "gpt 256x2": (lambda: mn.GPT(65, 64, 256, 4, 2), gpt_loss),
    }


OPTIMIZERS: dict[str, Callable[[mn.Module], torch.optim.Optimizer]] = {
    "adam": lambda net: mn.optim.Adam(net, lr=0.02),
    "sgd": lambda net: mn.optim.SGD(net, lr=0.02),
    "sgd-momentum": lambda net: mn.optim.SGD(net, lr=0.02, momentum=0.9),
}


def run(
    name: str,
    every: int,
    device: str,
    steps: int,
    warmup: int,
    optimizer: str = "adam",
    fixed: int | None = None,
) -> dict[str, Any]:
    """One training run; ``fixed=k`` runs exactly k Lanczos steps per call, unchecked."""
    build, loss_fn = problems(device)[name]
    torch.manual_seed(0)
    net = build().to(device)
    opt = OPTIMIZERS[optimizer](net)
    calls: list[dict[str, Any]] = []
    batched = modnorm.atoms.spectral_norms_batches
    lanczos_run = modnorm.linalg._Workspace.run
    cpu = torch.Tensor.cpu

    def counted(batches: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        copies: list[int] = []
        steps: dict[int, int] = {}  # per workspace, i.e. per shape

        def copy(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            copies.append(1)
            return cpu(self, *a, **k)

        def stepped(ws: Any, start: int, end: int) -> None:
            steps[id(ws)] = steps.get(id(ws), 0) + end - start
            lanczos_run(ws, start, end)

        if fixed is not None:  # k steps: the first check comes after the last one
            kwargs["max_iter"] = fixed
        torch.Tensor.cpu = copy  # type: ignore[method-assign]
        modnorm.linalg._Workspace.run = stepped  # type: ignore[method-assign]
        try:
            out = batched(batches, *args, **kwargs)
        finally:
            torch.Tensor.cpu = cpu  # type: ignore[method-assign]
            modnorm.linalg._Workspace.run = lanczos_run  # type: ignore[method-assign]
        # small matrices get their exact norm, from one copy of their Gram matrix
        big = [
            (w, s)
            for w, (s, _) in zip(batches, out, strict=True)
            if min(w.shape[1:]) > modnorm.linalg._EXACT_BELOW
        ]
        calls.append({"big": big, "copies": len(copies), "steps": max(steps.values(), default=0)})
        return out

    kind = "cpu" if device == "cpu" else "accelerator"
    old = modnorm.linalg._CHECK_EVERY[kind], modnorm.atoms.spectral_norms_batches
    modnorm.linalg._CHECK_EVERY[kind], modnorm.atoms.spectral_norms_batches = every, counted
    try:
        walls = []
        for step in range(steps):
            if step == warmup:
                calls.clear()
            start = time.perf_counter()
            opt.zero_grad()
            loss_fn(net).backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
    finally:
        modnorm.linalg._CHECK_EVERY[kind], modnorm.atoms.spectral_norms_batches = old
    iterative = [c for c in calls if c["big"]]
    errors = []
    for c in iterative:
        for w, sigma in c["big"]:
            exact = torch.linalg.matrix_norm(w.double(), ord=2)
            errors.append(((sigma.double() - exact).abs() / exact).max().item())
    n = max(1, len(iterative))
    return {
        "model": name,
        "optimizer": optimizer,
        "check_every": every,
        "fixed_steps": fixed,
        "calls": len(iterative),
        "host_copies_per_call": sum(c["copies"] for c in iterative) / n,
        "lanczos_steps_per_call": sum(c["steps"] for c in iterative) / n,
        "worst_relative_error": max(errors, default=0.0),
        "step_ms_median": 1000 * sorted(walls[warmup:])[len(walls[warmup:]) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", default="1,2,4", help="check intervals to compare")
    parser.add_argument("--optimizers", default="adam", help=f"from {sorted(OPTIMIZERS)}")
    parser.add_argument("--fixed", default="", help="also: this many Lanczos steps, unchecked")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schedules = [(int(e), None) for e in args.every.split(",")]
    schedules += [(1, int(k)) for k in args.fixed.split(",") if k]
    rows = [
        run(name, every, args.device, args.steps, args.warmup, optimizer, fixed)
        for name in problems("cpu")
        for optimizer in args.optimizers.split(",")
        for every, fixed in schedules
    ]
    print("| model | optimizer | schedule | host copies / call | Lanczos steps / call (slowest) "
          "| worst rel. error | step ms (median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        schedule = (
            f"{r['fixed_steps']} fixed steps"
            if r["fixed_steps"] is not None
            else f"check every {r['check_every']}"
        )
        print(
            f"| {r['model']} | {r['optimizer']} | {schedule} | {r['host_copies_per_call']:.1f} "
            f"| {r['lanczos_steps_per_call']:.1f} | {r['worst_relative_error']:.1e} "
            f"| {r['step_ms_median']:.1f} |"
        )
    tag = args.device.replace(":", "") if args.device != "cpu" else f"cpu-{args.threads}t"
    path = args.out / f"lanczos_checks_{tag}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

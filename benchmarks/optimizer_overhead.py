"""What normalizing and dualizing cost next to the forward and backward pass.

For a ResMLP and a GPT at several widths, on the CPU (and on a GPU when there is one), trains
a few steps with ``torch.optim.Adam``, ``mn.optim.Adam`` and ``mn.optim.Dual`` and prints the
median time per step of

* forward + backward,
* the base Adam step (``torch.optim.Adam.step``),
* normalization (``module.normalize`` inside ``mn.optim.Adam.step``),
* dualization (``module.dualize``, Newton–Schulz, inside ``mn.optim.Dual.step``), in full
  (float32) and in mixed (bfloat16) precision,

and the optimizer state of each optimizer next to ``torch.optim.Adam``'s (on a GPU also the
peak memory a step allocates on top of the state). Targets (DESIGN §3, the optimizer issue):
normalization ≤ 2 % and dualization ≤ 15 % of forward + backward at width 1024, and no more
state than ``torch.optim.Adam``. Dualization costs ``O(d³)`` per matrix and forward + backward
``O(tokens·d²)``, so its ratio falls as the batch grows: the table also gives the batch (in
examples or tokens) at which it would meet its target, extrapolated linearly.

    python benchmarks/optimizer_overhead.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import modnorm as mn
from modnorm import experiments as ex

TARGETS = {"normalize": 0.02, "dualize": 0.15}


def models(device: str, quick: bool) -> dict[str, tuple[Callable[[int], mn.Module], Any, int]]:
    """name → (build(width), make_batch(generator) → loss function, examples per batch)."""
    gpu = device != "cpu"
    mlp_batch = 1024 if gpu else 256
    seqs, context = (32, 256) if gpu else (8, 128)
    blocks = 2 if quick else 4

    def mlp_loss(gen: torch.Generator) -> Callable[[mn.Module], torch.Tensor]:
        x = torch.randn(mlp_batch, 64, generator=gen).to(device)
        y = torch.randint(0, 10, (mlp_batch,), generator=gen).to(device)
        return lambda m: F.cross_entropy(m(x), y)

    def gpt_loss(gen: torch.Generator) -> Callable[[mn.Module], torch.Tensor]:
        tokens = torch.randint(0, 65, (seqs, context + 1), generator=gen).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        return lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    return {
        "resmlp": (lambda w: mn.ResMLP(64, 10, width=w, num_blocks=blocks), mlp_loss, mlp_batch),
        "gpt": (
            lambda w: mn.GPT(65, context, w, max(1, w // 64), blocks),
            gpt_loss,
            seqs * context,
        ),
    }


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors in the optimizer state (and in a wrapped base optimizer's)."""
    states = list(opt.state.values())
    if isinstance(opt, mn.optim.Normalized):
        states += list(opt.base.state.values())
    return sum(
        t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t)
    )


def measure(
    model: mn.Module,
    opt: torch.optim.Optimizer,
    losses: list[Callable[[mn.Module], torch.Tensor]],
    warmup: int,
    device: str,
) -> dict[str, Any]:
    """Median times (ms) of forward+backward, of ``opt.step`` and of the normalize/dualize
    call inside it, over ``len(losses) - warmup`` steps; the peak memory a step allocates."""

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    shape_times: list[float] = []
    spy: Any = contextlib.nullcontext()
    if isinstance(opt, mn.optim.ModularOptimizer):
        inner = opt._shape

        def timed(*args: Any) -> list[torch.Tensor]:
            sync()
            t = time.perf_counter()
            out = inner(*args)
            sync()
            shape_times.append(time.perf_counter() - t)
            return out

        spy = mock.patch.object(opt, "_shape", side_effect=timed)
    fb, step, peak = [], [], []
    with spy:
        for loss_fn in losses:
            opt.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            loss_fn(model).backward()
            sync()
            t1 = time.perf_counter()
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            opt.step()
            sync()
            t2 = time.perf_counter()
            if device != "cpu":
                peak.append(torch.cuda.max_memory_allocated() - before)
            fb.append(t1 - t0)
            step.append(t2 - t1)

    def ms(xs: list[float]) -> float | None:
        return 1e3 * statistics.median(xs[warmup:]) if xs[warmup:] else None

    return {
        "fwd_bwd_ms": ms(fb),
        "step_ms": ms(step),
        "shape_ms": ms(shape_times),
        "state_bytes": state_bytes(opt),
        "step_peak_bytes": max(peak[warmup:]) if peak[warmup:] else None,
    }


def bench(device: str, widths: list[int], steps: int, warmup: int, quick: bool) -> list[dict]:
    rows = []
    for name, (build, make_loss, examples) in models(device, quick).items():
        for width in widths:
            torch.manual_seed(0)
            base = build(width).to(device)
            gen = torch.Generator().manual_seed(0)
            losses = [make_loss(gen) for _ in range(warmup + steps)]
            optimizers = {
                "torch_adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
                "mn_adam": lambda m: mn.optim.Adam(m, 0.1),
                "mn_dual": lambda m: mn.optim.Dual(m, 0.1),
                "mn_dual_mixed": lambda m: mn.optim.Dual(m, 0.1, precision="mixed"),
                "mn_sgd_momentum": lambda m: mn.optim.SGD(m, 0.1, momentum=0.9),
                "mn_normalized_adam": lambda m: mn.optim.Normalized(m, torch.optim.Adam, 0.1),
            }
            res, trained = {}, {}
            for key, make in optimizers.items():
                model = trained[key] = copy.deepcopy(base)
                # The last two only report memory: one step after the one that creates state.
                timed = ("torch_adam", "mn_adam", "mn_dual", "mn_dual_mixed")
                few = losses if key in timed else losses[:2]
                res[key] = measure(model, make(model), few, min(warmup, len(few) - 1), device)
            fb = statistics.median(
                res[k]["fwd_bwd_ms"] for k in ("torch_adam", "mn_adam", "mn_dual")
            )
            adam_state = res["torch_adam"]["state_bytes"]
            row = {
                "device": device,
                "model": name,
                "width": width,
                "batch_examples": examples,
                "fwd_bwd_ms": fb,
                "torch_adam_step_ms": res["torch_adam"]["step_ms"],
                "mn_adam_step_ms": res["mn_adam"]["step_ms"],
                "normalize_ms": res["mn_adam"]["shape_ms"],
                "mn_dual_step_ms": res["mn_dual"]["step_ms"],
                "dualize_ms": res["mn_dual"]["shape_ms"],
                "normalize_ratio": res["mn_adam"]["shape_ms"] / fb,
                "dualize_ratio": res["mn_dual"]["shape_ms"] / fb,
                "dualize_mixed_ms": res["mn_dual_mixed"]["shape_ms"],
                "dualize_mixed_ratio": res["mn_dual_mixed"]["shape_ms"] / fb,
                "torch_adam_state_bytes": adam_state,
                "extra_state_bytes_over_torch_adam": {
                    k: r["state_bytes"] - adam_state for k, r in res.items() if k != "torch_adam"
                },
                "warm_start_bytes": sum(  # the spectral norms' warm starts, kept on the atoms
                    b.numel() * b.element_size() for b in trained["mn_adam"].buffers()
                ),
                "step_peak_bytes": {k: r["step_peak_bytes"] for k, r in res.items()},
            }
            row["dualize_target_batch"] = int(
                examples * row["dualize_ratio"] / TARGETS["dualize"] + 0.5
            )
            rows.append(row)
            print_row(row)
    return rows


def print_row(r: dict) -> None:
    extra = {k: v / 2**20 for k, v in r["extra_state_bytes_over_torch_adam"].items()}
    print(
        f"{r['device']:>4} {r['model']:>6} {r['width']:>5} | fwd+bwd {r['fwd_bwd_ms']:8.1f} ms | "
        f"adam step {r['torch_adam_step_ms']:7.1f} | normalize {r['normalize_ms']:7.1f} "
        f"({100 * r['normalize_ratio']:5.1f} %) | dualize {r['dualize_ms']:8.1f} "
        f"({100 * r['dualize_ratio']:6.1f} %, ≤15 % at batch ≥ {r['dualize_target_batch']}) | "
        f"mixed {r['dualize_mixed_ms']:8.1f} ({100 * r['dualize_mixed_ratio']:6.1f} %) | "
        f"state over Adam MiB: adam {extra['mn_adam']:+.2f} dual {extra['mn_dual']:+.2f} "
        f"sgd {extra['mn_sgd_momentum']:+.2f} normalized {extra['mn_normalized_adam']:+.2f}",
        flush=True,
    )


def verdict(rows: list[dict]) -> dict[str, Any]:
    """Which targets hold at the largest width, per device and model."""
    out: dict[str, Any] = {}
    for r in rows:
        if r["width"] != max(x["width"] for x in rows):
            continue
        out[f"{r['device']}/{r['model']}/{r['width']}"] = {
            "normalize_le_2pct": r["normalize_ratio"] <= TARGETS["normalize"],
            "dualize_le_15pct": r["dualize_ratio"] <= TARGETS["dualize"],
            "dualize_mixed_le_15pct": r["dualize_mixed_ratio"] <= TARGETS["dualize"],
            "no_more_state_than_adam": {
                k: v <= 0 for k, v in r["extra_state_bytes_over_torch_adam"].items()
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 1 warmup + 3 steps")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu (+ cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # near-zero numbers are denormals that slow CPUs down
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    steps, warmup = (3, 1) if args.quick else (10, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices {devices}")
    rows = []
    for device in devices:
        rows += bench(device, args.widths, steps, warmup, args.quick)
    result = {
        "quick": args.quick,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "targets": TARGETS,
        "rows": rows,
        "verdict": verdict(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    labels = [
        f"cpu-{torch.get_num_threads()}t"
        if d == "cpu"
        else torch.cuda.get_device_name(d).replace("NVIDIA ", "").split()[0]
        for d in devices
    ]
    tag = ("quick" if args.quick else "full") + "_" + "_".join(labels)
    path = args.out / f"optimizer_overhead_{tag}.json"
    ex.write_json_atomic(path, result)
    print(json.dumps(result["verdict"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What each method of the transfer benchmark costs per step (issue #6, "Cost").

For every method of ``benchmarks.peers`` (built by its own builder, as the transfer sweeps
build it), on the ResMLP of those sweeps (2 blocks, batch 128 of digits) and, where the method
has one, on the GPT (context 64, batch 12, 4 heads, 2 blocks), the median over the measured
steps, after warm-up, of

* forward + backward (loss included),
* the optimizer step(s), and inside them the part that shapes the update: modnorm's
  ``normalize`` or ``dualize`` (``_shape``), the reference Modula's ``net.normalize``, or
  ``torch.optim.Muon.step`` for the Muon method,

each in wall time and in ``time.process_time()`` (CPU time of this process, one torch thread:
on a shared machine it is the steadier number), with the optimizer state in bytes, what the
steps add to the module's buffers (modnorm's spectral-norm warm starts), the load average, and
on CUDA the peak memory allocated during the steps. Targets (DESIGN §3, issue #6):
normalize ≤ 2 % and dualize ≤ 15 % of forward + backward at width 1024.

    python -m benchmarks.overhead            # ResMLP 256, 512, 1024; GPT 64, 128, 256
    python -m benchmarks.overhead --quick    # width 32, 1 warm-up + 2 steps (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

import modnorm as mn
from benchmarks import peers
from benchmarks import transfer as tr
from modnorm import data as mn_data
from modnorm import experiments as ex

TARGETS = {"normalize": 0.02, "dualize": 0.15}
RESULTS = Path(__file__).resolve().parent / "results"


def configs(widths: Sequence[int], gpt_widths: Sequence[int]) -> list[ex.SweepConfig]:
    """The transfer sweeps' ResMLP and GPT settings at these widths (an empty list: none)."""
    out = []
    if widths:
        out.append(
            ex.SweepConfig(
                model="resmlp",
                data="digits",
                values=list(widths),
                optimizers=[],
                batch_size=128,
                input_noise=tr.NOISE,
                depth=2,
            )
        )
    if gpt_widths:
        out.append(
            ex.SweepConfig(
                model="gpt",
                data=f"text:{tr.SHAKESPEARE}",
                values=list(gpt_widths),
                optimizers=[],
                batch_size=12,
                context=64,
                num_heads=4,
                depth=2,
            )
        )
    return out


def load_data(cfg: ex.SweepConfig) -> mn_data.Dataset:
    """The sweep's data; for the GPT without the corpus, random tokens over its 65 characters
    (the time of a step does not depend on which tokens it reads)."""
    if cfg.model == "gpt" and not tr.SHAKESPEARE.is_file():
        tokens = torch.randint(0, 65, (100_000,), generator=torch.Generator().manual_seed(0))
        return mn_data.Dataset(kind="text", name="random-65", num_classes=65, train=tokens)
    return mn_data.load(cfg.data, input_noise=cfg.input_noise)


# ---- timing ------------------------------------------------------------------------------------

Clock = tuple[float, float]  # (wall, CPU) seconds


def _now() -> Clock:
    return time.perf_counter(), time.process_time()


def _since(start: Clock) -> Clock:
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


def _spy(obj: Any, name: str, record: list[Clock], sync: Callable[[], None]) -> Any:
    """Patch ``obj.name`` so that each call appends its (wall, CPU) time to ``record``."""
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = _now()
        out = inner(*args, **kwargs)
        sync()
        record.append(_since(start))
        return out

    return mock.patch.object(obj, name, side_effect=timed)


def shaping(opts: Sequence[torch.optim.Optimizer]) -> tuple[str, torch.optim.Optimizer] | None:
    """The call that shapes the update, and the optimizer whose step makes it (if any)."""
    for opt in opts:
        if isinstance(opt, mn.optim.Dual):
            return "dualize", opt
        if isinstance(opt, mn.optim.ModularOptimizer):
            return "normalize", opt
        if isinstance(opt, peers.ModulaAdam):
            return "modula normalize", opt
        if type(opt).__name__ == "Muon":
            return "Muon.step", opt
    return None


def _names(opts: Sequence[torch.optim.Optimizer]) -> list[str]:
    """Class names of the optimizers, numbered where two share one."""
    names = [type(o).__name__ for o in opts]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps between steps: its ``state``, a wrapped base
    optimizer's (``Normalized.base``), and Modula's moment vectors (``ModulaAdam.mom1/2``)."""
    tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    base = getattr(opt, "base", None)
    if isinstance(base, torch.optim.Optimizer):
        return _nbytes(tensors) + state_bytes(base)
    if isinstance(opt, peers.ModulaAdam):
        tensors += [t for v in (opt.mom1, opt.mom2) if v is not None for t in v]
    return _nbytes(tensors)


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(
    model: nn.Module,
    opts: Sequence[torch.optim.Optimizer],
    batches: Sequence[tuple[Tensor, Tensor]],
    warmup: int,
    device: str,
) -> dict[str, Any]:
    """Train on ``batches``; the median (wall, CPU) ms over the steps after ``warmup`` of
    forward + backward, of all optimizer steps, of each optimizer's step and of the call that
    shapes the update; state bytes; buffer bytes the steps added; CUDA peak bytes."""
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    what = shaping(opts)
    shape: list[Clock] = []
    spy: Any = contextlib.nullcontext()
    if what is not None and isinstance(what[1], peers.ModulaAdam):
        spy = _spy(what[1].model.net, "normalize", shape, sync)
    elif what is not None and isinstance(what[1], mn.optim.ModularOptimizer):
        spy = _spy(what[1], "_shape", shape, sync)
    buffers_before = _nbytes(list(model.buffers()))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    names = _names(opts)
    fb: list[Clock] = []
    steps: dict[str, list[Clock]] = {n: [] for n in names}
    total: list[Clock] = []
    with spy:
        for x, y in batches:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            sync()
            start = _now()
            ex.loss_fn(model(x), y).backward()
            sync()
            fb.append(_since(start))
            first = _now()
            for name, opt in zip(names, opts, strict=True):
                start = _now()
                opt.step()
                sync()
                steps[name].append(_since(start))
            total.append(_since(first))
    if what is not None and what[0] == "Muon.step":  # the whole step of torch's Muon
        shape = steps[names[list(opts).index(what[1])]]

    def ms(xs: list[Clock]) -> dict[str, float] | None:
        kept = xs[warmup:]
        if not kept:
            return None
        return {
            "wall": 1e3 * statistics.median(w for w, _ in kept),
            "cpu": 1e3 * statistics.median(c for _, c in kept),
        }

    return {
        "fwd_bwd_ms": ms(fb),
        "step_ms": ms(total),
        "step_ms_by_optimizer": {k: ms(v) for k, v in steps.items()},
        "shaping": None if what is None else what[0],
        "shaping_ms": ms(shape) if what is not None else None,
        "shaping_calls": len(shape),
        "state_bytes": sum(state_bytes(o) for o in opts),
        "param_bytes": _nbytes(list(model.parameters())),
        "buffer_bytes_added": _nbytes(list(model.buffers())) - buffers_before,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


# ---- the sweep -----------------------------------------------------------------------------


def bench(
    cfgs: Sequence[ex.SweepConfig],
    methods: Sequence[str],
    steps: int,
    warmup: int,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """One row per (model, width, method) that can run; the skipped methods and why."""
    rows: list[dict[str, Any]] = []
    skipped: dict[str, dict[str, str]] = {}
    for cfg in cfgs:
        planned, why = tr.plan(tr.Sweep(cfg.model, cfg), methods)
        runnable = planned.optimizers
        skipped[cfg.model] = why
        for name, reason in why.items():
            log(f"{cfg.model}: skipping {name}: {reason}")
        if not runnable:
            continue
        data = load_data(cfg)
        for width in cfg.values:
            gen = torch.Generator().manual_seed(0)
            batches = [
                tuple(t.to(device) for t in data.batch(cfg.batch_size, gen, cfg.context))
                for _ in range(warmup + steps)
            ]
            for name in runnable:
                torch.manual_seed(0)
                model, opts = peers.METHODS[name].build(cfg, data, width, cfg.depth, 2**-4, device)
                row = {
                    "model": cfg.model,
                    "width": width,
                    "method": name,
                    "data": data.name,
                    "load_1min": os.getloadavg()[0],
                    **measure(model, opts, batches, warmup, device),
                }
                rows.append(row)
                log(format_row(row))
    return rows, skipped


def _ratio(part: dict[str, float] | None, whole: dict[str, float] | None) -> float | None:
    return (
        None if part is None or whole is None or whole["cpu"] <= 0 else part["cpu"] / whole["cpu"]
    )


def format_row(r: dict[str, Any]) -> str:
    fb, st, sh = r["fwd_bwd_ms"], r["step_ms"], r["shaping_ms"]
    part = "" if sh is None else f" | {r['shaping']} {sh['cpu']:.2f} ms"
    return (
        f"{r['model']:>6} {r['width']:>5} {r['method']:<13} | fwd+bwd {fb['cpu']:8.2f} ms CPU "
        f"({fb['wall']:.2f} wall) | step {st['cpu']:8.2f} ms CPU ({st['wall']:.2f} wall){part}"
    )


HEADER = [
    "model",
    "width",
    "method",
    "fwd+bwd ms",
    "step ms",
    "step / fwd+bwd",
    "shaping part",
    "part ms",
    "part / fwd+bwd",
    "wall fwd+bwd, step ms",
    "state / params",
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of ``rows``: CPU times, then wall times, then state size."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f} %"

    cuda = any(r["cuda_peak_bytes"] is not None for r in rows)
    header = [*HEADER, "CUDA peak MiB"] if cuda else HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fb, st, sh = r["fwd_bwd_ms"], r["step_ms"], r["shaping_ms"]
        cells = [
            r["model"],
            str(r["width"]),
            r["method"],
            f"{fb['cpu']:.2f}",
            f"{st['cpu']:.2f}",
            pct(_ratio(st, fb)),
            r["shaping"] or "—",
            "—" if sh is None else f"{sh['cpu']:.2f}",
            pct(_ratio(sh, fb)),
            f"{fb['wall']:.2f}, {st['wall']:.2f}",
            f"{r['state_bytes'] / r['param_bytes']:.2f}×",
        ]
        if cuda:
            cells.append(f"{r['cuda_peak_bytes'] / 2**20:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """At each model's largest width: normalize and dualize (CPU time) against their targets."""
    out: dict[str, Any] = {}
    for r in rows:
        if r["width"] != max(x["width"] for x in rows if x["model"] == r["model"]):
            continue
        kind = "dualize" if r["shaping"] == "dualize" else "normalize"
        if r["method"].startswith("modnorm") or r["method"] == "modula-adam":
            ratio = _ratio(r["shaping_ms"], r["fwd_bwd_ms"])
            out[f"{r['model']}/{r['width']}/{r['method']}"] = {
                "part": r["shaping"],
                "ratio": ratio,
                "target": TARGETS[kind],
                "met": ratio is not None and ratio <= TARGETS[kind],
            }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="width 32, 1 warm-up + 2 steps")
    p.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024], help="ResMLP")
    p.add_argument("--gpt-widths", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (default 3)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(peers.METHODS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, help="JSON file (default results/overhead_DEVICE.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.widths = [32] if args.widths else []
        args.gpt_widths = [32] if args.gpt_widths else []
        args.steps, args.warmup = 2, 1
    if args.steps < 1 or args.warmup < 0:
        p.error(f"need --steps ≥ 1 and --warmup ≥ 0, got {args.steps} and {args.warmup}")
    if any(w < 1 for w in args.widths + args.gpt_widths):
        p.error("widths must be positive")
    if any(w % 4 for w in args.gpt_widths):
        p.error(f"GPT widths must be multiples of its 4 heads, got {args.gpt_widths}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(peers.METHODS)
    unknown = [m for m in methods if m not in peers.METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}: choose from {list(peers.METHODS)}")
    # One thread: the CPU time of this process is then the work of the step, whatever else
    # runs on the machine. Denormals slow Adam near zero (DESIGN §3).
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load_start = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, "
        f"load average {load_start[0]:.2f}"
    )
    cfgs = configs(args.widths, args.gpt_widths)
    rows, skipped = bench(cfgs, methods, args.steps, args.warmup, args.device)
    label = "cpu" if args.device == "cpu" else "cuda"
    out = args.out or RESULTS / f"overhead_{'quick_' if args.quick else ''}{label}.json"
    result = {
        "command": " ".join(
            ["python -m benchmarks.overhead", *(sys.argv[1:] if argv is None else argv)]
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if label == "cuda" else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "steps": args.steps,
        "warmup": args.warmup,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "targets": TARGETS,
        "skipped": skipped,
        "rows": rows,
        "verdict": verdict(rows),
    }
    ex.write_json_atomic(out, result)
    print(table(rows))
    print(
        f"load average {load_start[0]:.2f} at start, {result['load_average_end'][0]:.2f} "
        f"at end; wrote {out}"
    )
    return result


if __name__ == "__main__":
    main()

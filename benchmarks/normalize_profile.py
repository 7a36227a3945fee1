"""Where the time of ``module.normalize`` goes, on one device.

For a ResMLP and a GPT (the shapes of ``optimizer_overhead.py``) this trains a few steps with
``mn.optim.Adam`` and prints

* the median time of one ``normalize`` call, and of its parts: the finiteness check, each
  group of same-shape matrices (batched Lanczos, or an exact SVD below 96 rows or columns),
  the other atoms;
* for each small matrix, the exact spectral norm by other routes (``svdvals``, the
  eigenvalues of the Gram matrix on the device or on the host), which on a GPU differ by
  milliseconds;
* the operators that take the most time (``torch.profiler``).

    python benchmarks/normalize_profile.py --device cuda --width 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import modnorm as mn
from modnorm import experiments as ex
from modnorm import linalg
from modnorm.modules import _atom_norms

try:
    from benchmarks.optimizer_overhead import models
except ImportError:  # run as a script: benchmarks/ is on the path, the repository is not
    from optimizer_overhead import models  # type: ignore[import-not-found,no-redef]


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object], repeat: int = 7) -> float:
        times = []
        for _ in range(repeat):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times[1:])

    return run


def small_routes(w: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Exact spectral norm of a matrix with a small side, several ways."""
    a = w.float()
    small = a if a.shape[0] <= a.shape[1] else a.T
    return {
        "svd": lambda: torch.linalg.svd(a, full_matrices=False),
        "svdvals": lambda: torch.linalg.svdvals(a),
        "eigvalsh(gram)": lambda: torch.linalg.eigvalsh(small @ small.T),
        "gram→host eigvalsh": lambda: torch.linalg.eigvalsh((small @ small.T).double().cpu()),
    }


def profile_model(
    name: str, device: str, width: int, steps: int, quiet: bool = False
) -> dict[str, Any]:
    build, make_loss, _ = models(device, quick=False)[name]
    torch.manual_seed(0)
    model = build(width).to(device)
    opt = mn.optim.Adam(model, 0.01)
    gen = torch.Generator().manual_seed(0)
    losses = [make_loss(gen) for _ in range(steps)]
    updates: list[list[torch.Tensor]] = []
    for loss_fn in losses:  # real Adam updates, with the warm starts they leave behind
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        updates.append([p.grad.detach().clone() for p in model.parameters()])  # type: ignore[union-attr]
    run = timer(device)
    upd = updates[-1]
    split = model._split(upd)
    result: dict[str, Any] = {
        "model": name,
        "width": width,
        "device": device,
        "normalize_ms": run(lambda: model.normalize(upd, 0.1)),
        "split_and_finite_check_ms": run(lambda: model._split(upd)),
        "atom_norms_ms": run(lambda: _atom_norms(split)),
        "groups": [],
    }
    mats: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for atom, _, t in split:
        if isinstance(atom, mn.atoms._MatrixAtom):
            m = atom._mats(t)
            mats.setdefault(tuple(m.shape[1:]), []).append(m)
        else:
            result.setdefault("other_atoms", []).append(type(atom).__name__)
    for shape, group in mats.items():
        stacked = torch.cat(group)
        row: dict[str, Any] = {"shape": list(shape), "count": stacked.shape[0]}
        row["spectral_norms_cold_ms"] = run(lambda s=stacked: linalg.spectral_norms(s))
        if min(shape) <= linalg._EXACT_BELOW:
            row["routes_ms"] = {k: run(f) for k, f in small_routes(stacked[0]).items()}
        result["groups"].append(row)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            model.normalize(upd, 0.1)
        if device != "cpu":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    table_dev = prof.key_averages().table(sort_by=key, row_limit=8)
    if not quiet:
        print(f"\n=== {name} width {width} on {device}")
        print(json.dumps(result, indent=1))
        print(table)
        print(table_dev)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [profile_model(m, args.device, args.width, args.steps) for m in ("resmlp", "gpt")]
    if args.out:
        ex.write_json_atomic(args.out / f"normalize_profile_{args.device}.json", rows)


if __name__ == "__main__":
    main()

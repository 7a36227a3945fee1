"""Learning-rate sweeps across width and depth, and the metrics that say whether the best
learning rate transfers (DESIGN §3): best learning rate per scale, drift, regret, scaling."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import pickle
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modnorm import baselines, compounds
from modnorm import optim as mn_optim
from modnorm.data import Dataset
from modnorm.modules import Module

MODELS = ("mlp", "resmlp", "rescnn", "gpt")
OPTIMIZERS = ("modnorm-adam", "modnorm-sgd", "modnorm-dual", "adam", "sgd")
STRATEGIES = ("ddp", "fsdp")  # how `train` splits a run over the ranks of a process group
SCALES = ("width", "depth")
AFFINE_MODELS = ("rescnn", "gpt")  # the compounds with an ``affine_mass`` option
SCHEMA = 1


@dataclass
class SweepConfig:
    """Everything that defines a sweep; two sweeps with equal configs are the same sweep."""

    # A saved config that lacks a field is read with its default (`differences_beyond_grid`):
    # a new field's default must be the behaviour before it existed.

    model: str = "resmlp"
    data: str = "digits"
    scale: str = "width"
    values: list[int] = field(default_factory=lambda: [32, 64, 128])
    lrs: list[float] = field(default_factory=lambda: [2.0**k for k in range(-8, 1)])
    optimizers: list[str] = field(default_factory=lambda: ["modnorm-adam", "adam"])
    steps: int = 200
    batch_size: int = 128
    seeds: int = 1
    width: int = 64  # fixed width of a depth sweep
    depth: int = 2  # fixed depth (blocks) of a width sweep
    input_noise: float = 0.0  # fresh Gaussian noise on every training batch (classification)
    context: int = 64  # text models
    num_heads: int = 4
    schedule: str = "linear"  # "linear" decay to zero, or "constant"
    # modnorm's ResCNN and GPT get biases and gains of this mass (the torch.nn ones have theirs)
    affine_mass: float | None = None
    # modnorm's ResCNN normalizes each block's kernel as one (out, in·k²) matrix
    # (`ResCNN(unfolded=True)`; the stem stays per kernel position)
    unfolded: bool = False

    def validate(self, known: Sequence[str] = OPTIMIZERS) -> None:
        """Raise on a bad field; ``known`` are the optimizer names a sweep may use."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {list(MODELS)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}: choose width or depth")
        for o in self.optimizers:
            if o not in known:
                raise ValueError(f"unknown optimizer {o!r}: choose from {list(known)}")
        if not self.values or any(int(v) < 1 for v in self.values):
            raise ValueError(f"scale values must be positive integers, got {self.values}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"learning rates must be positive numbers, got {self.lrs}")
        if self.steps < 1 or self.batch_size < 1 or self.seeds < 1:
            raise ValueError("steps, batch size and seeds must be positive")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}: use linear or constant")
        if self.model == "gpt" and not self.data.startswith("text:"):
            raise ValueError("the gpt model needs text data: --data text:PATH")
        if self.model != "gpt" and self.data.startswith("text:"):
            raise ValueError(f"text data needs the gpt model, not {self.model}")
        if self.affine_mass is not None:
            mass = self.affine_mass
            if isinstance(mass, bool) or not (
                isinstance(mass, (int, float)) and 0 <= mass < math.inf
            ):
                raise ValueError(f"affine_mass must be a finite non-negative number, got {mass!r}")
            if self.model not in AFFINE_MODELS:
                raise ValueError(
                    f"affine_mass is an option of modnorm's {' and '.join(AFFINE_MODELS)}, "
                    f"not {self.model}"
                )
            if not any(o.startswith("modnorm") for o in self.optimizers):
                raise ValueError(
                    "affine_mass weighs the biases and gains of modnorm's models, and none of "
                    f"the optimizers {self.optimizers} trains one (torch.nn's have their own)"
                )
        if not isinstance(self.unfolded, bool):
            raise ValueError(f"unfolded must be True or False, got {self.unfolded!r}")
        if self.unfolded and self.model != "rescnn":
            raise ValueError(f"unfolded is an option of modnorm's rescnn, not {self.model}")
        if self.unfolded and not any(o.startswith("modnorm") for o in self.optimizers):
            raise ValueError(
                "unfolded chooses the norm of modnorm's convolutions, and none of the "
                f"optimizers {self.optimizers} trains one"
            )


def parse_lrs(text: str) -> list[float]:
    """``"2^-8:2^2"`` (every power of two between, inclusive), ``"2^-8:2^2:0.5"`` (step in
    octaves) or a comma list ``"0.001,0.01,0.1"``."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError
            lo, hi = (_log2(p) for p in parts[:2])
            step = float(parts[2]) if len(parts) == 3 else 1.0
            if step <= 0 or hi < lo:
                raise ValueError
            n = round((hi - lo) / step)
            return [2.0 ** (lo + i * step) for i in range(n + 1)]
        lrs = [float(p) for p in text.split(",")]
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError
        return sorted(lrs)
    except ValueError:
        raise ValueError(
            f"cannot read the learning-rate grid {text!r}: use 2^-8:2^2, 2^-8:2^2:0.5 "
            "or 0.001,0.01,0.1"
        ) from None


def _log2(p: str) -> float:
    p = p.strip()
    if p.startswith("2^"):
        return float(p[2:])
    v = float(p)
    if v <= 0:
        raise ValueError
    return math.log2(v)


# ---- one run -------------------------------------------------------------------------------


# A replacement for build_model + build_optimizer: (cfg, data, width, depth, lr, device) →
# the model on ``device`` and the optimizers that together update all of its weights.
Builder = Callable[
    [SweepConfig, Dataset, int, int, float, str], tuple[nn.Module, list[torch.optim.Optimizer]]
]


def build_model(
    cfg: SweepConfig,
    optimizer: str,
    width: int,
    depth: int,
    data: Dataset,
    output_scale: float = 1.0,
    head_mass: float = 1.0,
) -> nn.Module:
    """The model of ``cfg`` at one scale: a modnorm compound for modnorm optimizers, the
    same architecture in plain ``torch.nn`` (standard practice) for the others.
    ``output_scale`` and ``head_mass`` are the residual compounds' (modnorm only);
    ``cfg.affine_mass`` is the ResCNN's and GPT's (modnorm only: ``torch.nn`` has them), and
    ``cfg.unfolded`` the ResCNN's (a choice of norm: a ``torch.nn`` model has none)."""
    modular = optimizer.startswith("modnorm")
    residual = modular and cfg.model in ("resmlp", "rescnn", "gpt")
    for name, value in (("output_scale", output_scale), ("head_mass", head_mass)):
        if value != 1.0 and not residual:
            raise ValueError(f"{name} is an option of modnorm's residual models, not {cfg.model}")
    if modular and cfg.affine_mass is not None and cfg.model not in AFFINE_MODELS:
        models = " and ".join(AFFINE_MODELS)
        raise ValueError(f"affine_mass is an option of modnorm's {models}, not {cfg.model}")
    if modular and cfg.unfolded and cfg.model != "rescnn":
        raise ValueError(f"unfolded is an option of modnorm's rescnn, not {cfg.model}")
    scale, mass = output_scale, head_mass
    classes = data.num_classes
    if cfg.model == "gpt":
        if modular:
            return compounds.GPT(
                classes,
                cfg.context,
                width,
                cfg.num_heads,
                depth,
                output_scale=scale,
                head_mass=mass,
                affine_mass=cfg.affine_mass,
            )
        return baselines.TorchGPT(classes, cfg.context, width, cfg.num_heads, depth)
    shape = data.in_shape
    if cfg.model == "rescnn":
        if len(shape) != 3:
            raise ValueError("rescnn needs image data of shape (C, H, W)")
        if modular:
            return compounds.ResCNN(
                shape[0],
                classes,
                width,
                depth,
                output_scale=scale,
                head_mass=mass,
                affine_mass=cfg.affine_mass,
                unfolded=cfg.unfolded,
            )
        return baselines.torch_rescnn(shape[0], classes, width, depth)
    features = math.prod(shape)
    if cfg.model == "mlp":
        if modular:
            return compounds.MLP(features, classes, width, depth + 1)
        return baselines.torch_mlp(features, classes, width, depth + 1)
    if modular:
        return compounds.ResMLP(features, classes, width, depth, output_scale=scale, head_mass=mass)
    return baselines.torch_resmlp(features, classes, width, depth)


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizers a sweep compares; the torch ones use their default hyperparameters."""
    wd = weight_decay
    if name == "modnorm-adam":
        return mn_optim.Adam(model, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if name == "modnorm-sgd":
        return mn_optim.SGD(model, lr=lr, momentum=0.9, weight_decay=wd)  # type: ignore[arg-type]
    if name == "modnorm-dual":
        return mn_optim.Dual(model, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if name == "adam":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}: choose from {list(OPTIMIZERS)}")


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, cfg: SweepConfig, device: str
) -> tuple[float, float | None]:
    """Held-out loss, and accuracy for classification; text uses 16 fixed windows × 32."""
    model.eval()
    try:
        if data.kind == "text":
            assert data.val is not None
            from modnorm.data import text_windows

            gen = torch.Generator().manual_seed(0)
            losses = []
            for _ in range(16):
                x, y = text_windows(data.val, 32, cfg.context, gen)
                losses.append(float(loss_fn(model(x.to(device)), y.to(device))))
            return sum(losses) / len(losses), None
        assert data.x_test is not None and data.y_test is not None
        logits = torch.cat([model(xb.to(device)) for xb in data.x_test.split(1000)])
        y = data.y_test.to(device)
        return float(loss_fn(logits, y)), float((logits.argmax(-1) == y).float().mean())
    finally:
        model.train()


def train_one(
    cfg: SweepConfig,
    data: Dataset,
    optimizer: str,
    width: int,
    depth: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    build: Builder | None = None,
) -> dict[str, Any]:
    """Train one model for ``cfg.steps`` steps and return its metrics. A run whose loss goes
    non-finite or above 10× its first loss is stopped and marked diverged. ``build`` replaces
    ``build_model``/``build_optimizer`` (e.g. a peer library's model and optimizers); every
    optimizer it returns gets the same schedule."""
    torch.manual_seed(seed)
    if build is None:
        model = build_model(cfg, optimizer, width, depth, data).to(device)
        opts = [build_optimizer(optimizer, model, lr)]
    else:
        model, opts = build(cfg, data, width, depth, lr, device)
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 - s / cfg.steps)
        for o in opts
        if cfg.schedule == "linear"
    ]
    gen = torch.Generator().manual_seed(10_000 + seed)
    losses: list[float] = []
    diverged = False
    start = time.perf_counter()
    for step in range(cfg.steps):
        x, y = data.batch(cfg.batch_size, gen, cfg.context)
        loss = loss_fn(model(x.to(device)), y.to(device))
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value) or value > 10 * losses[0]:
            diverged = True
            break
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        try:
            for opt in opts:
                opt.step()
        except ValueError:  # non-finite gradients: the run has diverged
            diverged = True
            break
        for sched in scheds:
            sched.step()
        if on_step is not None:
            on_step(step, value)
    wall = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    result: dict[str, Any] = {
        "optimizer": optimizer,
        "width": width,
        "depth": depth,
        "lr": lr,
        "seed": seed,
        "diverged": diverged,
        "steps_done": len(losses),
        "train_loss": math.inf if diverged else sum(tail) / len(tail),
        "wall_time": wall,
        "device": device_name(device),  # wall times compare only on one kind of machine
        "curve": _downsample(losses, 100),
    }
    if diverged:
        result.update(val_loss=math.inf, accuracy=None)
    else:
        val, acc = evaluate(model, data, cfg, device)
        result.update(val_loss=val, accuracy=acc)
    return result


def _downsample(xs: list[float], n: int) -> list[float]:
    if len(xs) <= n:
        return list(xs)
    return [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)]


# ---- metrics ---------------------------------------------------------------------------------


def best_lr(
    lrs: Sequence[float], losses: Sequence[float], tol: float = 0.01, floor: float = 0.01
) -> dict[str, Any]:
    """The best learning rate: the geometric middle of the learning rates whose loss is within
    ``tol`` (relative, with ``floor`` under the denominator) of the minimum, flagged ``edge``
    when the minimum sits on the first or last learning rate of the grid."""
    pairs = sorted((lr, loss) for lr, loss in zip(lrs, losses, strict=True))
    finite = [(lr, loss) for lr, loss in pairs if math.isfinite(loss)]
    if not finite:
        return {"lr": None, "loss": math.inf, "edge": True, "near": []}
    low = min(loss for _, loss in finite)
    near = [lr for lr, loss in finite if loss <= low + tol * max(low, floor)]
    middle = 2.0 ** ((math.log2(near[0]) + math.log2(near[-1])) / 2)
    argmin = min(finite, key=lambda p: p[1])[0]
    edge = argmin in (pairs[0][0], pairs[-1][0])
    return {"lr": middle, "loss": low, "edge": edge, "near": near}


def loss_at(curve: dict[float, float], lr: float) -> float:
    """The loss of ``curve`` (lr → loss) at ``lr``, linear in log2(lr) between the two grid
    points around it (the best lr is often between them: the middle of near-ties); the
    nearest end outside the grid. Infinite if a neighbour diverged."""
    grid = sorted(curve)
    if lr <= grid[0] or lr >= grid[-1]:
        return curve[grid[0] if lr <= grid[0] else grid[-1]]
    hi = next(g for g in grid if g >= lr)
    lo = grid[grid.index(hi) - 1]
    if hi == lr:
        return curve[hi]
    if not (math.isfinite(curve[lo]) and math.isfinite(curve[hi])):
        return math.inf
    t = (math.log2(lr) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return (1 - t) * curve[lo] + t * curve[hi]


def summarize(runs: Sequence[dict[str, Any]], scale: str, floor: float = 0.05) -> dict[str, Any]:
    """Per optimizer: best lr per scale, drift (octaves), regret at the smallest model's best
    lr (worst relative excess over scales, denominator floored at ``floor``; the loss there by
    `loss_at`), best loss per scale and whether it improves with scale, divergences. Losses
    are averaged over seeds."""
    out: dict[str, Any] = {}
    for opt in sorted({r["optimizer"] for r in runs}):
        mine = [r for r in runs if r["optimizer"] == opt]
        table: dict[int, dict[float, float]] = {}
        for r in mine:
            value = r[scale]
            cell = table.setdefault(value, {})
            cell.setdefault(r["lr"], [])  # type: ignore[arg-type]
            cell[r["lr"]].append(r["train_loss"])  # type: ignore[attr-defined]
        curves = {
            v: {lr: _mean(ls) for lr, ls in sorted(cell.items())}  # type: ignore[arg-type]
            for v, cell in sorted(table.items())
        }
        best = {v: best_lr(list(c), list(c.values())) for v, c in curves.items()}
        good = [b["lr"] for b in best.values() if b["lr"] is not None]
        drift = (
            math.log2(max(good)) - math.log2(min(good)) if len(good) == len(best) and good else None
        )
        scales = sorted(curves)
        regret = None
        if best[scales[0]]["lr"] is not None:
            ref = best[scales[0]]["lr"]
            worst = 0.0
            for v in scales:
                at_ref = loss_at(curves[v], ref)
                b = best[v]["loss"]
                excess = (at_ref - b) / max(b, floor) if math.isfinite(at_ref) else math.inf
                worst = max(worst, excess)
            regret = worst
        best_losses = [best[v]["loss"] for v in scales]
        out[opt] = {
            "curves": {
                str(v): {repr(lr): loss for lr, loss in c.items()} for v, c in curves.items()
            },
            "best_lr": {str(v): best[v]["lr"] for v in scales},
            "best_loss": {str(v): best[v]["loss"] for v in scales},
            "edge": {str(v): best[v]["edge"] for v in scales},
            "drift_octaves": drift,
            "regret": regret,
            "improves_with_scale": all(b <= a * 1.02 for a, b in itertools.pairwise(best_losses)),
            "diverged": sum(1 for r in mine if r["diverged"]),
            "wall_time": sum(r["wall_time"] for r in mine),
        }
    return out


def device_name(device: str) -> str:
    """What ran a job, for its results: ``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(dev)})"
    return dev.type


def _mean(xs: Sequence[float]) -> float:
    if any(not math.isfinite(x) for x in xs):
        return math.inf
    return sum(xs) / len(xs)


# ---- sweeps ----------------------------------------------------------------------------------


def run_key(optimizer: str, value: int, lr: float, seed: int) -> str:
    return f"{optimizer}|{value}|{lr!r}|{seed}"


def _temp_beside(path: Path) -> Path:
    # A name no other writer picks, for a file that open() creates, so that it gets the mode
    # the umask gives (tempfile.mkstemp's files are owner-only; changing the umask to read it
    # would race with other threads creating files).
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write through a temporary file and ``os.replace``: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "x") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_GRID = ("lrs", "values", "optimizers", "seeds")  # a run depends on its own point of these


def differences_beyond_grid(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fields of sweep configs ``a`` and ``b`` (as saved) that differ, leaving out the
    grid (lrs, scale values, optimizers, seeds): none means a run of one, at a grid point both
    share, is a run of the other. A field a config predates was then at its default."""
    default = asdict(SweepConfig())
    a, b = {**default, **a}, {**default, **b}
    keys = (a.keys() | b.keys()) - set(_GRID)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def _contains(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether sweep ``new`` makes every run of sweep ``old``: the same sweep on a grid that
    holds old's lrs, scale values, optimizers and seeds."""
    if differences_beyond_grid(new, old):
        return False
    try:
        return (
            set(old["lrs"]) <= set(new["lrs"])
            and set(old["values"]) <= set(new["values"])
            and set(old["optimizers"]) <= set(new["optimizers"])
            and old["seeds"] <= new["seeds"]
        )
    except (KeyError, TypeError):
        return False


def load_results(out_dir: Path, cfg: SweepConfig) -> list[dict[str, Any]]:
    """Finished runs in ``out_dir`` of the sweep ``cfg``, or of one on a smaller grid (fewer
    lrs, scale values, optimizers or seeds, all of them in ``cfg``'s), which ``cfg`` then
    extends; any other sweep there is an error."""
    path = out_dir / "results.json"
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a results file: {e}") from None
    mine, theirs = asdict(cfg), saved.get("config")
    if theirs != mine and not (isinstance(theirs, dict) and _contains(mine, theirs)):
        raise ValueError(
            f"{path} holds a different sweep, not one this sweep's grid contains; use another "
            "--out directory (nothing was overwritten)"
        )
    return list(saved.get("runs", []))


_WORKER: dict[str, Any] = {}  # a sweep worker process's dataset and builders


def _flushes_denormals() -> bool:
    # torch has no getter for set_flush_denormal: a denormal times one is zero when it is on
    return bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)


def _start_worker(
    data: Dataset, builders: Mapping[str, Builder], threads: int, flush_denormal: bool
) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    _WORKER.update(data=data, builders=builders)


def _worker_run(job: tuple[Any, ...]) -> dict[str, Any]:
    cfg, o, width, depth, lr, seed, device = job
    build = _WORKER["builders"].get(o)
    return train_one(cfg, _WORKER["data"], o, width, depth, lr, seed, device, build=build)


def run_sweep(
    cfg: SweepConfig,
    out_dir: str | Path,
    data: Dataset,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    builders: Mapping[str, Builder] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every (optimizer, scale, lr, seed) of ``cfg`` not already in ``out_dir``, saving
    ``results.json`` after each run, and return the results with their summary. An optimizer
    named in ``builders`` is built by its builder instead of ``build_model``/``build_optimizer``.
    With ``jobs`` > 1 the runs go to that many spawned processes, each with this process's
    torch threads and denormal flushing; a run's result does not depend on ``jobs`` (its wall
    time does)."""
    from tqdm.auto import tqdm

    builders = dict(builders or {})
    cfg.validate(known=[*OPTIMIZERS, *builders])
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    out = Path(out_dir)
    runs = load_results(out, cfg)
    done = {run_key(r["optimizer"], r[cfg.scale], r["lr"], r["seed"]) for r in runs}
    todo = [
        (o, *((v, cfg.depth) if cfg.scale == "width" else (cfg.width, v)), lr, s)
        for o in cfg.optimizers
        for v in cfg.values
        for lr in cfg.lrs
        for s in range(cfg.seeds)
        if run_key(o, v, lr, s) not in done
    ]
    if done:
        log(f"resuming: {len(done)} runs already in {out / 'results.json'}, {len(todo)} to go")
    bar = tqdm(total=len(todo), desc=f"{cfg.model} {cfg.scale} sweep", disable=not progress)

    def record(r: dict[str, Any]) -> None:
        runs.append(r)
        bar.update(1)
        status = (
            "diverged" if r["diverged"] else f"train {r['train_loss']:.4f}  val {r['val_loss']:.4f}"
        )
        bar.write(
            f"{r['optimizer']:>13} {cfg.scale} {r[cfg.scale]:>5} lr 2^{math.log2(r['lr']):+.1f} "
            f"seed {r['seed']}: {status}  ({r['wall_time']:.1f}s)"
        )
        write_json_atomic(
            out / "results.json", {"schema": SCHEMA, "config": asdict(cfg), "runs": runs}
        )

    if jobs == 1 or len(todo) <= 1:
        for o, width, depth, lr, s in todo:
            step_bar = tqdm(total=cfg.steps, leave=False, disable=not progress, unit="step")

            def tick(step: int, loss: float, step_bar: Any = step_bar) -> None:
                step_bar.update(1)
                if step % 20 == 0:
                    step_bar.set_postfix(loss=f"{loss:.3f}")

            r = train_one(
                cfg, data, o, width, depth, lr, s, device, on_step=tick, build=builders.get(o)
            )
            step_bar.close()
            record(r)
    else:
        for name, build in builders.items():
            try:
                pickle.dumps(build)
            except Exception as e:  # pickling raises several types (AttributeError, TypeError…)
                raise ValueError(
                    f"jobs > 1 sends each builder to a spawned process: the builder of {name!r} "
                    f"cannot be pickled ({e}); use a module-level function or functools.partial"
                ) from e
        # spawn, not fork: a forked child inherits a CUDA context or OpenMP pool it cannot use
        ctx = multiprocessing.get_context("spawn")
        init = (data, builders, torch.get_num_threads(), _flushes_denormals())
        with ctx.Pool(min(jobs, len(todo)), _start_worker, init) as pool:
            for r in pool.imap_unordered(_worker_run, [(cfg, *t, device) for t in todo]):
                record(r)
    bar.close()
    results = {
        "schema": SCHEMA,
        "config": asdict(cfg),
        "runs": runs,
        "summary": summarize(runs, cfg.scale),
    }
    write_json_atomic(out / "results.json", results)
    return results


# ---- a single training run with checkpoints ----------------------------------------------------


@dataclass
class TrainConfig:
    """One training run (``modnorm train``)."""

    model: str = "gpt"
    data: str = "digits"
    optimizer: str = "modnorm-adam"
    lr: float = 0.5
    weight_decay: float = 0.0
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    context: int = 64
    steps: int = 2000
    batch_size: int = 12
    seed: int = 0
    schedule: str = "linear"
    input_noise: float = 0.0
    eval_every: int = 100
    checkpoint_every: int = 500
    affine_mass: float | None = None  # as `SweepConfig`'s
    unfolded: bool = False  # as `SweepConfig`'s

    def sweep_config(self) -> SweepConfig:
        return SweepConfig(
            model=self.model,
            data=self.data,
            optimizers=[self.optimizer],
            steps=self.steps,
            batch_size=self.batch_size,
            input_noise=self.input_noise,
            context=self.context,
            num_heads=self.num_heads,
            schedule=self.schedule,
            lrs=[self.lr],
            values=[self.width],
            depth=self.depth,
            affine_mass=self.affine_mass,
            unfolded=self.unfolded,
        )


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    data: Dataset,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    strategy: str = "ddp",
) -> dict[str, Any]:
    """Train, evaluating every ``eval_every`` steps and saving ``checkpoint.pt`` (atomically)
    every ``checkpoint_every`` steps and at the end. ``resume=True`` continues from the
    checkpoint exactly: model, optimizer, schedule, data stream and log are all restored.
    ``stop_after`` ends the run early after that many steps (to test interruption).

    Under a process group of several ranks (``modnorm train`` launched by torchrun), the model
    is wrapped in DistributedDataParallel, each rank draws its own ``batch_size`` examples per
    step (its data stream seeded by its rank), the logged loss is the mean over the ranks, and
    rank 0 alone evaluates, logs and writes. The checkpoint holds every rank's data stream, so
    it resumes on as many ranks as saved it. ``strategy="fsdp"`` shards the model with FSDP2
    instead (``fully_shard`` on every atom, then on the model; modnorm optimizers only): every
    rank evaluates (a forward pass is a collective), and the checkpoint is the directory
    ``checkpoint`` written by every rank in the background while training goes on
    (`modnorm.distributed.save_checkpoint_async`; each save finishes before the next)."""
    from tqdm.auto import tqdm

    from modnorm.distributed import PendingSave, load_checkpoint, save_checkpoint_async

    sweep = cfg.sweep_config()
    sweep.validate()
    world, rank = _world()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
    fsdp = strategy == "fsdp"
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if fsdp and not grouped:  # one process under torchrun is a group too
        raise ValueError("strategy 'fsdp' shards over a process group: launch with torchrun")
    if fsdp and not cfg.optimizer.startswith("modnorm"):
        raise ValueError(f"strategy 'fsdp' needs a modnorm optimizer, got {cfg.optimizer!r}")
    out = Path(out_dir)
    ckpt_path = out / ("checkpoint" if fsdp else "checkpoint.pt")
    if not resume and ckpt_path.exists():  # before any collective: every rank sees it
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    torch.manual_seed(cfg.seed)
    net = build_model(sweep, cfg.optimizer, cfg.width, cfg.depth, data).to(device)
    model = net
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for atom, _ in cast(Module, net).atom_shares():  # one unit per weight matrix
            fully_shard(atom)
        fully_shard(net)
    elif world > 1:
        ids = [torch.device(device)] if device.startswith("cuda") else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    opt = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay)
    factor = (lambda s: 1 - s / cfg.steps) if cfg.schedule == "linear" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    # rank 0 draws what a single process draws; the others, streams of their own
    gen = torch.Generator().manual_seed(10_000 + cfg.seed + 1_000_000 * rank)
    history: dict[str, list[Any]] = {"train": [], "val": []}
    start = 0
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        if fsdp:  # every rank loads its slices; the rest was saved as rank 0 held it
            ckpt = load_checkpoint(ckpt_path, opt)
        else:
            ckpt = torch.load(ckpt_path, weights_only=False)
        # a field the checkpoint predates was then at its default
        if {**asdict(TrainConfig()), **ckpt["config"]} != asdict(cfg):
            raise ValueError(f"{ckpt_path} was made with a different configuration; not resuming")
        streams = ckpt.get("streams", [(ckpt["generator"], ckpt["torch_rng"])])
        if len(streams) != world:
            raise ValueError(
                f"{ckpt_path} was saved by {len(streams)} process(es) and this run has {world}: "
                "each process draws its own batches, so the data streams cannot continue "
                f"exactly; resume with {len(streams)} process(es)"
            )
        if not fsdp:
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(streams[rank][0])
        torch.set_rng_state(streams[rank][1])
        history = ckpt["history"]
        start = ckpt["step"]
        if rank == 0:
            log(f"resumed from {ckpt_path} at step {start}")

    pending: list[PendingSave] = []  # the FSDP checkpoint being written, if any

    def save(step: int) -> None:
        streams = _gather_objects((gen.get_state(), torch.get_rng_state()), world)
        state = {
            "config": asdict(cfg),
            "step": step,
            "scheduler": sched.state_dict(),
            "generator": streams[0][0],
            "torch_rng": streams[0][1],
            "streams": streams,
            "history": history,
        }
        out.mkdir(parents=True, exist_ok=True)
        if fsdp:  # a collective, atomic; written while training goes on
            pending[:] = [save_checkpoint_async(ckpt_path, opt, extra=state)]
            return
        if rank != 0:
            return
        state.update(model=net.state_dict(), optimizer=opt.state_dict())
        tmp = _temp_beside(ckpt_path)
        try:
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    quiet = not progress or rank != 0
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=quiet, unit="step")
    for step in bar:
        x, y = data.batch(cfg.batch_size, gen, cfg.context)
        loss = loss_fn(model(x.to(device)), y.to(device))
        mean = _mean_over_ranks(loss.detach(), world)  # the same on every rank
        if not torch.isfinite(mean):
            raise FloatingPointError(f"the loss is {mean.item()} at step {step}: training diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["train"].append(mean.item())
        if (rank == 0 or fsdp) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            val, acc = evaluate(net, data, sweep, device)
            history["val"].append({"step": step + 1, "loss": val, "accuracy": acc})
            bar.set_postfix(train=f"{mean.item():.3f}", val=f"{val:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save(step + 1)
    for save_in_progress in pending:
        save_in_progress.wait()
    tail = history["train"][-max(1, len(history["train"]) // 10) :]
    summary = {
        "config": asdict(cfg),
        "world_size": world,
        "device": device_name(device),
        "steps_done": len(history["train"]),
        "train_loss": sum(tail) / max(1, len(tail)),
        "val": history["val"],
        "train_curve": history["train"],
    }
    if rank == 0:
        write_json_atomic(out / "train.json", summary)
    if world > 1:
        # Ranks leave together: one that tears its process group down while rank 0 is still
        # writing aborted gloo ("terminate called without an active exception"), 1 run in 6.
        import torch.distributed as dist

        dist.barrier()
    return summary


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _mean_over_ranks(value: Tensor, world: int) -> Tensor:
    if world == 1:
        return value
    import torch.distributed as dist

    total = value.clone()
    dist.all_reduce(total)
    return total / world


def _gather_objects(obj: Any, world: int) -> list[Any]:
    """``obj`` from every rank, in rank order (a collective); ``[obj]`` in one process."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out

"""The ``modnorm`` command: ``demo``, ``sweep``, ``train``, ``plot`` and ``check``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from modnorm import experiments as ex

# The demo: a ResMLP on digits with fresh input noise every step, so the training loss never
# reaches zero and still tells learning rates apart (DESIGN §3: plain digits is memorized).
DEMO_NOISE = 1.0
DEMO = {
    "widths": [32, 64, 128, 256, 512],
    "depths": [1, 2, 4, 8, 16],
    "lrs": "2^-12:2^2",
    "steps": 200,
}
DEMO_QUICK = {"widths": [32, 128], "depths": [1, 4], "lrs": "2^-12:2^2:2", "steps": 100}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def _lrs(text: str) -> list[float]:
    try:
        return ex.parse_lrs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--affine-mass",
        type=float,
        default=None,
        metavar="MASS",
        help="rescnn and gpt: modnorm's model gets biases and gains of this mass (e.g. 0.25)",
    )
    p.add_argument(
        "--unfolded",
        action="store_true",
        help="rescnn: modnorm normalizes each block's conv kernel as one (out, in*k*k) matrix",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modnorm",
        description="Learning-rate transfer in the modular norm: sweeps, training, plots.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="width and depth sweeps of a ResMLP on digits: modnorm Adam vs torch Adam"
    )
    demo.add_argument(
        "--out", default="modnorm-demo", help="output directory (default modnorm-demo)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a reduced grid that runs in about a minute"
    )
    _common(demo)

    sw = sub.add_parser("sweep", help="a learning-rate sweep over widths or depths")
    sw.add_argument("--model", default="resmlp", choices=ex.MODELS)
    sw.add_argument("--data", default="digits", help="digits, text:PATH or cifar10:DIR")
    sw.add_argument("--scale", default="width", choices=ex.SCALES)
    sw.add_argument("--values", type=_ints, default=[32, 64, 128], help="e.g. 32,64,128")
    sw.add_argument("--lrs", type=_lrs, default=ex.parse_lrs("2^-8:2^0"), help="e.g. 2^-8:2^2")
    sw.add_argument(
        "--optimizers", type=_names, default=["modnorm-adam", "adam"], help=",".join(ex.OPTIMIZERS)
    )
    sw.add_argument("--steps", type=int, default=200)
    sw.add_argument("--batch-size", type=int, default=128)
    sw.add_argument("--seeds", type=int, default=1)
    sw.add_argument("--width", type=int, default=64, help="fixed width of a depth sweep")
    sw.add_argument("--depth", type=int, default=2, help="fixed depth of a width sweep")
    sw.add_argument("--input-noise", type=float, default=0.0, help="std of fresh noise on inputs")
    sw.add_argument("--context", type=int, default=64)
    sw.add_argument("--heads", type=int, default=4)
    sw.add_argument("--schedule", default="linear", choices=("linear", "constant"))
    sw.add_argument(
        "--out", required=True, help="output directory; a partial sweep there is resumed"
    )
    sw.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    _model_options(sw)
    _common(sw)

    tr = sub.add_parser("train", help="one training run with validation and checkpoints")
    tr.add_argument("--model", default="gpt", choices=ex.MODELS)
    tr.add_argument("--data", required=True, help="digits, text:PATH or cifar10:DIR")
    tr.add_argument("--optimizer", default="modnorm-adam", choices=ex.OPTIMIZERS)
    tr.add_argument("--lr", type=float, default=0.5)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--width", type=int, default=128)
    tr.add_argument("--depth", type=int, default=4)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--context", type=int, default=64)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=12)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--schedule", default="linear", choices=("linear", "constant"))
    tr.add_argument("--input-noise", type=float, default=0.0)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument(
        "--out", required=True, help="output directory for checkpoint.pt and train.json"
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (OUT/checkpoint/ with --strategy fsdp)",
    )
    tr.add_argument(
        "--strategy",
        default="ddp",
        choices=ex.STRATEGIES,
        help="under torchrun: replicate the model (ddp) or shard it with FSDP2 (fsdp)",
    )
    tr.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop (with a checkpoint) after step STEP, to continue later with --resume",
    )
    _model_options(tr)
    _common(tr)

    pl = sub.add_parser("plot", help="redraw the figure of a sweep from its results.json")
    pl.add_argument("dirs", nargs="+", help="sweep directories (each holds results.json)")
    pl.add_argument("--metric", default="train_loss", choices=("train_loss", "val_loss"))
    pl.add_argument("--out", default=None, help="PNG path (default DIR/sweep.png)")

    ck = sub.add_parser(
        "check", help="well-normed check (and sharpness certificate) of a model on real inputs"
    )
    ck.add_argument("--model", default="resmlp", choices=ex.MODELS)
    ck.add_argument("--data", default="digits", help="digits, text:PATH (gpt) or cifar10:DIR")
    ck.add_argument("--width", type=int, default=64)
    ck.add_argument("--depth", type=int, default=4, help="blocks (mlp: hidden layers)")
    ck.add_argument(
        "--activation",
        default=None,
        choices=("relu", "gelu", "abs"),
        help="activation of mlp/resmlp/rescnn (default: the model's own, as in sweeps)",
    )
    ck.add_argument("--heads", type=int, default=4)
    ck.add_argument("--context", type=int, default=64)
    ck.add_argument("--kind", default="random", choices=("random", "aligned", "gradient"))
    ck.add_argument("--eta", type=float, default=1e-3, help="modular norm of the step")
    ck.add_argument("--rounds", type=int, default=3, help="power-iteration rounds (aligned)")
    ck.add_argument("--batch-size", type=int, default=64)
    ck.add_argument(
        "--unit-inputs",
        action="store_true",
        help="rescale each input to unit RMS (worst row), the theory's assumption",
    )
    ck.add_argument(
        "--calibrate",
        action="store_true",
        help="first declare each RMSDivide's input RMS on the batch (diagnostics.calibrate_)",
    )
    ck.add_argument("--sharpness", action="store_true", help="also certify the loss's curvature")
    ck.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "mse"))
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument(
        "--input-noise", type=float, default=0.0, help="std of fresh noise on training inputs"
    )
    ck.add_argument(
        "--scale",
        default=None,
        choices=ex.SCALES,
        help="coordinate check over a family (with --values): modnorm Adam vs torch Adam",
    )
    ck.add_argument("--values", type=_ints, default=None, help="widths or depths, e.g. 32,64,128")
    ck.add_argument(
        "--alignment",
        action="store_true",
        help="train with modnorm Adam and log the well-normed ratio of its updates",
    )
    ck.add_argument(
        "--stable-step",
        action="store_true",
        help="the descent lemma's largest stable step (smooth models; --lrs adds a sweep)",
    )
    ck.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (coordinate check 5, alignment 100, stable-step sweep 200)",
    )
    ck.add_argument("--every", type=int, default=10, help="alignment: log every k steps")
    ck.add_argument(
        "--lr", type=float, default=0.5, help="modnorm learning rate (modular norm of a step)"
    )
    ck.add_argument(
        "--torch-lr", type=float, default=2.0**-6, help="torch Adam's lr in the coordinate check"
    )
    ck.add_argument("--lrs", type=_lrs, default=None, help="stable step: sweep grid, e.g. 2^-8:2^2")
    ck.add_argument("--out", default="modnorm-check", help="directory for the figures")
    return parser


_left_group = False  # whether `modnorm train` joined torchrun's process group and left it


def run() -> NoReturn:
    """The ``modnorm`` command (its script, ``python -m modnorm``): `main`, then exit."""
    code = main()
    if _left_group:
        # torch's gloo backend can abort a finished worker while the interpreter tears down
        # ("terminate called without an active exception"; CI saw it three times, once after
        # each fix of what kept a group alive). Every file is written and the group destroyed
        # by now, so the worker leaves without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "train":
            return _train(args)
        if args.command == "check":
            return _check(args)
        return _plot(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"modnorm {args.command}: error: {e}", file=sys.stderr)
        return 2


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}: use cpu or cuda")
    return name


def _setup() -> None:
    import torch

    torch.set_flush_denormal(True)  # near-zero Adam states slow CPUs several times over


def _sweep(args: argparse.Namespace) -> int:
    from modnorm.data import load
    from modnorm.plots import draw_curves, draw_sweeps

    cfg = ex.SweepConfig(
        model=args.model,
        data=args.data,
        scale=args.scale,
        values=args.values,
        lrs=args.lrs,
        optimizers=args.optimizers,
        steps=args.steps,
        batch_size=args.batch_size,
        seeds=args.seeds,
        width=args.width,
        depth=args.depth,
        input_noise=args.input_noise,
        context=args.context,
        num_heads=args.heads,
        schedule=args.schedule,
        affine_mass=args.affine_mass,
        unfolded=args.unfolded,
    )
    cfg.validate()
    device = _device(args.device)
    ex.load_results(Path(args.out), cfg)  # a different sweep there: fail before any work
    _setup()
    data = load(cfg.data, image=cfg.model == "rescnn", input_noise=cfg.input_noise)
    res = ex.run_sweep(cfg, args.out, data, device, progress=not args.no_progress, jobs=args.jobs)
    draw_sweeps([res], Path(args.out) / "sweep.png")
    draw_curves(res, Path(args.out) / "curves.png")
    print(table([res]))
    print(f"wrote {Path(args.out) / 'results.json'}, sweep.png and curves.png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from modnorm.data import digits
    from modnorm.plots import draw_sweeps

    device = _device(args.device)
    out = Path(args.out)
    grid: dict[str, Any] = DEMO_QUICK if args.quick else DEMO
    widths, depths, lrs, steps = (
        grid["widths"],
        grid["depths"],
        ex.parse_lrs(grid["lrs"]),
        grid["steps"],
    )
    common = dict(
        model="resmlp",
        data="digits",
        lrs=lrs,
        optimizers=["modnorm-adam", "adam"],
        steps=steps,
        batch_size=128,
        input_noise=DEMO_NOISE,
        width=64,
        depth=2,
    )
    sweeps = [
        ex.SweepConfig(scale="width", values=widths, **common),
        ex.SweepConfig(scale="depth", values=depths, **common),
    ]
    for cfg in sweeps:
        ex.load_results(out / cfg.scale, cfg)
    _setup()
    data = digits(input_noise=DEMO_NOISE)
    results = [
        ex.run_sweep(cfg, out / cfg.scale, data, device, progress=not args.no_progress)
        for cfg in sweeps
    ]
    fig = draw_sweeps(results, out / "demo.png")
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    ex.write_json_atomic(out / "results.json", {"sweeps": results})
    print(text)
    print(f"wrote {out / 'results.json'}, {fig} and {out / 'table.md'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    global _left_group
    import torch.distributed as dist

    from modnorm.data import load
    from modnorm.distributed import init_from_env

    cfg = ex.TrainConfig(
        model=args.model,
        data=args.data,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        context=args.context,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        schedule=args.schedule,
        input_noise=args.input_noise,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        affine_mass=args.affine_mass,
        unfolded=args.unfolded,
    )
    cfg.sweep_config().validate()
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be a positive step, got {args.stop_after}")
    device = _device(args.device)
    _setup()
    data = load(cfg.data, image=cfg.model == "rescnn", input_noise=cfg.input_noise)
    # Under torchrun: join the process group; ex.train then wraps the model in DDP (or shards
    # it), gives each rank its own batches, and logs and writes from rank 0 only.
    device = init_from_env(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        res = ex.train(
            cfg,
            args.out,
            data,
            resume=args.resume,
            device=device,
            progress=not args.no_progress,
            stop_after=args.stop_after,
            strategy=args.strategy,
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            _left_group = True
    if rank != 0:  # rank 0 reports
        return 0
    last = res["val"][-1] if res["val"] else {}
    print(f"train loss {res['train_loss']:.4f} (mean of the last 10% of steps)", end="")
    print(f", validation loss {last['loss']:.4f}" if last else "")
    ckpt = Path(args.out) / ("checkpoint" if args.strategy == "fsdp" else "checkpoint.pt")
    print(f"wrote {Path(args.out) / 'train.json'} and {ckpt}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from modnorm.plots import draw_sweeps

    sweeps: list[dict[str, Any]] = []
    for d in args.dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"no results.json in {d}")
        saved = json.loads(path.read_text())
        for s in saved.get("sweeps", [saved]):
            if "summary" not in s:
                s["summary"] = ex.summarize(s["runs"], s["config"]["scale"])
            sweeps.append(s)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "sweep.png"
    draw_sweeps(sweeps, out, metric=args.metric)
    print(f"wrote {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch

    from modnorm.data import load
    from modnorm.diagnostics import calibrate_, rows, sharpness_check, well_normed

    modes = [args.scale is not None, args.alignment, args.stable_step]
    if sum(modes) > 1:
        raise ValueError("choose one of --scale, --alignment and --stable-step")
    if args.calibrate and any(modes):
        raise ValueError("--calibrate applies to the well-normed check, not with these modes")
    if args.values is not None and args.scale is None:
        raise ValueError("--values needs --scale width or --scale depth")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    cfg = ex.SweepConfig(
        model=args.model,
        data=args.data,
        width=args.width,
        depth=args.depth,
        context=args.context,
        num_heads=args.heads,
    )
    cfg.validate()
    if args.model == "gpt" and args.activation is not None:
        raise ValueError("--activation applies to mlp, resmlp and rescnn")
    _setup()
    data = load(cfg.data, image=cfg.model == "rescnn", input_noise=args.input_noise)
    if args.scale is not None:
        return _check_coordinates(args, data)
    if args.alignment:
        return _check_alignment(args, cfg, data)
    if args.stable_step:
        return _check_stable_step(args, cfg, data)
    model = _check_model(args, cfg, data)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = data.batch(args.batch_size, gen, cfg.context)
    if args.unit_inputs and x.is_floating_point():
        size = rows(x).square().mean(-1).sqrt().reshape(x.shape[0], -1).amax(1)
        x = x / size.clamp_min(1e-12).reshape(-1, *([1] * (x.ndim - 1)))
    if args.calibrate:
        declared = calibrate_(model, x)
        low = min(declared.values())
        print(f"calibrated {len(declared)} RMSDivide bonds: input RMS down to {low:.3g}")
    report = well_normed(
        model,
        x,
        eta=args.eta,
        kind=args.kind,
        rounds=args.rounds,
        y=y,
        loss=args.loss,
        generator=gen,
    )
    print(f"{args.model} width {args.width} depth {args.depth} on {cfg.data}, batch {len(x)}")
    print(report.table())
    figure = report.plot(Path(args.out) / "well_normed.png")
    print(f"wrote {figure}")
    if args.sharpness:
        print()
        print(sharpness_check(model, args.loss, (x, y), generator=gen).table())
    return 0


def _check_model(
    args: argparse.Namespace, cfg: ex.SweepConfig, data: Any, width: int | None = None
) -> Any:
    """The model of ``modnorm check`` (seeded): as the sweeps build it, or with another
    ``--activation``."""
    import torch

    from modnorm import compounds

    torch.manual_seed(args.seed)
    width = args.width if width is None else width
    if args.activation is None:
        return ex.build_model(cfg, "modnorm-adam", width, args.depth, data)
    classes, shape = data.num_classes, data.in_shape
    if args.model == "mlp":
        return compounds.MLP(math.prod(shape), classes, width, args.depth + 1, args.activation)
    if args.model == "resmlp":
        return compounds.ResMLP(
            math.prod(shape), classes, width, args.depth, activation=args.activation
        )
    return compounds.ResCNN(shape[0], classes, width, args.depth, activation=args.activation)


def _check_coordinates(args: argparse.Namespace, data: Any) -> int:
    from modnorm.diagnostics import coordinate_check

    if args.values is None:
        raise ValueError("--scale needs --values, e.g. --values 32,64,128,256")
    if args.activation is not None:
        raise ValueError("the coordinate check builds the sweeps' models: no --activation")
    result = coordinate_check(
        args.model,
        args.scale,
        args.values,
        data=data,
        width=args.width,
        depth=args.depth,
        steps=args.steps or 5,
        lr=args.lr,
        torch_lr=args.torch_lr,
        batch_size=args.batch_size,
        context=args.context,
        num_heads=args.heads,
        seed=args.seed,
    )
    print(result.table())
    print(f"wrote {result.plot(Path(args.out) / 'coord_check.png')}")
    return 0


def _check_alignment(args: argparse.Namespace, cfg: ex.SweepConfig, data: Any) -> int:
    import torch

    from modnorm.diagnostics import alignment

    model = _check_model(args, cfg, data)
    steps = args.steps or 100
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    batches = (data.batch(args.batch_size, gen, cfg.context) for _ in range(steps))
    held = _held_out(data, args.batch_size, cfg.context)
    log = alignment(
        model,
        ex.build_optimizer("modnorm-adam", model, args.lr),
        batches,
        steps,
        every=args.every,
        held_out=held,
        loss=args.loss,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(
        f"{args.model} width {args.width} depth {args.depth} on {cfg.data} (input noise "
        f"{args.input_noise:g}), modnorm Adam lr {args.lr:g}, batch {args.batch_size}"
    )
    print(log.table())
    print(f"wrote {log.plot(Path(args.out) / 'alignment.png')}")
    return 0


def _held_out(data: Any, n: int, context: int) -> Any:
    """The first ``n`` test inputs, or ``n`` fixed validation windows of text."""
    import torch

    if data.kind == "text":
        from modnorm.data import text_windows

        return text_windows(data.val, n, context, torch.Generator().manual_seed(0))[0]
    return data.x_test[:n]


def _check_stable_step(args: argparse.Namespace, cfg: ex.SweepConfig, data: Any) -> int:
    import torch

    from modnorm import optim
    from modnorm.diagnostics import stable_step

    model = _check_model(args, cfg, data)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = data.batch(args.batch_size, gen, cfg.context)
    result = stable_step(model, args.loss, (x, y), generator=gen)
    print(
        f"{args.model} width {args.width} depth {args.depth} on {cfg.data} (input noise "
        f"{args.input_noise:g}), at initialization, batch {len(x)}"
    )
    print(result.certificate.table())
    print(result.table())
    if args.lrs is None:
        return 0
    steps = args.steps or 200
    makers = {
        "dual (no momentum)": lambda m, lr: optim.Dual(m, lr=lr, momentum=0.0),
        "modnorm-adam": lambda m, lr: ex.build_optimizer("modnorm-adam", m, lr),
    }
    print(
        f"\nsweep: {steps} steps, batch {args.batch_size}, constant lr, seed {args.seed}; "
        "loss = mean training loss of the last 10% of steps"
    )
    for name, make in makers.items():
        losses = []
        for lr in args.lrs:
            model = _check_model(args, cfg, data)
            losses.append(_train_loss(model, make(model, lr), data, args, steps, cfg.context))
        best = ex.best_lr(args.lrs, losses)
        cells = "  ".join(
            f"2^{math.log2(lr):+.1f}: {v:.4f}" for lr, v in zip(args.lrs, losses, strict=True)
        )
        print(f"  {name}: {cells}")
        if best["lr"] is None:
            print(f"  {name}: every run diverged")
            continue
        gap = math.log2(best["lr"] / result.eta_bound)
        print(
            f"  {name}: best lr {best['lr']:.4g} (2^{math.log2(best['lr']):+.2f}"
            f"{', on the edge of the grid' if best['edge'] else ''}), "
            f"{gap:+.1f} octaves from the guaranteed 2‖g‖_*/S = {result.eta_bound:.4g}"
        )
    return 0


def _train_loss(
    model: Any, opt: Any, data: Any, args: argparse.Namespace, steps: int, context: int
) -> float:
    """Mean training loss of the last 10 % of ``steps`` steps (inf if it diverges)."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + args.seed)
    losses: list[float] = []
    for _ in range(steps):
        x, y = data.batch(args.batch_size, gen, context)
        loss = ex.loss_fn(model(x), y)
        if not torch.isfinite(loss) or (losses and loss.item() > 10 * losses[0]):
            return math.inf
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: best learning rate (log2) per scale, drift, regret, scaling."""
    lines = []
    for res in results:
        cfg = res["config"]
        values = sorted(cfg["values"])
        lines.append(
            f"\n{cfg['model']} {cfg['scale']} sweep on {cfg['data']} "
            f"({cfg['steps']} steps, {cfg['seeds']} seed(s))\n"
        )
        head = " | ".join(f"{cfg['scale']} {v}" for v in values)
        lines.append(f"| optimizer | {head} | drift (octaves) | regret | best loss improves |")
        lines.append("|---" * (len(values) + 4) + "|")
        for opt, s in sorted(
            res["summary"].items(), key=lambda kv: (not kv[0].startswith("modnorm"), kv[0])
        ):
            cells = []
            for v in values:
                lr = s["best_lr"][str(v)]
                mark = "*" if s["edge"][str(v)] else ""
                cells.append("diverged" if lr is None else f"2^{math.log2(lr):+.1f}{mark}")
            drift = "—" if s["drift_octaves"] is None else f"{s['drift_octaves']:.1f}"
            regret = "—" if s["regret"] is None else f"{s['regret']:.1%}"
            lines.append(
                f"| {opt} | "
                + " | ".join(cells)
                + f" | {drift} | {regret} | {'yes' if s['improves_with_scale'] else 'no'} |"
            )
    lines.append(
        "\nbest lr = geometric middle of the learning rates within 1% of the lowest loss; "
        "* = on the grid's edge"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    run()

"""What ``modnorm.optim`` promises: steps of modular norm ``lr``, the torch.optim contract
(schedulers, state_dict and exact resume, closures, gradient accumulation), the generic
wrapper equal to the built-ins, weight decay in the modular norm, non-finite gradients,
bad input, bf16 and torch.compile."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any, cast
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modnorm as mn
from modnorm import optim

Make = Callable[[mn.Module], optim.ModularOptimizer]

LR = 0.2
OPTIMIZERS: dict[str, Make] = {
    "sgd": lambda m: optim.SGD(m, LR),
    "sgd-nesterov": lambda m: optim.SGD(m, LR, momentum=0.9, nesterov=True),
    "adam": lambda m: optim.Adam(m, LR),
    "adamw": lambda m: optim.AdamW(m, LR, weight_decay=0.1),
    "dual": lambda m: optim.Dual(m, LR),
    "dual-svd": lambda m: optim.Dual(m, LR, momentum=0.9, nesterov=False, method="svd"),
    "dual-mixed": lambda m: optim.Dual(m, LR, precision="mixed"),
    "normalized-radam": lambda m: optim.Normalized(m, torch.optim.RAdam, LR),
    "normalized-adagrad": lambda m: optim.Normalized(m, torch.optim.Adagrad, LR),
}
CORE = ["sgd-nesterov", "adam", "dual", "normalized-radam"]  # one of each kind


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: extra threads only add synchronization, and on a busy machine
    # OpenMP's spin-waiting makes each step several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 8 - 1, torch.tensor(y)


def resmlp(seed: int = 0, width: int = 32) -> mn.Module:
    torch.manual_seed(seed)
    return mn.ResMLP(64, 10, width=width, num_blocks=2)


def gpt(seed: int = 0, affine_mass: float | None = None) -> mn.Module:
    torch.manual_seed(seed)
    return mn.GPT(17, 8, width=32, num_heads=2, num_blocks=1, affine_mass=affine_mass)


def batch(data: tuple[torch.Tensor, torch.Tensor], step: int, size: int = 64):
    x, y = data
    idx = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def backward(model: mn.Module, xb: torch.Tensor, yb: torch.Tensor, scale: float = 1.0) -> float:
    loss = F.cross_entropy(model(xb).float(), yb) * scale
    loss.backward()
    return loss.item()


def gpt_backward(model: mn.Module, step: int) -> float:
    tokens = torch.randint(0, 17, (4, 9), generator=torch.Generator().manual_seed(step))
    tokens = tokens.to(next(model.parameters()).device)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item()


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def applied_update(
    model: mn.Module, before: list[torch.Tensor], decay: float
) -> list[torch.Tensor]:
    """Undo ``w ← (w − u)·(1 − decay·share)`` to read off ``u``."""
    shares = [s for _, s in model.atom_shares()]
    return [
        b - p.detach() / (1 - decay * s)
        for b, p, s in zip(before, model.parameters(), shares, strict=True)
    ]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


# ---- the step has modular norm lr ------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_has_modular_norm_lr(name: str, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    decay = LR * opt.param_groups[0]["weight_decay"]
    for step in range(3):
        before = weights(model)
        opt.zero_grad()
        backward(model, *batch(digits, step))
        opt.step()
        u = applied_update(model, before, decay)
        assert model.norm(u).item() == pytest.approx(LR, rel=1e-3)
        for (atom, share), t in zip(model.atom_shares(), u, strict=True):
            # every atom saturates its share of the target
            assert atom.atom_norm(t).item() == pytest.approx(LR * share, rel=1e-3)


@pytest.mark.parametrize("affine_mass", [None, 0.5])
@pytest.mark.parametrize("name", CORE)
def test_update_norm_on_a_gpt_with_embeddings(name: str, affine_mass: float | None) -> None:
    model = gpt(affine_mass=affine_mass)
    opt = OPTIMIZERS[name](model)
    for step in range(2):
        before = weights(model)
        opt.zero_grad()
        gpt_backward(model, step)
        opt.step()
        u = applied_update(model, before, 0.0)
        assert model.norm(u).item() == pytest.approx(LR, rel=1e-3)
        for (atom, share), t in zip(model.atom_shares(), u, strict=True):
            assert atom.atom_norm(t).item() == pytest.approx(LR * share, rel=1e-3)


@pytest.mark.parametrize("name", CORE)
def test_update_norm_on_a_rescnn_with_channel_biases(name: str) -> None:
    torch.manual_seed(0)
    model = mn.ResCNN(1, 10, 8, 2, affine_mass=0.5)
    opt = OPTIMIZERS[name](model)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(2):
        before = weights(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        u = applied_update(model, before, 0.0)
        assert model.norm(u).item() == pytest.approx(LR, rel=1e-3)
        for (atom, share), t in zip(model.atom_shares(), u, strict=True):
            assert atom.atom_norm(t).item() == pytest.approx(LR * share, rel=1e-3)


def test_dual_orthogonalizes_linear_and_row_normalizes_embedding() -> None:
    model = gpt(affine_mass=0.5)
    opt = optim.Dual(model, LR, method="svd")
    gpt_backward(model, 0)
    before = weights(model)
    opt.step()
    for (atom, share), u in zip(
        model.atom_shares(), applied_update(model, before, 0.0), strict=True
    ):
        if isinstance(atom, mn.Embedding):
            rows = u.norm(dim=1)
            used = rows > 0  # tokens absent from the batch have a zero gradient row
            assert torch.allclose(rows[used], torch.full_like(rows[used], LR * share), rtol=1e-4)
        elif isinstance(atom, mn.Bias):  # the gradient's direction, of RMS lr·share
            assert torch.isclose(u.square().mean().sqrt(), torch.tensor(LR * share), rtol=1e-4)
        elif isinstance(atom, mn.Gain):  # every entry ±lr·share
            assert torch.allclose(u.abs(), torch.full_like(u, LR * share), rtol=1e-4)
        else:  # U Vᵀ: every singular value is lr·share, save the gradient's null directions
            s = torch.linalg.svdvals(u)
            kept = s[s > 1e-3 * LR]
            assert len(kept) >= min(u.shape) // 2
            assert torch.allclose(kept, torch.full_like(kept, LR * share), rtol=1e-4)


# ---- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loss_decreases_on_digits(name: str, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    losses = []
    for step in range(25):
        opt.zero_grad()
        losses.append(backward(model, *batch(digits, step, 128)))
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


# ---- the torch.optim contract ----------------------------------------------------------------


@pytest.mark.parametrize("name", CORE)
def test_scheduler_sets_the_target_norm(name: str, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: [1.0, 0.5, 0.25, 0.0][min(t, 3)])
    for step in range(4):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(LR * [1.0, 0.5, 0.25, 0.0][step])
        before = weights(model)
        opt.zero_grad()
        backward(model, *batch(digits, step))
        opt.step()
        sched.step()
        u = [b - p for b, p in zip(before, model.parameters(), strict=True)]
        if lr > 0:
            assert model.norm(u).item() == pytest.approx(lr, rel=1e-3)
        else:  # lr 0 (the end of a linear decay): the weights stay put
            assert max_diff(before, weights(model)) == 0


def test_zero_grad_and_param_groups(digits) -> None:
    model = resmlp()
    opt = optim.Adam(model, LR, betas=(0.8, 0.9))
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert all(a is b for a, b in zip(group["params"], model.parameters(), strict=True))
    assert group["betas"] == (0.8, 0.9) and group["lr"] == LR
    assert opt.module is model
    backward(model, *batch(digits, 0))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure(digits) -> None:
    xb, yb = batch(digits, 0)
    a, b = resmlp(), resmlp()
    opt_a, opt_b = optim.Adam(a, LR), optim.Adam(b, LR)

    def closure() -> torch.Tensor:
        opt_a.zero_grad()
        loss = F.cross_entropy(a(xb), yb)
        loss.backward()
        return loss

    loss = opt_a.step(closure)
    expected = backward(b, xb, yb)
    opt_b.step()
    assert loss.item() == pytest.approx(expected)
    assert max_diff(weights(a), weights(b)) == 0


def save_load(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", [*CORE, "adamw", "normalized-adagrad"])
def test_state_dict_round_trip_and_exact_resume(name: str, digits) -> None:
    make = OPTIMIZERS[name]
    model = resmlp()
    opt = make(model)
    for step in range(5):
        opt.zero_grad()
        backward(model, *batch(digits, step))
        opt.step()
    model_sd, opt_sd = save_load(model.state_dict()), save_load(opt.state_dict())

    # An uninterrupted run ...
    for step in range(5, 55):
        opt.zero_grad()
        backward(model, *batch(digits, step))
        opt.step()

    # ... and one resumed from the checkpoint, in a fresh model and optimizer.
    fresh = resmlp(seed=1)
    fresh.load_state_dict(model_sd)
    resumed = make(fresh)
    resumed.load_state_dict(opt_sd)
    again = save_load(resumed.state_dict())
    assert again["param_groups"] == opt_sd["param_groups"]
    for i, state in opt_sd["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(again["state"][i][key]), torch.as_tensor(value))
    for step in range(5, 55):
        resumed.zero_grad()
        backward(fresh, *batch(digits, step))
        resumed.step()
    assert max_diff(weights(model), weights(fresh)) == 0


def test_adam_state_holds_step_counts(digits) -> None:
    model = resmlp()
    opt = optim.Adam(model, LR)
    for step in range(3):
        opt.zero_grad()
        backward(model, *batch(digits, step))
        opt.step()
    state = save_load(opt.state_dict())["state"]
    assert [s["step"] for s in state.values()] == [3] * len(list(model.parameters()))
    assert set(state[0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("name", CORE)
def test_gradient_accumulation_equals_a_big_batch(name: str, digits) -> None:
    big, small = resmlp(), resmlp()
    opt_big, opt_small = OPTIMIZERS[name](big), OPTIMIZERS[name](small)
    for step in range(3):
        xb, yb = batch(digits, step, 64)
        opt_big.zero_grad()
        backward(big, xb, yb)
        opt_big.step()
        opt_small.zero_grad()
        for k in range(4):  # four micro-batches of 16, each loss scaled by 1/4
            backward(small, xb[16 * k : 16 * (k + 1)], yb[16 * k : 16 * (k + 1)], scale=0.25)
        opt_small.step()
        assert max_diff(weights(big), weights(small)) < 1e-5


# ---- the generic wrapper equals the built-ins ------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "wrapped"),
    [
        (
            lambda m: optim.SGD(m, LR),
            lambda m: optim.Normalized(m, torch.optim.SGD, LR),
        ),
        (
            lambda m: optim.SGD(m, LR, momentum=0.9, nesterov=True),
            lambda m: optim.Normalized(m, torch.optim.SGD, LR, momentum=0.9, nesterov=True),
        ),
        (
            lambda m: optim.Adam(m, LR, betas=(0.8, 0.95), eps=1e-6),
            lambda m: optim.Normalized(m, torch.optim.Adam, LR, betas=(0.8, 0.95), eps=1e-6),
        ),
        (
            lambda m: optim.AdamW(m, LR, weight_decay=0.5),
            lambda m: optim.Normalized(
                m, torch.optim.Adam, LR, betas=(0.9, 0.99), modular_weight_decay=0.5
            ),
        ),
    ],
    ids=["sgd", "sgd-nesterov", "adam", "adamw"],
)
def test_normalized_wrapper_equals_builtin(ours: Make, wrapped: Make, digits) -> None:
    a, b = resmlp(), resmlp()
    opt_a, opt_b = ours(a), wrapped(b)
    for step in range(20):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            backward(model, *batch(digits, step))
            opt.step()
        assert max_diff(weights(a), weights(b)) < 1e-5


def test_normalized_keeps_base_state_and_rejects_lbfgs(digits) -> None:
    model = resmlp()
    opt = optim.Normalized(model, torch.optim.Adam, LR)
    backward(model, *batch(digits, 0))
    opt.step()
    first = next(iter(model.parameters()))
    assert set(opt.base.state[first]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "base" in opt.state_dict()
    with pytest.raises(ValueError, match="LBFGS"):
        optim.Normalized(model, torch.optim.LBFGS, LR)


# ---- weight decay, projection, frozen parameters ---------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "dual"])
def test_weight_decay_shrinks_each_atom_by_its_share(name: str) -> None:
    model = gpt(affine_mass=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # biases start at 0: make a decay of them visible
    cls = {"sgd": optim.SGD, "adam": optim.Adam, "dual": optim.Dual}[name]
    opt = cls(model, LR, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero update: only the decay moves the weights
    before = weights(model)
    opt.step()
    kinds = set()
    for (atom, share), b, p in zip(model.atom_shares(), before, model.parameters(), strict=True):
        kinds.add(type(atom))
        if isinstance(atom, (mn.Bias, mn.Gain)):  # as AdamW recipes: no decay of these
            assert not atom.decays
            assert torch.equal(p, b)
        else:
            assert share > 0
            assert torch.allclose(p, b * (1 - LR * 0.5 * share), rtol=1e-6, atol=0)
    assert {mn.Bias, mn.Gain, mn.Linear, mn.Embedding} <= kinds


def test_project_after_each_step(digits) -> None:
    model = resmlp()
    opt = optim.Adam(model, 0.5, project=True)
    backward(model, *batch(digits, 0))
    opt.step()
    for atom, _ in model.atom_shares():
        s = torch.linalg.svdvals(atom.weight)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


@pytest.mark.parametrize("name", CORE)
def test_parameters_without_gradient_stay_put(name: str, digits) -> None:
    model = resmlp()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    opt = OPTIMIZERS[name](model)
    before = weights(model)
    backward(model, *batch(digits, 0))
    opt.step()
    after = weights(model)
    assert torch.equal(before[0], after[0])
    assert all(not torch.equal(b, a) for b, a in zip(before[1:], after[1:], strict=True))


@pytest.mark.parametrize("name", CORE)
def test_deepcopy_is_an_independent_working_optimizer(name: str, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    backward(model, *batch(digits, 0))
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.module is not model
    held = [clone.param_groups[0]["params"]]
    if isinstance(clone, optim.Normalized):
        held.append(clone.base.param_groups[0]["params"])
    for params in held:
        assert all(a is b for a, b in zip(params, clone.module.parameters(), strict=True))
    before = weights(model)
    clone.zero_grad()
    backward(clone.module, *batch(digits, 1))
    clone.step()
    assert max_diff(before, weights(model)) == 0  # the original is untouched
    assert max_diff(before, weights(clone.module)) > 0


def test_zero_eps_adam_stays_finite_and_wrapper_reports_a_bad_base_update() -> None:
    # Tokens absent from the batch give zero gradient rows: with ε = 0 Adam divides 0 by 0.
    model = gpt()
    gpt_backward(model, 0)
    optim.Adam(model, LR, eps=0.0).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    wrapped = optim.Normalized(model, torch.optim.Adam, LR, eps=0.0)
    before = weights(model)
    with pytest.raises(ValueError, match=r"Adam produced a non-finite update for Embedding"):
        wrapped.step()
    assert max_diff(before, weights(model)) == 0


# ---- non-finite gradients --------------------------------------------------------------------


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_naming_the_atom(name: str, bad: float, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    backward(model, *batch(digits, 0))
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    backward(model, *batch(digits, 1))
    params = list(model.parameters())
    grad = params[2].grad
    assert grad is not None
    grad[0, 0] = bad
    before = weights(model)
    with pytest.raises(ValueError, match=r"non-finite gradient for Linear\(32, 32\)"):
        opt.step()
    assert max_diff(before, weights(model)) == 0
    after = opt.state_dict()
    for i, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(after["state"][i][key]), torch.as_tensor(value))


@pytest.mark.parametrize("name", CORE)
def test_skip_nonfinite_skips_and_counts(name: str, digits) -> None:
    model = resmlp()
    opt = OPTIMIZERS[name](model)
    opt.skip_nonfinite = True
    backward(model, *batch(digits, 0))
    grad = next(iter(model.parameters())).grad
    assert grad is not None
    grad[0, 0] = float("nan")
    before = weights(model)
    opt.step()
    assert opt.skipped_steps == 1
    assert max_diff(before, weights(model)) == 0
    opt.zero_grad()
    backward(model, *batch(digits, 1))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_diff(before, weights(model)) > 0
    restored = OPTIMIZERS[name](resmlp())
    restored.load_state_dict(save_load(opt.state_dict()))
    assert restored.skipped_steps == 1


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
def test_bad_lr(lr: float) -> None:
    model = resmlp()
    for make in (optim.SGD, optim.Adam, optim.AdamW, optim.Dual):
        with pytest.raises(ValueError, match="lr"):
            make(model, lr)
    with pytest.raises(ValueError, match="lr"):
        optim.Normalized(model, torch.optim.SGD, lr)


@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, float("nan"))])
def test_bad_betas(betas: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(resmlp(), LR, betas=betas)


def test_bad_momentum_and_weight_decay() -> None:
    model = resmlp()
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(model, LR, momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        optim.Dual(model, LR, momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.Adam(model, LR, weight_decay=-1.0)
    with pytest.raises(ValueError, match="method"):
        optim.Dual(model, LR, method="qr")
    with pytest.raises(ValueError, match=r"precision must be one of .* got 'half'"):
        optim.Dual(model, LR, precision="half")


def test_bad_lr_from_a_scheduler_or_user_is_caught_at_step(digits) -> None:
    model = resmlp()
    opt = optim.SGD(model, LR)
    backward(model, *batch(digits, 0))
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_not_a_modnorm_module() -> None:
    with pytest.raises(TypeError, match="modnorm module"):
        optim.Adam(cast(Any, nn.Linear(3, 4)), LR)
    with pytest.raises(TypeError, match="modnorm module"):
        optim.Adam(cast(Any, resmlp().parameters()), LR)


def test_parameters_outside_the_module() -> None:
    model = resmlp()
    opt = optim.Adam(model, LR)
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    extra = resmlp()
    extra.register_parameter("bias", nn.Parameter(torch.zeros(10)))
    with pytest.raises(ValueError, match=r"'bias'.*belongs to no modnorm atom"):
        optim.Adam(extra, LR)


def test_module_changed_after_the_optimizer_was_built(digits) -> None:
    model = resmlp()
    opt = optim.Adam(model, LR)
    atom = model.atom_shares()[1][0]
    atom.weight = nn.Parameter(atom.weight.detach().clone())
    backward(model, *batch(digits, 0))
    with pytest.raises(ValueError, match="parameters changed"):
        opt.step()


def test_state_dict_of_another_model_is_rejected() -> None:
    opt = optim.Adam(resmlp(), LR)
    other = optim.Adam(mn.ResMLP(64, 10, width=32, num_blocks=3), LR)
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())


# ---- bf16 and torch.compile ------------------------------------------------------------------


@pytest.mark.parametrize("name", CORE)
def test_bf16_parameters(name: str, digits) -> None:
    model = resmlp().to(torch.bfloat16)
    opt = OPTIMIZERS[name](model)
    computed: list[list[torch.Tensor]] = []  # the update before it is rounded into the weights
    shape = opt._shape

    def recording_shape(group: dict, d: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
        computed.append(shape(group, d, lr))
        return computed[-1]

    losses = []
    with mock.patch.object(opt, "_shape", side_effect=recording_shape):
        for step in range(20):
            xb, yb = batch(digits, step, 128)
            before = [p.detach().float() for p in model.parameters()]
            opt.zero_grad()
            losses.append(backward(model, xb.bfloat16(), yb))
            opt.step()
            assert all(u.dtype == torch.bfloat16 for u in computed[-1])
            assert model.norm([u.float() for u in computed[-1]]).item() == pytest.approx(
                LR, rel=1e-2
            )
            applied = [b - p.float() for b, p in zip(before, model.parameters(), strict=True)]
            assert model.norm(applied).item() == pytest.approx(LR, rel=0.1)  # bf16 rounding of w
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    states = opt.base.state if isinstance(opt, optim.Normalized) else opt.state
    tensors = [t for s in states.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(t.dtype == torch.bfloat16 for t in tensors if t.ndim)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]


def run_compiled(backend: str, digits) -> None:
    torch._dynamo.reset()
    eager, model = resmlp(), resmlp()
    compiled = torch.compile(model, backend=backend)
    opt_eager, opt_compiled = optim.Adam(eager, LR), optim.Adam(cast(Any, compiled), LR)
    assert opt_compiled.module is model
    for step in range(3):
        xb, yb = batch(digits, step)
        for m, opt in ((eager, opt_eager), (compiled, opt_compiled)):
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
    assert max_diff(weights(eager), weights(model)) < 1e-5


def test_torch_compile_forward(digits) -> None:
    # aot_eager traces forward and backward as inductor does but skips code generation, which
    # takes ~25 s on CPU; the inductor run is the test below.
    run_compiled("aot_eager", digits)


def test_torch_compile_inductor(digits) -> None:
    run_compiled("inductor", digits)


# ---- on a GPU, when there is one --------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", CORE)
def test_cuda_matches_cpu_and_resumes_exactly(name: str) -> None:
    cpu, gpu = gpt(), gpt().cuda()
    opt_cpu, opt_gpu = OPTIMIZERS[name](cpu), OPTIMIZERS[name](gpu)
    for step in range(3):
        before = weights(gpu)
        for model, opt in ((cpu, opt_cpu), (gpu, opt_gpu)):
            opt.zero_grad()
            gpt_backward(model, step)
            opt.step()
        u = applied_update(gpu, before, 0.0)
        assert gpu.norm(u).item() == pytest.approx(LR, rel=1e-3)
    assert max_diff(weights(cpu), [w.cpu() for w in weights(gpu)]) < 1e-3
    model_sd, opt_sd = save_load(gpu.state_dict()), save_load(opt_gpu.state_dict())
    fresh = gpt(seed=1).cuda()
    fresh.load_state_dict(model_sd)
    resumed = OPTIMIZERS[name](fresh)
    resumed.load_state_dict(opt_sd)
    for step in range(3, 13):
        for model, opt in ((gpu, opt_gpu), (fresh, resumed)):
            opt.zero_grad()
            gpt_backward(model, step)
            opt.step()
    assert max_diff(weights(gpu), weights(fresh)) == 0


@cuda
@pytest.mark.parametrize("name", CORE)
def test_cuda_bf16_and_nonfinite(name: str) -> None:
    model = gpt().cuda().to(torch.bfloat16)
    opt = OPTIMIZERS[name](model)
    losses = []
    for step in range(15):
        opt.zero_grad()
        losses.append(gpt_backward(model, step % 3))
        opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    gpt_backward(model, 0)
    grad = next(iter(model.parameters())).grad
    assert grad is not None
    grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite gradient for Embedding\(17, 32\)"):
        opt.step()

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modnorm import linalg
from modnorm.linalg import orthogonalize, spectral_norm, spectral_norms


@pytest.fixture
def host_copies(monkeypatch: pytest.MonkeyPatch) -> list[torch.Size]:
    """The shapes of the tensors copied to the host (``Tensor.cpu``) from here on: on a GPU,
    each copy is a synchronization."""
    copies: list[torch.Size] = []
    cpu = torch.Tensor.cpu

    def counted(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        copies.append(self.shape)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    return copies


@pytest.mark.parametrize(
    "shape", [(1, 5), (7, 3), (64, 64), (300, 40), (128, 512), (512, 512), (100, 1000)]
)
def test_spectral_norm_matches_svd(shape: tuple[int, int]) -> None:
    a = torch.randn(shape)
    exact = torch.linalg.matrix_norm(a, ord=2)
    est, v = spectral_norm(a)
    assert abs(est - exact) / exact < 1e-3
    # the returned vector is the top right singular vector
    assert abs((a @ v).norm() - exact) / exact < 1e-2


def test_spectral_norm_warm_start_converges_fast_and_stays_accurate() -> None:
    a = torch.randn(400, 300)
    _, v = spectral_norm(a)
    b = a + 0.01 * torch.randn_like(a)
    est, _ = spectral_norm(b, v, max_iter=4)
    exact = torch.linalg.matrix_norm(b, ord=2)
    assert abs(est - exact) / exact < 1e-3


def test_spectral_norm_of_structured_spectrum() -> None:
    # a known spectrum with a tiny gap at the top: Lanczos must still find σ₁
    u, _ = torch.linalg.qr(torch.randn(200, 200))
    w, _ = torch.linalg.qr(torch.randn(100, 100))
    s = torch.linspace(1.0, 0.5, 100)
    s[1] = 0.999
    a = u[:, :100] @ torch.diag(s) @ w.T
    est, _ = spectral_norm(a)
    assert abs(est - 1.0) < 1e-3


def test_spectral_norm_of_zero_is_zero() -> None:
    est, _ = spectral_norm(torch.zeros(40, 30))
    assert est == 0


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
@pytest.mark.parametrize("shape", [(1, 8), (8, 1), (16, 16), (100, 30), (30, 100), (256, 256)])
def test_orthogonalize_is_the_dual_map_of_the_spectral_norm(
    method: str, shape: tuple[int, int]
) -> None:
    g = torch.randn(shape)
    o = orthogonalize(g, method)
    assert o.shape == g.shape
    assert abs(torch.linalg.matrix_norm(o, ord=2) - 1) < 1e-3
    nuclear = torch.linalg.matrix_norm(g, ord="nuc")
    assert abs((g * o).sum() - nuclear) / nuclear < 1e-3


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
def test_orthogonalize_matches_polar_factor(method: str) -> None:
    g = torch.randn(60, 40, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g, method)
    assert torch.linalg.matrix_norm(o - u @ vh, ord=2) < 1e-3


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
def test_orthogonalize_does_not_inflate_rounding_noise(method: str) -> None:
    # a rank-2 matrix plus float32 rounding noise: the exact polar factor of the noisy matrix
    # has 50 unit singular values; the dual map must keep the 2 real directions only.
    a = torch.randn(50, 2) @ torch.randn(2, 50)
    g = a + 1e-7 * torch.randn(50, 50)
    o = orthogonalize(g, method)
    s = torch.linalg.svdvals(o)
    assert abs(s[0] - 1) < 1e-3 and abs(s[1] - 1) < 1e-3
    assert s[2] < 0.05


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
def test_orthogonalize_zero_and_batches_and_bf16(method: str) -> None:
    assert torch.equal(orthogonalize(torch.zeros(5, 7), method), torch.zeros(5, 7))
    g = torch.randn(9, 12, 6)
    o = orthogonalize(g, method)
    for i in range(9):
        assert torch.allclose(o[i], orthogonalize(g[i], method), atol=1e-5)
    gb = torch.randn(32, 16).bfloat16()
    ob = orthogonalize(gb, method)
    assert ob.dtype == torch.bfloat16
    assert abs(torch.linalg.matrix_norm(ob.float(), ord=2) - 1) < 2e-2


@pytest.mark.parametrize("shape", [(256, 256), (96, 300), (300, 96), (3, 128, 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_precision_is_a_dual_map_on_full_rank_input(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    g = torch.randn(shape, dtype=dtype)
    o = orthogonalize(g, precision="mixed")
    assert o.dtype == dtype and o.shape == g.shape
    # the last step runs in float32/64: the singular values are 1 again, not 1 ± 4e-3
    assert (torch.linalg.matrix_norm(o.double(), ord=2) - 1).abs().max() < 1e-5
    nuclear = torch.linalg.matrix_norm(g.double(), ord="nuc")
    assert ((nuclear - (g.double() * o.double()).sum((-2, -1))) / nuclear).abs().max() < 1e-3


def test_mixed_precision_lifts_bfloat16_rounding_of_a_low_rank_input() -> None:
    # The trade-off the docstring states: full precision keeps a rank-1 input rank 1; bfloat16
    # rounding (~4e-3 relative) sits above the iteration's ~1e-3 threshold, so mixed
    # precision turns it into hundreds of spurious directions.
    g = torch.randn(512, 1) @ torch.randn(1, 512)
    full = torch.linalg.svdvals(orthogonalize(g, precision="full"))
    mixed = torch.linalg.svdvals(orthogonalize(g, precision="mixed"))
    assert abs(full[0] - 1) < 1e-5 and full[1] < 1e-3
    assert abs(mixed[0] - 1) < 1e-5 and int((mixed > 0.05).sum()) > 100


def test_orthogonalize_rejects_unknown_method_and_precision() -> None:
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        orthogonalize(torch.randn(3, 3), precision="half")
    with pytest.raises(ValueError, match="unknown orthogonalization method 'qr'"):
        orthogonalize(torch.randn(3, 3), "qr")


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 160),
    n=st.integers(1, 160),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 999),
)
def test_spectral_norm_property(m: int, n: int, scale: float, seed: int) -> None:
    # What holds for every matrix: a Ritz value never exceeds σ₁, and the estimate has at
    # least reached σ₂ (it is σ₁ itself unless the start has almost no component along the
    # top singular vector: see the next test)
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(m, n, generator=g, dtype=torch.float64)
    svals = torch.linalg.svdvals(a)
    est, _ = spectral_norm(a)
    assert est <= svals[0] * (1 + 1e-9)
    assert est >= svals[min(1, len(svals) - 1)] * (1 - 1e-3)


def test_spectral_norm_accuracy_on_gaussian_matrices() -> None:
    # A single start vector can have almost no component along the top singular vector; with
    # σ₂ close to σ₁ the iteration then settles on σ₂ first and the stopping rule ends it
    # there. On 300 Gaussian matrices with sides 97–160 (the Lanczos path): a few do, and
    # each by less than its own gap σ₁ − σ₂.
    gen = torch.Generator().manual_seed(0)
    errors, gaps = [], []
    for _ in range(300):
        m, n = (int(s) for s in torch.randint(97, 161, (2,), generator=gen))
        a = torch.randn(m, n, generator=gen, dtype=torch.float64)
        svals = torch.linalg.svdvals(a)
        errors.append(float((svals[0] - spectral_norm(a)[0]) / svals[0]))
        gaps.append(float((svals[0] - svals[1]) / svals[0]))
    errors_t, gaps_t = torch.tensor(errors), torch.tensor(gaps)
    assert errors_t.median() < 1e-5
    missed = errors_t > 1e-3
    assert int(missed.sum()) <= 6  # ≤ 2 %
    assert bool((errors_t <= gaps_t * (1 + 1e-6)).all())


def test_warm_start_on_a_stale_singular_vector_still_finds_the_top() -> None:
    # The previous step's top vector may now be the second one: started exactly there, the
    # Krylov space is invariant and a plain warm start stalls on σ₂.
    u, _ = torch.linalg.qr(torch.randn(300, 200, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    s = torch.linspace(0.9, 0.1, 200, dtype=torch.float64)
    s[0] = 1.0
    a = u @ torch.diag(s) @ w.T
    est, v = spectral_norm(a, v0=w[:, 1].clone())
    assert abs(est - 1.0) < 1e-4
    assert abs(abs(v @ w[:, 0]) - 1) < 1e-3


def test_batched_spectral_norms_match_one_by_one() -> None:
    from modnorm.linalg import spectral_norms

    a = torch.randn(5, 160, 120)  # above the exact-SVD size: Lanczos
    a[2] = 0  # a zero matrix in the batch does not disturb the others
    sigma, v = spectral_norms(a)
    exact = torch.linalg.matrix_norm(a, ord=2)
    assert torch.allclose(sigma, exact, rtol=1e-3)
    assert sigma[2] == 0
    b = a + 1e-3 * torch.randn_like(a)
    warm, _ = spectral_norms(b, v)
    assert torch.allclose(warm, torch.linalg.matrix_norm(b, ord=2), rtol=1e-3)


def test_mixed_precision_warns_where_bfloat16_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    from modnorm import linalg

    g = torch.randn(16, 16)
    monkeypatch.setattr(linalg, "native_bfloat16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="bfloat16 matmuls are emulated"):
        orthogonalize(g, precision="mixed")
    monkeypatch.setattr(linalg, "native_bfloat16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orthogonalize(g, precision="mixed")
        orthogonalize(g, precision="full")


@pytest.mark.parametrize(
    ("every", "max_iter", "checks"),
    [(1, 4, 1), (1, 10, 7), (2, 4, 1), (2, 5, 2), (2, 10, 4), (2, 11, 5)],
)
def test_lanczos_waits_for_the_device_only_when_it_may_stop(
    monkeypatch: pytest.MonkeyPatch,
    host_copies: list[torch.Size],
    every: int,
    max_iter: int,
    checks: int,
) -> None:
    # Each check of the stopping rule copies (α, β) to the host: on a GPU, a synchronization.
    # They come after 4 steps, then every `every` (1 on the CPU, 2 on accelerators; the
    # CPU's is set here to test both schedules), and after the last step.
    monkeypatch.setitem(linalg._CHECK_EVERY, "cpu", every)
    w = torch.randn(3, 200, 150, generator=torch.Generator().manual_seed(0))
    copies = host_copies
    sigma, _ = spectral_norms(w, tol=0.0, max_iter=max_iter)  # tol 0: all max_iter steps
    assert len(copies) == checks
    assert sum(c[0] for c in copies) == max_iter  # every step's (α, β) reached the host once
    # what the host saw is what a check after every step would have seen: the top of the
    # bidiagonal's spectrum grows with the steps and stays below σ₁
    exact = torch.linalg.matrix_norm(w, ord=2)
    assert (sigma <= exact * (1 + 1e-6)).all() and (sigma > 0.5 * exact).all()


def _drifting(batch: int, m: int, n: int, calls: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, m, n, generator=g)
    return [w + 0.05 * i * torch.randn(batch, m, n, generator=g) for i in range(calls)]


def _warm_run(mats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, v = [], None
    for w in mats:
        sigma, v = spectral_norms(w, v)
        out.append((sigma, v))
    return out


def test_captured_lanczos_steps_replay_to_the_eager_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On CUDA the steps between checks are captured once and replayed on later calls, reading
    # everything from the shape's workspace. A stand-in capture that replays by running the
    # same steps again checks that logic on the CPU: interleaved calls for two shapes, each
    # warm-started from its last, give what the eager iteration gives, bit for bit.
    a, b = _drifting(3, 150, 120, 5, seed=0), _drifting(2, 100, 130, 5, seed=1)
    eager_a, eager_b = _warm_run(a), _warm_run(b)
    captured: list[int] = []
    replays = []

    def capture(ws: object, steps: object) -> object:
        captured.append(id(steps))
        steps()  # type: ignore[operator]

        def replay() -> None:
            replays.append(1)
            steps()  # type: ignore[operator]

        return replay

    monkeypatch.setattr(linalg, "_graphs_on", lambda device: True)
    monkeypatch.setattr(linalg, "_capture", capture)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    va = vb = None
    for i in range(5):
        sa, va = spectral_norms(a[i], va)
        sb, vb = spectral_norms(b[i], vb)
        for (s, v), (se, ve) in (((sa, va), eager_a[i]), ((sb, vb), eager_b[i])):
            assert torch.equal(s, se) and torch.equal(v, ve)
    assert len(linalg._WORKSPACES) == 2 and replays and len(captured) < len(replays)
    exact = torch.linalg.matrix_norm(a[-1], ord=2)
    assert torch.allclose(sa, exact, rtol=1e-4)


def test_lanczos_without_capture_falls_back_to_eager_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (w,) = _drifting(2, 120, 110, 1, seed=2)

    def broken(ws: object, steps: object) -> object:
        steps()  # type: ignore[operator]  # as the real one: the steps run, then capture fails
        raise linalg._CaptureError("capture not supported here")

    monkeypatch.setattr(linalg, "_graphs_on", lambda device: True)
    monkeypatch.setattr(linalg, "_capture", broken)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    with pytest.warns(RuntimeWarning, match="without CUDA graphs: capture not supported"):
        sigma, _ = spectral_norms(w)
    assert torch.allclose(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-4)
    sigma2, _ = spectral_norms(w)  # the workspace stays eager: no second warning
    assert torch.equal(sigma, sigma2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_lanczos_matches_the_cpu() -> None:
    mats = _drifting(4, 300, 200, 6, seed=3)
    cpu = _warm_run(mats)
    gpu = _warm_run([w.cuda() for w in mats])
    for (s, _), (sg, vg) in zip(cpu, gpu, strict=True):
        assert vg.is_cuda and torch.allclose(sg.cpu(), s, rtol=1e-4)
    assert any(ws.graphs for ws in linalg._WORKSPACES.values())  # it did capture
    exact = torch.linalg.matrix_norm(mats[-1], ord=2)
    assert torch.allclose(gpu[-1][0].cpu(), exact, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 40, 500), (3, 500, 40), (2, 96, 96), (1, 1, 7)])
def test_small_matrices_get_the_exact_norm_and_vector(shape: tuple[int, int, int]) -> None:
    w = torch.randn(shape, dtype=torch.float64)
    w[0] *= 1e-3  # scale does not matter
    sigma, v = spectral_norms(w)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(sigma, s[:, 0], rtol=1e-10)
    assert torch.allclose(
        torch.linalg.vector_norm(w @ v[..., None], dim=(1, 2)), s[:, 0], rtol=1e-8
    )
    zero, _ = spectral_norms(torch.zeros(2, 30, 50))
    assert (zero == 0).all()


def test_batches_of_several_shapes_run_side_by_side(host_copies: list[torch.Size]) -> None:
    # Each shape's result is what it gets alone, and one host copy serves every shape at each
    # check: as many copies as the slowest shape needs alone, not the sum.
    g = torch.Generator().manual_seed(4)
    batches = [
        torch.randn(3, 200, 150, generator=g),
        torch.randn(2, 150, 300, generator=g, dtype=torch.float64),
        torch.randn(4, 40, 120, generator=g),  # exact: one copy of its Gram matrix
    ]
    warm = [None, torch.randn(2, 300, generator=g, dtype=torch.float64), None]
    copies = host_copies
    alone, alone_copies = [], []
    for w, v0 in zip(batches, warm, strict=True):
        copies.clear()
        alone.append(spectral_norms(w, v0))
        alone_copies.append(len(copies))
    copies.clear()
    together = linalg.spectral_norms_batches(batches, warm)
    assert len(copies) == max(alone_copies) < sum(alone_copies)
    for (s, v), (s2, vt), w in zip(alone, together, batches, strict=True):
        assert torch.equal(s, s2) and torch.equal(v, vt) and s2.dtype == w.dtype
        assert torch.allclose(s2, torch.linalg.matrix_norm(w, ord=2), rtol=1e-4)
    with pytest.raises(ValueError, match="2 batches but 1 warm starts"):
        linalg.spectral_norms_batches(batches[:2], warm[:1])


def test_normalize_and_dualize_run_in_float32_inside_autocast() -> None:
    # An optimizer step taken inside an autocast region must not run the norms' and dual
    # maps' matmuls in bfloat16 (normalize was off by 1.6e-3 there, dualize by 2.6e-2).
    import copy

    import modnorm as mn

    torch.manual_seed(0)
    net = mn.ResMLP(64, 10, width=160, num_blocks=2)
    update = [torch.randn_like(p) for p in net.parameters()]
    plain, cast = copy.deepcopy(net), copy.deepcopy(net)  # the same (cold) warm starts
    expected = plain.normalize(update, 0.1), plain.dualize(update, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cast.normalize(update, 0.1), cast.dualize(update, 0.1)
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            assert b.dtype == torch.float32 and torch.equal(a, b)


def test_cuda_workspaces_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A sweep trains network after network: only the most recent shapes keep their buffers.
    monkeypatch.setattr(linalg, "_graphs_on", lambda device: True)
    monkeypatch.setattr(linalg, "_capture", lambda ws, steps: steps() or steps)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    monkeypatch.setattr(linalg, "_MAX_WORKSPACES", 3)
    for n in range(100, 106):
        spectral_norms(torch.randn(1, 100, n))
    assert [key[2] for key in linalg._WORKSPACES] == [103, 104, 105]
    spectral_norms(torch.randn(1, 100, 104))  # a hit moves to the back
    spectral_norms(torch.randn(1, 100, 106))
    assert [key[2] for key in linalg._WORKSPACES] == [105, 104, 106]
    assert not any(ws.lock.locked() for ws in linalg._WORKSPACES.values())


def test_a_shape_first_checks_after_the_steps_its_last_call_needed(
    monkeypatch: pytest.MonkeyPatch, host_copies: list[torch.Size]
) -> None:
    # On CUDA (here: the CPU with cached workspaces and the accelerator's check interval) a
    # call like the last one copies to the host once, never stops earlier than a check after
    # every step would have, and returns exactly what that check gives: a resumed run, whose
    # workspace starts without the memory, continues as if it never stopped.
    mats = _drifting(3, 200, 150, 6, seed=5)
    copies = host_copies
    every_step = []  # steps taken, and the result, checking after every step (the CPU's rule)
    v = None
    for w in mats:
        copies.clear()
        sigma, v = spectral_norms(w, v)
        every_step.append((sum(c[0] for c in copies), sigma, v))
    monkeypatch.setitem(linalg._CHECK_EVERY, "cpu", 2)
    monkeypatch.setattr(linalg, "_graphs_on", lambda device: True)
    monkeypatch.setattr(linalg, "_capture", lambda ws, steps: steps() or steps)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    v, syncs = None, []
    for w, (needed, eager, eager_v) in zip(mats, every_step, strict=True):
        copies.clear()
        sigma, v = spectral_norms(w, v)
        (ws,) = linalg._WORKSPACES.values()
        assert ws.needed == needed  # what this call would have taken checking every step
        assert sum(c[0] for c in copies) >= needed  # and it took at least that many
        assert torch.equal(sigma, eager) and torch.equal(v, eager_v)
        syncs.append(len(copies))
    # against the same schedule without the memory: fewer synchronizations in all, and the
    # same results bit for bit
    forget = property(lambda ws: 0, lambda ws, steps: None)
    monkeypatch.setattr(linalg._Workspace, "needed", forget, raising=False)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    v, forgetful = None, []
    for w, (_, eager, eager_v) in zip(mats, every_step, strict=True):
        copies.clear()
        sigma, v = spectral_norms(w, v)
        assert torch.equal(sigma, eager) and torch.equal(v, eager_v)
        forgetful.append(len(copies))
    assert sum(syncs[1:]) < sum(forgetful[1:]) and syncs[0] == forgetful[0]


def test_captured_graphs_are_a_few_fixed_runs_of_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls whose schedules differ (the memory above moves the first check) replay the same
    # graphs: each covers the steps from a multiple of _GRAPH_STEPS to the next, so a shape
    # captures at most one graph per such run of steps, however many calls it serves.
    keys: list[tuple[int, int]] = []

    def capture(ws: object, steps: functools.partial) -> object:  # type: ignore[type-arg]
        keys.append(steps.args)
        steps()
        return steps

    monkeypatch.setitem(linalg._CHECK_EVERY, "cpu", 2)
    monkeypatch.setattr(linalg, "_graphs_on", lambda device: True)
    monkeypatch.setattr(linalg, "_capture", capture)
    monkeypatch.setattr(linalg, "_WORKSPACES", linalg.collections.OrderedDict())
    v, needed = None, set()
    for w in _drifting(3, 200, 150, 8, seed=6) + _drifting(3, 200, 150, 8, seed=7):
        _, v = spectral_norms(w, v)
        needed.add(next(iter(linalg._WORKSPACES.values())).needed)
    assert len(needed) > 2  # the schedules did differ
    g = linalg._GRAPH_STEPS
    assert len(keys) == len(set(keys))  # nothing captured twice
    assert all(lo % g == 0 and hi == lo + g for lo, hi in keys)

"""Matrix kernels behind the atoms' norms and dual maps.

Everything here works on 2-D float tensors and runs in float32 (or float64 when given
float64): callers up-cast bf16/fp16 so rounding does not decide a norm or a direction.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

# Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024): they push every singular
# value above ~1e-3 of the largest into [0.7, 1.2] in five steps.
_QUINTIC = (3.4445, -4.7750, 2.0315)


# Lanczos steps before the stopping rule may fire: a Krylov space of this dimension already
# separates the top of a clustered spectrum from a warm start's stale direction.
_MIN_STEPS = 4

# After that, the stopping rule is checked every this many steps. On an accelerator each
# check waits for the device (a host synchronization) and an extra step only makes the
# estimate closer; on the CPU a check costs nothing and an extra step costs its products.
_CHECK_EVERY = {"cpu": 1, "accelerator": 2}

# On CUDA the Lanczos steps replay as captured graphs of this many steps.
_GRAPH_STEPS = _CHECK_EVERY["accelerator"]

# Below this many rows or columns the spectral norm is computed exactly.
_EXACT_BELOW = 96


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def spectral_norm(
    w: Tensor, v0: Tensor | None = None, tol: float = 1e-5, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Largest singular value ``σ₁(w)`` of one matrix and its right singular vector; see
    `spectral_norms` (this is the batch of one)."""
    sigma, v = spectral_norms(w[None], None if v0 is None else v0[None], tol, max_iter)
    return sigma[0], v[0]


@torch.no_grad()
def spectral_norms(
    w: Tensor, v0: Tensor | None = None, tol: float = 1e-5, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Largest singular values ``σ₁`` of a batch of matrices ``(B, m, n)`` by Golub–Kahan–
    Lanczos, with their right singular vectors ``(B, n)``.

    Lanczos converges in tens of steps on the clustered top spectra of random matrices, where
    plain power iteration needs hundreds. ``v0`` warm-starts it (pass the vectors returned by
    the previous call): on slowly changing matrices such as an optimizer's updates it stops
    after a few steps. The whole batch moves in lockstep until every estimate changes by less
    than ``tol`` (relative) between checks of that rule: the first after ``_MIN_STEPS``
    steps, then every step on the CPU and every second step on an accelerator, where each
    check is a host synchronization; the result is the one a check after every step gives.
    On CUDA the steps replay as captured CUDA graphs. Matrices with a side of at most 96 get
    the exact value.

    Like any single-vector Krylov method it can stop at ``σ₂`` when the start has almost no
    component along the top singular vector and ``σ₂`` is close to ``σ₁``: from a cold start,
    2 of 300 Gaussian matrices of sides 97–160, under-estimated by less than their gap
    ``σ₁ − σ₂`` (`tests/test_linalg.py`). A warm start from an optimizer's previous update
    carries that component.
    """
    return spectral_norms_batches([w], [v0], tol, max_iter)[0]


@torch.no_grad()
def spectral_norms_batches(
    batches: Sequence[Tensor],
    warm: Sequence[Tensor | None],
    tol: float = 1e-5,
    max_iter: int = 100,
) -> list[tuple[Tensor, Tensor]]:
    """`spectral_norms` of several batches of matrices (of different shapes), run side by
    side: each check of the stopping rule copies every batch's new Lanczos coefficients to
    the host at once, so a network's norms cost one synchronization per check, not one per
    shape."""
    if len(warm) != len(batches):
        raise ValueError(f"got {len(batches)} batches but {len(warm)} warm starts")
    runs = [
        _exact_small(w) if min(w.shape[1:]) <= _EXACT_BELOW else _lanczos(w, v0, tol, max_iter)
        for w, v0 in zip(batches, warm, strict=True)
    ]
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(runs)
    requests: dict[int, Tensor] = {}

    def advance(i: int, reply: np.ndarray | None) -> None:
        try:
            requests[i] = runs[i].send(reply)  # type: ignore[arg-type]
        except StopIteration as stop:
            results[i] = stop.value

    with _full_precision(*(w.device for w in batches)):
        for i in range(len(runs)):
            advance(i, None)
        while requests:
            asked = list(requests.items())
            requests.clear()
            for (i, _), reply in zip(asked, _to_host([t for _, t in asked]), strict=True):
                advance(i, reply)
    return cast(list[tuple[Tensor, Tensor]], results)


@contextlib.contextmanager
def _full_precision(*devices: torch.device) -> Iterator[None]:
    """Autocast off on these devices: an ``optimizer.step()`` inside an autocast region
    would otherwise run the norms' and dual maps' matmuls in bfloat16 (normalize off by
    ~2e-3, dualize by ~3e-2)."""
    kinds = {d.type for d in devices}
    on = sorted(
        k for k in kinds if torch.amp.is_autocast_available(k) and torch.is_autocast_enabled(k)
    )
    if not on:  # the common case: nothing to turn off, no context to pay for
        yield
        return
    with contextlib.ExitStack() as stack:
        for kind in on:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


# A run of one batch yields the device tensors its host side needs, receives them as float64
# arrays, and returns (σ₁, right singular vectors).
_Run = Generator[Tensor, np.ndarray, tuple[Tensor, Tensor]]


def _to_host(tensors: list[Tensor]) -> list[np.ndarray]:
    """Float64 host copies of ``tensors``, with one synchronization for all of them."""
    if len(tensors) == 1:
        return [tensors[0].cpu().double().numpy()]
    flat = torch.cat([t.to(torch.float64).reshape(-1) for t in tensors]).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def _lanczos(w: Tensor, v0: Tensor | None, tol: float, max_iter: int) -> _Run:
    dtype = _compute_dtype(w)
    batch, m, n = w.shape
    gen = torch.Generator(device="cpu").manual_seed(n * 7919 + m)
    noise = torch.randn(batch, n, generator=gen, dtype=dtype).to(w.device)
    noise = noise / noise.norm(dim=1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    if v0 is None or v0.shape != (batch, n) or not bool(torch.isfinite(v0).all()):
        v = noise
    else:
        # A warm start alone can sit on a singular vector that is no longer the top one; its
        # Krylov space is then nearly invariant and the iteration stalls on the wrong value.
        # A fixed random component keeps every direction in play.
        v0 = v0.to(device=w.device, dtype=dtype)
        v = v0 / v0.norm(dim=1, keepdim=True).clamp_min(tiny) + 0.5 * noise
    k_max = min(max_iter, m, n)
    ws = _workspace(batch, m, n, k_max, dtype, w.device)
    try:
        ws.load(w)
        ws.vs[:, 0] = v / v.norm(dim=1, keepdim=True)
        alphas: list[np.ndarray] = []  # the bidiagonal's entries, on the host
        betas: list[np.ndarray] = []
        est = np.zeros(batch)
        # A shape's workspace remembers how many steps its last call needed: on CUDA, where
        # steps are replayed graphs and checks are synchronizations, the first check waits
        # for that many, so a call like the last one synchronizes once.
        every = _CHECK_EVERY["cpu" if w.device.type == "cpu" else "accelerator"]
        first = min(-(-max(_MIN_STEPS, ws.needed) // every) * every, k_max)
        steps = 0
        while steps < k_max:
            end = min(first if steps < first else steps + every, k_max)
            ws.run(steps, end)
            for alpha, beta in (yield ws.ab[steps:end]):  # a check: the host needs (α, β)
                alphas.append(alpha)
                betas.append(beta)
            if steps == 0 and end > 1:  # the first check compares with the step before
                est = _top_singular(alphas[:-1], betas)[0]
            steps = end
            new_est = _top_singular(alphas, betas)[0]
            done = _converged(new_est, est, betas[-1], tol)
            est = new_est
            if done:
                break
        # The result is the one a check after every step gives, whatever the schedule took:
        # the extra steps of a coarser one must not change it, or a run resumed from a
        # checkpoint (a fresh workspace, no memory) would not continue exactly.
        if every > 1 or first > _MIN_STEPS:
            steps = _steps_needed(alphas, betas, tol)
        sigma, right = _top_singular(alphas[:steps], betas)
        if ws.graphs is not None:
            ws.needed = steps
        # The Ritz vectors lifted back: the next call's warm starts.
        coef = torch.as_tensor(right, dtype=dtype).to(w.device)
        v_top = torch.bmm(coef[:, None], ws.vs[:, :steps])[:, 0]
    finally:
        ws.release()
    v_top = v_top / v_top.norm(dim=1, keepdim=True).clamp_min(tiny)
    return torch.as_tensor(sigma, dtype=dtype).to(w.device), v_top


def _steps_needed(alphas: list[np.ndarray], betas: list[np.ndarray], tol: float) -> int:
    """The steps after which a check at every step would have stopped this run: the first
    ``k ≥ _MIN_STEPS`` whose estimate moved by at most ``tol`` from step ``k − 1``'s for every
    matrix of the batch (or all the steps taken)."""
    est = _top_singular(alphas[: _MIN_STEPS - 1], betas)[0] if len(alphas) >= _MIN_STEPS else 0
    for k in range(_MIN_STEPS, len(alphas) + 1):
        new = _top_singular(alphas[:k], betas)[0]
        if _converged(new, est, betas[k - 1], tol):
            return k
        est = new
    return len(alphas)


def _converged(est: np.ndarray, previous: np.ndarray | int, beta: np.ndarray, tol: float) -> bool:
    """The stopping rule, for every matrix of a batch: the estimate moved by at most ``tol``
    (relative) since the ``previous`` one, or the Krylov space is (nearly) invariant."""
    return bool(((np.abs(est - previous) <= tol * est) | (beta <= tol * est)).all())


def _exact_small(w: Tensor) -> _Run:
    """Exact ``σ₁`` and right singular vectors of matrices with a short side ``s ≤ 96``, from
    the eigenvalues of the ``s × s`` Gram matrix. The eigenproblem is solved in float64 on
    the host: on a GPU that copy beats the device's own SVD or eigensolver by 4–6×, and on
    the CPU it is 5× faster than an SVD (benchmarks/normalize_profile.py)."""
    a = w.to(_compute_dtype(w))
    wide = a.shape[1] <= a.shape[2]
    short = a if wide else a.mT
    # torch's eigensolver, not numpy's: numpy's BLAS threads spin against torch's and can
    # make a 32 × 32 problem take milliseconds on a busy machine
    evals, evecs = torch.linalg.eigh(torch.from_numpy((yield short @ short.mT)))  # ascending
    sigma = evals[:, -1].clamp_min(0).sqrt().to(a.dtype)
    top = evecs[:, :, -1].to(a.dtype).to(a.device)
    if wide:  # top is a left singular vector u: the right one is Aᵀu / σ
        top = torch.bmm(a.mT, top[..., None])[..., 0]
        top = top / top.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return sigma.to(a.device), top


class _Workspace:
    """The buffers of a Lanczos run: the matrices ``a``, the Lanczos vectors as rows ``us``
    and ``vs`` (kept for full reorthogonalization), and every step's ``(α, β)`` in ``ab``.

    On CUDA one workspace per shape lives on and its steps are captured as CUDA graphs, two
    steps each: there the iteration is bound by kernel launches (about 20 small kernels a
    step, each costing more host time than device time), and a graph replays them at the
    cost of one. It keeps a copy of the matrices (the size of the update) between calls.
    """

    def __init__(
        self,
        batch: int,
        m: int,
        n: int,
        k_max: int,
        dtype: torch.dtype,
        device: torch.device,
        graphs: bool,
    ) -> None:
        self.graphs: dict[tuple[int, int], Callable[[], None]] | None = {} if graphs else None
        # Captured kernels read their inputs from fixed addresses: only then is `a` a buffer.
        self.a = torch.empty((batch, m, n) if graphs else 0, dtype=dtype, device=device)
        self.us = torch.empty(batch, k_max, m, dtype=dtype, device=device)
        self.vs = torch.empty(batch, k_max + 1, n, dtype=dtype, device=device)
        self.ab = torch.empty(k_max, 2, batch, dtype=dtype, device=device)
        self.tiny = torch.finfo(dtype).tiny
        self.lock = threading.Lock()
        self.needed = 0  # Lanczos steps the last run needed (cached workspaces only)
        self.pool: Any = None  # the memory pool of its CUDA graphs

    def load(self, w: Tensor) -> None:
        if self.graphs is not None:
            self.a.copy_(w)
        else:
            self.a = w.to(self.a.dtype)

    def release(self) -> None:
        if self.lock.locked():
            self.lock.release()

    def run(self, start: int, end: int) -> None:
        """Lanczos steps ``start … end − 1``: device work only, no host synchronization.
        Captured, they replay as graphs of ``_GRAPH_STEPS`` steps from multiples of it: a
        graph per run of steps would be captured anew whenever a call's schedule differs
        (each capture costs milliseconds and memory of its own)."""
        if self.graphs is None:
            self._steps(start, end)
            return
        lo = start
        while lo < end:
            hi = min(lo - lo % _GRAPH_STEPS + _GRAPH_STEPS, end)
            replay = None if self.graphs is None else self.graphs.get((lo, hi))
            if replay is not None:
                replay()
            elif self.graphs is None:  # a capture failed: the rest runs eagerly
                self._steps(lo, hi)
            else:
                try:
                    self.graphs[(lo, hi)] = _capture(self, functools.partial(self._steps, lo, hi))
                except _CaptureError as err:  # the steps ran; only their capture failed
                    msg = f"Lanczos runs without CUDA graphs: {err}"
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
                    self.graphs = None
            lo = hi

    def _steps(self, start: int, end: int) -> None:
        a, us, vs, ab, tiny = self.a, self.us, self.vs, self.ab, self.tiny
        for k in range(start, end):
            if k > 0:  # the previous step left vs[:, k] unnormalized, so steps end on a write
                vs[:, k] /= ab[k - 1, 1].clamp_min(tiny)[:, None]
            u = torch.bmm(a, vs[:, k, :, None])  # (B, m, 1)
            if k > 0:
                u.sub_(ab[k - 1, 1, :, None, None] * us[:, k - 1, :, None])
                basis = us[:, :k]
                u = torch.baddbmm(u, basis.mT, torch.bmm(basis, u), alpha=-1)
            ab[k, 0] = torch.linalg.vector_norm(u, dim=(1, 2))
            us[:, k] = u[..., 0] / ab[k, 0].clamp_min(tiny)[:, None]
            r = torch.bmm(a.mT, us[:, k, :, None])
            r.sub_(ab[k, 0, :, None, None] * vs[:, k, :, None])
            basis = vs[:, : k + 1]
            r = torch.baddbmm(r, basis.mT, torch.bmm(basis, r), alpha=-1)
            ab[k, 1] = torch.linalg.vector_norm(r, dim=(1, 2))
            vs[:, k + 1] = r[..., 0]


class _CaptureError(RuntimeError):
    """A CUDA graph capture failed (after the steps themselves ran)."""


def _capture(ws: _Workspace, steps: Callable[[], None]) -> Callable[[], None]:
    """Run ``steps`` once and capture them as a CUDA graph; returns its replay. The run goes
    on a side stream, which also warms cuBLAS up as capture requires; capture itself records
    the kernels without running them, so a capture that fails (`_CaptureError`) leaves the
    steps run exactly once."""
    device = ws.a.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        steps()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if ws.pool is None:
        ws.pool = torch.cuda.graph_pool_handle()
    try:
        # One memory pool for a shape's graphs: they replay one after another on one stream
        # and write only into the workspace, so their temporaries may share addresses.
        with torch.cuda.graph(graph, pool=ws.pool, capture_error_mode="thread_local"):
            steps()
    except RuntimeError as err:
        raise _CaptureError(str(err)) from err
    return graph.replay


# CUDA workspaces by (batch, m, n, k_max, dtype, device), least recently used first: a
# network has a few matrix shapes, and a process that trains many networks (a sweep) should
# not keep every one's.
_WORKSPACES: collections.OrderedDict[tuple[object, ...], _Workspace] = collections.OrderedDict()
_WORKSPACES_LOCK = threading.Lock()
_MAX_WORKSPACES = 16


def _graphs_on(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("MODNORM_CUDA_GRAPHS", "1") != "0"


def _workspace(
    batch: int, m: int, n: int, k_max: int, dtype: torch.dtype, device: torch.device
) -> _Workspace:
    """The shape's cached workspace, locked for the caller; a fresh one (no graphs, memory
    given back) off CUDA, or while the cached one is in use by another run."""
    if _graphs_on(device):
        key = (batch, m, n, k_max, dtype, device)
        with _WORKSPACES_LOCK:
            if key not in _WORKSPACES:
                _WORKSPACES[key] = _Workspace(batch, m, n, k_max, dtype, device, graphs=True)
                for old in list(_WORKSPACES)[: max(0, len(_WORKSPACES) - _MAX_WORKSPACES)]:
                    if not _WORKSPACES[old].lock.locked():  # one in use stays till next time
                        del _WORKSPACES[old]
            _WORKSPACES.move_to_end(key)
            ws = _WORKSPACES[key]
            if ws.lock.acquire(blocking=False):
                return ws
    return _Workspace(batch, m, n, k_max, dtype, device, graphs=False)


def _top_singular(
    alphas: list[np.ndarray], betas: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Top singular values ``(B,)`` and right singular vectors ``(B, k)`` of the batch of
    upper-bidiagonal matrices with diagonals ``alphas`` and superdiagonals ``betas``
    (a few numbers each: numpy on the host)."""
    k = len(alphas)
    diag = np.stack(alphas, axis=1)  # (B, k)
    b = np.zeros((diag.shape[0], k, k))
    idx = np.arange(k)
    b[:, idx, idx] = diag
    if k > 1:
        b[:, idx[:-1], idx[1:]] = np.stack(betas[: k - 1], axis=1)
    # torch's SVD on the host, not numpy's: numpy's BLAS threads spin against torch's
    _, s, vh = torch.linalg.svd(torch.from_numpy(b))
    return s[:, 0].numpy(), vh[:, 0].numpy()


PRECISIONS = ("full", "mixed")


@functools.cache
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: CUDA with bfloat16 support,
    or a CPU with AMX tiles that oneDNN may use. Elsewhere bfloat16 matmuls are emulated:
    1.5× to 200× slower than float32 on this machine's CPU held to older instruction sets
    (`ONEDNN_MAX_CPU_ISA`; docs/notes.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return (isa == "ALL" or "AMX" in isa) and bool(amx())
    return False


@torch.no_grad()
def orthogonalize(
    g: Tensor,
    method: str = "newton_schulz",
    steps: int = 5,
    polish: int = 4,
    rtol: float = 1e-3,
    precision: str = "full",
) -> Tensor:
    """The polar factor ``U Vᵀ`` of ``g = U Σ Vᵀ`` (batched over leading dims): the dual map
    of the spectral norm.

    ``newton_schulz`` (default, matmuls only): ``steps`` quintic steps with Muon's coefficients
    bring singular values above about ``1e-3·σ₁`` into [0.7, 1.2]; ``polish`` cubic steps
    ``x ↦ 1.5x − 0.5x³`` then pull them to 1 to ~1e-6, so the result has spectral norm 1 and
    ``⟨g, UVᵀ⟩`` is the nuclear norm. Singular values far below ``σ₁`` (rounding noise) stay
    small instead of becoming full-size directions: the iteration is a soft threshold.
    ``svd`` is exact and treats singular values below ``rtol·σ₁`` as zero, for the same reason.
    A zero matrix maps to zero.

    ``precision`` (Newton–Schulz only): ``"full"`` runs in float32 (float64 for float64
    input). ``"mixed"`` runs every step but the last in bfloat16, as Muon does: 3–4× faster
    where bfloat16 matmuls are native (CUDA, CPUs with AMX; elsewhere emulated and far
    slower), with the same spectral norm and ``⟨g, UVᵀ⟩`` within 1e-4 on full-rank input. But
    bfloat16 rounding (~4e-3) lies above the soft threshold, so a low-rank ``g`` gains
    full-size spurious directions (a rank-1 512 × 512 matrix: about 250 singular values
    above 0.05 besides its one).
    """
    if method not in ("newton_schulz", "svd"):
        raise ValueError(
            f"unknown orthogonalization method {method!r}: use 'newton_schulz' or 'svd'"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    with _full_precision(g.device):
        return _orthogonalize(g, method, steps, polish, rtol, precision)


def _orthogonalize(
    g: Tensor, method: str, steps: int, polish: int, rtol: float, precision: str
) -> Tensor:
    dtype = _compute_dtype(g)
    x = g.to(dtype)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:  # work on the wide side: X Xᵀ is the smaller Gram matrix
        x = x.mT
    if method == "svd":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        top = s[..., :1]
        keep = ((s > rtol * top) & (top > 0)).to(dtype)
        out = (u * keep.unsqueeze(-2)) @ vh
    else:
        out = _newton_schulz(x, steps, polish, precision)
    if transpose:
        out = out.mT
    return out.to(g.dtype)


def _newton_schulz(
    x: Tensor,
    steps: int = 5,
    polish: int = 4,
    precision: str = "full",
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The polar factor of ``x`` (batched over leading dims; float32 or float64) by the
    iteration of `orthogonalize`, with the Gram matrix ``x xᵀ`` taken over the last dim.

    ``reduce`` is for a matrix whose columns are split across ranks (each holds some of the
    columns of ``x``): it sums a tensor over the ranks (an all-reduce). ``x xᵀ`` and
    ``‖x‖_F²`` are then sums of every rank's part, and the rest of each step is local, so
    every rank ends with its own columns of the polar factor of the whole matrix.
    """
    dtype = x.dtype
    # Frobenius ≥ spectral: every singular value starts in [0, 1]; zero stays zero.
    if reduce is None:
        scale = x.norm(dim=(-2, -1), keepdim=True)
    else:
        scale = reduce(x.square().sum(dim=(-2, -1), keepdim=True)).sqrt()
    scale = scale.clamp_min(torch.finfo(dtype).tiny)
    if precision == "mixed" and not native_bfloat16(x.device):
        warnings.warn(
            f"precision='mixed' on {x.device}, where bfloat16 matmuls are emulated: "
            "slower than precision='full' (see modnorm.linalg.native_bfloat16)",
            RuntimeWarning,
            stacklevel=4,
        )
    low = torch.bfloat16 if precision == "mixed" else dtype

    def gram(y: Tensor) -> Tensor:
        g = y @ y.mT
        return g if reduce is None else reduce(g.to(dtype)).to(y.dtype)  # summed in full

    # contiguous: a transposed view (a tall matrix, or a split one's columns) would keep its
    # strides through every step's elementwise ops, and the matmuls would run on them (the
    # rank owning a GPT's tall MLP matrices was the slower one: benchmarks/dual_split.py)
    x = (x.contiguous() / scale).to(low)
    a, b, c = _QUINTIC
    for _ in range(steps):
        g = gram(x)
        x = a * x + (b * g + c * g @ g) @ x
    # The quintic overshoots up to ~1.2; the cubic step's fixed point at 1 is stable only
    # below √3 and it maps (1, √3) back under 1, so polishing converges from there
    # (errors 0.3 → 0.12 → 0.02 → 7e-4 → 1e-6): bfloat16's 4e-3 only matters in the last.
    for i in range(polish):
        if i == polish - 1:
            x = x.to(dtype)
        x = 1.5 * x - 0.5 * gram(x) @ x
    return x.to(dtype)

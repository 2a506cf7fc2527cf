"""Hypergradient benchmark, the measurements: raw ``torch.func`` and plain-loop baselines, the
configurations of ``bilevel`` estimators (:func:`build`), time / memory in fresh processes,
the equal-accuracy search, and the :class:`Runner` that caches them.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import bilevel as bl
from bilevel._warnings import forward_ad_ready

from .._timing import MB, median, one_thread, peak_rss, run_isolated, saved_bytes
from .problem import ITERS, LR, N_TRAIN, N_VAL, SEED, STEPS, Bench, Fn, load_data, reference_hypergradient


# --------------------------------------------------------------------------- raw baselines
def gd_map(b: Bench, lam: Tensor, T: int, lr: float) -> Tensor:
    """T GD steps from W0 written with torch.func.grad (differentiable in λ if λ requires grad)."""
    gfun = torch.func.grad(b.lower, argnums=1)
    W = b.W0
    for _ in range(T):
        W = W - lr * gfun(lam, W)
    return W


def raw_reverse(b: Bench, T: int = STEPS, lr: float = LR) -> Tensor:
    """Unrolled reverse mode: torch.func.grad steps with λ requiring grad, then autograd.grad."""
    lam = b.lam.detach().requires_grad_(True)
    W = gd_map(b, lam, T, lr)
    return torch.autograd.grad(b.upper(lam, W), lam)[0]


def raw_implicit(b: Bench, T: int = STEPS, lr: float = LR, iters: int = ITERS, solver: str = "cg") -> Tensor:
    """GD to W_T, then the IFT with HVPs = a cached torch.func.vjp of the gradient map.

    solver: ``cg`` (30 CG iterations, no early stop), ``neumann`` (v = α Σ_{q≤Q} (I−αH)^q b) or
    ``fixedpoint`` (v ← v − α(Hv − b) from v = 0), α = lr.
    """
    lam = b.lam
    with torch.no_grad():
        W = gd_map(b, lam, T, lr)
    gfun = torch.func.grad(b.lower, argnums=1)
    f_lam, f_W = torch.func.grad(b.upper, argnums=(0, 1))(lam, W)
    _, pull = torch.func.vjp(lambda w: gfun(lam, w), W)
    if solver == "cg":
        v = torch.zeros_like(f_W)
        r, p = f_W, f_W
        rs = (r * r).sum()
        for _ in range(iters):
            Ap = pull(p)[0]
            a = rs / (p * Ap).sum()
            v, r = v + a * p, r - a * Ap
            rs_new = (r * r).sum()
            p, rs = r + (rs_new / rs) * p, rs_new
    elif solver in ("neumann", "fixedpoint"):
        v = lr * f_W if solver == "neumann" else torch.zeros_like(f_W)
        for _ in range(iters):
            v = v - lr * (pull(v)[0] - f_W)
    else:
        raise ValueError(solver)
    _, cross = torch.func.vjp(lambda lm: gfun(lm, W), lam)
    return f_lam - cross(v)[0]


def plain_reverse(b: Bench, T: int = STEPS, lr: float = LR) -> Tensor:
    """The plain PyTorch loop: autograd.grad(create_graph=True) per step, then autograd.grad."""
    lam = b.lam.detach().requires_grad_(True)
    W = b.W0.detach().requires_grad_(True)
    for _ in range(T):
        (gW,) = torch.autograd.grad(b.lower(lam, W), W, create_graph=True)
        W = W - lr * gW
    return torch.autograd.grad(b.upper(lam, W), lam)[0]


def plain_cg(b: Bench, T: int = STEPS, lr: float = LR, iters: int = ITERS) -> Tensor:
    """The plain PyTorch loop for AID-CG: GD with autograd.grad, the gradient at W_T with its graph
    kept, HVPs by autograd.grad(retain_graph=True), 30 CG iterations, then the cross term."""
    lam = b.lam.detach().requires_grad_(True)
    W = b.W0
    for _ in range(T):
        W = W.detach().requires_grad_(True)
        (gW,) = torch.autograd.grad(b.lower(lam.detach(), W), W)
        W = W.detach() - lr * gW
    W = W.detach().requires_grad_(True)
    (f_W,) = torch.autograd.grad(b.upper(lam, W), W)
    (gW,) = torch.autograd.grad(b.lower(lam, W), W, create_graph=True)
    v, r, p = torch.zeros_like(f_W), f_W, f_W
    rs = (r * r).sum()
    for _ in range(iters):
        (Ap,) = torch.autograd.grad(gW, W, p, retain_graph=True)
        a = rs / (p * Ap).sum()
        v, r = v + a * p, r - a * Ap
        rs_new = (r * r).sum()
        p, rs = r + (rs_new / rs) * p, rs_new
    (cross,) = torch.autograd.grad(gW, lam, v)
    return -cross  # f does not depend on λ


# ---------------------------------------------------------------------------- configurations
def _dynamics(spec: dict[str, Any]) -> bl.inner.Dynamics:
    name, lr, T = spec.get("dyn", "gd"), spec.get("lr", LR), spec.get("T", STEPS)
    if name == "gd":
        return bl.inner.GD(lr=lr, steps=T)
    if name == "nesterov":
        return bl.inner.Nesterov(lr=lr, steps=T, momentum=spec.get("momentum"))
    if name == "momentum":
        return bl.inner.Momentum(lr=lr, steps=T, momentum=spec.get("momentum", 0.9))
    raise ValueError(f"unknown dynamics {name!r}")


def build(spec: dict[str, Any], b: Bench) -> Fn:
    """A zero-argument callable computing the hypergradient for one configuration ``spec``.

    spec keys: impl (plain | raw | ours), method (reverse | checkpoint | cg | neumann | fixedpoint |
    forward | firstorder), dyn, lr, momentum, T, K (linear-solve iterations), tol (CG, ours).
    """
    impl, method = spec["impl"], spec["method"]
    T, lr, K = spec.get("T", STEPS), spec.get("lr", LR), spec.get("K", ITERS)
    if impl == "plain":
        if method == "reverse":
            return lambda: plain_reverse(b, T, lr)
        if method == "cg":
            return lambda: plain_cg(b, T, lr, K)
    elif impl == "raw":
        if method == "reverse":
            return lambda: raw_reverse(b, T, lr)
        if method in ("cg", "neumann", "fixedpoint"):
            return lambda: raw_implicit(b, T, lr, K, method)
    elif impl == "ours":
        inner = _dynamics(spec)
        est: bl.hypergrad.Estimator
        if method == "reverse":
            est = bl.hypergrad.Reverse(inner)
        elif method == "checkpoint":
            est = bl.hypergrad.Reverse(inner, checkpoint=True)
        elif method == "forward":
            est = bl.hypergrad.Forward(inner)
        elif method == "firstorder":
            est = bl.hypergrad.FirstOrder(inner)
        elif method == "cg":
            est = bl.hypergrad.CG(inner, iters=K, tol=spec.get("tol", 0.0))
        elif method == "neumann":
            est = bl.hypergrad.Neumann(inner, iters=K, alpha=lr)
        elif method == "fixedpoint":
            est = bl.hypergrad.FixedPoint(inner, iters=K, alpha=lr)
        else:
            raise ValueError(f"unknown method {method!r}")
        problem = b.problem()
        return lambda: est(problem, b.lam, b.W0).grad
    raise ValueError(f"unknown configuration {spec}")


def rel_error(g: Tensor, ref: Tensor) -> float:
    return float((g.double() - ref).norm() / ref.norm())


class _Child:
    """State of a measuring process: the data blob and one Bench per (variant, layout)."""

    def __init__(self, path: str):
        one_thread()
        torch.manual_seed(0)
        self.blob = torch.load(path, weights_only=True)
        self._benches: dict[tuple[str, str], Bench] = {}

    def bench(self, spec: dict[str, Any]) -> Bench:
        key = (spec.get("variant", "full"), spec.get("layout", "classes_first"))
        if key not in self._benches:
            b = Bench.make(self.blob["data"], key[0], torch.float32, key[1])
            _prime(b)
            self._benches[key] = b
        return self._benches[key]

    def fn(self, spec: dict[str, Any]) -> Fn:
        return build(spec, self.bench(spec))

    def error(self, spec: dict[str, Any], g: Tensor) -> float | None:
        ref = self.blob.get("ref_" + spec.get("variant", "full"))
        return None if ref is None else rel_error(g, ref)


def _prime(b: Bench) -> None:
    """One gradient, HVP and JVP so lazy initialisation (kernels, buffers) is not measured."""
    lam = b.lam.detach().requires_grad_(True)
    W = b.W0.detach().requires_grad_(True)
    with torch.enable_grad():
        (gW,) = torch.autograd.grad(b.lower(lam, W), W, create_graph=True)
        torch.autograd.grad(gW, (lam, W), torch.ones_like(gW))
    gfun = torch.func.grad(b.lower, argnums=1)
    forward_ad_ready()
    torch.func.jvp(lambda w: gfun(b.lam, w), (b.W0,), (b.W0,))


_CHILDREN: dict[str, _Child] = {}


def _child(path: str) -> _Child:
    """The measuring state for a data file (reused when measuring in-process)."""
    if path not in _CHILDREN:
        _CHILDREN.clear()
        _CHILDREN[path] = _Child(path)
    return _CHILDREN[path]


def measure_memory(payload: dict[str, Any]) -> dict[str, Any]:
    """Child entry (fresh process): peak RSS of the first call of one configuration above the
    post-setup level, then the peak size of the autograd graph in a second call, and the error."""
    child = _child(payload["data"])
    spec = payload["spec"]
    fn = child.fn(spec)
    t0 = time.perf_counter()
    g, peak, method = peak_rss(fn, collect=payload.get("collect", True))
    first = time.perf_counter() - t0
    _, nbytes = saved_bytes(fn) if payload.get("saved", True) else (None, None)
    return {
        "peak_mb": peak / MB, "mem_method": method, "first_s": first,
        "saved_mb": None if nbytes is None else nbytes / MB, "rel_error": child.error(spec, g),
    }


def measure_time(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Child entry: wall time of several configurations, interleaved round by round (so load from
    other processes hits them alike); one warm-up call each, then ``reps`` timed rounds."""
    child = _child(payload["data"])
    specs = payload["specs"]
    reps = int(payload.get("reps", 5))
    fns = [child.fn(s) for s in specs]
    errors = [child.error(s, fn()) for s, fn in zip(specs, fns)]  # warm-up
    wall: list[list[float]] = [[] for _ in specs]
    cpu: list[list[float]] = [[] for _ in specs]
    gc.collect()
    gc.disable()  # as timeit does: tensors are freed by reference counting anyway
    try:
        for _ in range(reps):
            for i, fn in enumerate(fns):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    finally:
        gc.enable()
    return [
        {"time_s": median(w), "min_s": min(w), "cpu_s": median(c), "times": w, "rel_error": e}
        for w, c, e in zip(wall, cpu, errors)
    ]


# ------------------------------------------------------------------ equal-accuracy search
def implicit_landscape(
    b: Bench, ref: Tensor, dyn: bl.inner.Dynamics, Ts: list[int], kmax: int, stop_at: float = 0.0
) -> dict[int, list[float]]:
    """Relative error of the AID-CG hypergradient at y_T for every T in ``Ts`` and every number of
    CG iterations 0..K (one run of the dynamics; untimed, used to choose settings). CG stops after
    ``kmax`` iterations, once the error is ≤ ``stop_at``, or when it stalls (no 1% gain in 10).
    Here f does not depend on λ, so the hypergradient is −∇²_{λW} g · v."""
    gfun = torch.func.grad(b.lower, argnums=1)
    lam, out = b.lam, {}
    state = dyn.init((b.W0,))
    done = 0
    with torch.no_grad():
        for T in sorted(Ts):
            for k in range(done, T):
                state = dyn.update(state, (gfun(lam, dyn.point(state)[0]),), k)
            done = T
            W = dyn.output(state)[0]
            f_W = torch.func.grad(b.upper, argnums=1)(lam, W)
            _, pull = torch.func.vjp(lambda w, W=W: gfun(lam, w), W)
            _, cross = torch.func.vjp(lambda lm, W=W: gfun(lm, W), lam)
            v, r, p = torch.zeros_like(f_W), f_W, f_W
            rs = (r * r).sum()
            errs = [rel_error(-cross(v)[0], ref)]
            for k in range(kmax):
                if errs[-1] <= stop_at or (k >= 20 and errs[-1] > 0.99 * errs[-11]):
                    break
                Ap = pull(p)[0]
                a = rs / (p * Ap).sum()
                v, r = v + a * p, r - a * Ap
                rs_new = (r * r).sum()
                p, rs = r + (rs_new / rs) * p, rs_new
                errs.append(rel_error(-cross(v)[0], ref))
            out[T] = errs
    return out


def first_k(errs: list[float], thr: float) -> int | None:
    """Smallest number of CG iterations whose error is ≤ thr (None if never)."""
    return next((k for k, e in enumerate(errs) if e <= thr), None)


def power_L(b: Bench, iters: int = 50) -> float:
    """Largest Hessian eigenvalue of g at W0 by power iteration (for the momentum parameters)."""
    gfun = torch.func.grad(b.lower, argnums=1)
    _, pull = torch.func.vjp(lambda w: gfun(b.lam, w), b.W0)
    v = torch.randn(b.W0.shape, generator=torch.Generator().manual_seed(3), dtype=b.W0.dtype)
    lam_max = 0.0
    for _ in range(iters):
        v = pull(v / v.norm())[0]
        lam_max = float(v.norm())
    return lam_max


# ------------------------------------------------------------------------------------ driver
@dataclass
class Settings:
    """Sizes and grids; ``quick`` shrinks everything for the smoke test."""

    n_train: int = N_TRAIN
    n_val: int = N_VAL
    steps: int = STEPS
    iters: int = ITERS
    reps: int = 7
    thresholds: tuple[float, ...] = (1e-2, 1e-3)
    unroll_grid: tuple[int, ...] = (100, 150, 200, 300, 400, 600, 800, 1200, 1600, 2400)
    gd_Ts: tuple[int, ...] = tuple(range(100, 1201, 20))
    fast_Ts: tuple[int, ...] = tuple(range(10, 201, 5))
    kmax: int = 80
    default_T: int = 100
    default_K: int = 50
    memory_Ts: tuple[int, ...] = (10, 100, 1000)
    candidates: int = 2
    isolate: bool = True

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            n_train=100, n_val=100, steps=10, iters=5, reps=1, thresholds=(0.3, 0.1),
            unroll_grid=(10, 20, 40), gd_Ts=(10, 20, 40), fast_Ts=(5, 10, 20), kmax=15, default_T=20,
            default_K=15, memory_Ts=(5, 10), candidates=1, isolate=False,
        )


class Runner:
    """Holds the data file (data + float64 references) and runs measurements, isolated or not."""

    def __init__(self, settings: Settings, source: str, workdir: str, log: Callable[[str], None]):
        self.s, self.log = settings, log
        self.data = load_data(settings.n_train, settings.n_val, SEED, source)
        self.refs: dict[str, Tensor] = {}
        self.ref_info: dict[str, dict] = {}
        for variant in ("full", "perclass", "scalar"):
            t0 = time.perf_counter()
            self.refs[variant], self.ref_info[variant] = reference_hypergradient(
                Bench.make(self.data, variant, torch.float64)
            )
            self.ref_info[variant]["seconds"] = time.perf_counter() - t0
            log(f"reference ({variant}): {self.ref_info[variant]}")
        self.path = os.path.join(workdir, "hypergrad_bench.pt")
        torch.save({"data": self.data, **{f"ref_{k}": v for k, v in self.refs.items()}}, self.path)
        self.bench = Bench.make(self.data)  # float32, full variant, for the (untimed) searches

    def memory(self, spec: dict[str, Any]) -> dict[str, Any]:
        payload = {"data": self.path, "spec": spec, "collect": self.s.isolate}
        if self.s.isolate:
            return run_isolated("bilevel.bench.hypergrad.measure:measure_memory", payload)
        return measure_memory(payload)

    def times(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        payload = {"data": self.path, "specs": specs, "reps": self.s.reps}
        if self.s.isolate:
            return run_isolated("bilevel.bench.hypergrad.measure:measure_time", payload)
        return measure_time(payload)



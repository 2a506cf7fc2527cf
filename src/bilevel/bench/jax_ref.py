"""Plain jitted JAX implementations of the benchmark problems (optional; needs ``jax``, not torch).

Run by :mod:`bilevel.bench.jax_compare` in a separate interpreter (``--jax-python``, e.g. a venv
made with ``pip install jax jaxlib``), on the arrays it writes to an ``.npz`` file, so that every
ratio to JAX is measured in the same run on the same machine:

    python jax_ref.py DATA.npz TASK --reps 30        # prints one JSON line

Tasks (the same mathematics, float32, as the ``bilevel`` rows they are compared with):

* ``reverse`` / ``cg`` — the hypergradient benchmark (:mod:`bilevel.bench.hypergrad`): λ, W both
  784×10, g = CE(train; W) + ½ Σ exp(λ) W², f = CE(val; W), classes-first logits Wᵀ Xᵀ; T = 100 GD
  steps (lr 0.5) from W = 0; ``reverse`` differentiates the unrolled loop (``jax.grad`` through
  ``lax.fori_loop``), ``cg`` runs 30 CG iterations on H v = ∇_W f (HVPs by ``jax.jvp`` of
  ``jax.grad``, no early stop) and returns −∇²_{λW} g v.
* ``soba`` / ``stocbio`` / ``mrbo`` / ``bsa`` — one outer iteration of each stochastic solver on
  hyper-cleaning (784×10 linear classifier, one weight σ(x_i) per training sample, batch 64,
  10 inner SGD steps and 10 Neumann HVPs with a fresh batch each, as in
  :mod:`bilevel.solvers.stochastic`), the whole iteration one jitted function; batches are drawn
  inside it with ``jax.random``.

Times: median over ``--reps`` calls after two warm-up calls (``block_until_ready``), in ms;
``compile_s`` is the first call. Stochastic rows time the first ``--iters`` iterations from the
initial state (ms per iteration), as the ``bilevel`` rows do: the cost of an iteration depends on
the iterate (e.g. denormal numbers once sigmoid weights underflow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _setup():
    import os

    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    return jax, jnp


def _ce(jnp, jax, W, X, y):
    """Mean softmax cross-entropy, classes-first logits (10 × n)."""
    lt = W.T @ X.T
    return jnp.mean(jax.nn.logsumexp(lt, axis=0) - jnp.take_along_axis(lt, y[None], 0)[0])


def _ce_vec(jnp, jax, Z, A, lab):
    lt = Z.T @ A.T
    return jax.nn.logsumexp(lt, axis=0) - jnp.take_along_axis(lt, lab[None], 0)[0]


def hypergrad_tasks(d, jax, jnp):
    Xtr, ytr, Xva, yva = (jnp.asarray(d[k]) for k in ("Xtr", "ytr", "Xva", "yva"))
    lam = jnp.asarray(d["lam"])
    steps, lr, iters = int(d["steps"]), float(d["lr"]), int(d["iters"])

    def g(lam, W):
        return _ce(jnp, jax, W, Xtr, ytr) + 0.5 * jnp.sum(jnp.exp(lam) * W * W)

    def f(lam, W):
        return _ce(jnp, jax, W, Xva, yva)

    gW = jax.grad(g, argnums=1)
    W0 = jnp.zeros((Xtr.shape[1], 10), jnp.float32)

    def inner(lam):
        return jax.lax.fori_loop(0, steps, lambda k, W: W - lr * gW(lam, W), W0)

    @jax.jit
    def reverse(lam):
        return jax.grad(lambda lam: f(lam, inner(lam)))(lam)

    @jax.jit
    def cg(lam):
        W = inner(lam)
        b = jax.grad(f, argnums=1)(lam, W)

        def hvp(v):
            return jax.jvp(lambda w: gW(lam, w), (W,), (v,))[1]

        def body(k, c):
            x, r, p, rs = c
            Ap = hvp(p)
            a = rs / jnp.vdot(p, Ap)
            x, r = x + a * p, r - a * Ap
            rs2 = jnp.vdot(r, r)
            return x, r, r + (rs2 / rs) * p, rs2

        v = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(b), b, b, jnp.vdot(b, b)))[0]
        _, pull = jax.vjp(lambda lm: gW(lm, W), lam)
        return -pull(v)[0]

    return {"reverse": (reverse, (lam,)), "cg": (cg, (lam,))}


def stochastic_tasks(d, jax, jnp):
    A, lab, Av, labv = (jnp.asarray(d[k]) for k in ("A", "lab", "Av", "labv"))
    n, m, bs = A.shape[0], Av.shape[0], int(d["batch"])
    reg, T, Q, eta = float(d["reg"]), int(d["inner"]), int(d["Q"]), float(d["eta"])
    lr_y, lr_x = float(d["lr_y"]), float(d["lr_x"])

    def G(x, Z, i):
        return jnp.dot(jax.nn.sigmoid(x[i]), _ce_vec(jnp, jax, Z, A[i], lab[i])) / i.shape[0] \
            + reg * jnp.sum(Z * Z)

    def F(x, Z, j):
        return jnp.mean(_ce_vec(jnp, jax, Z, Av[j], labv[j]))

    gZ = jax.grad(G, argnums=1)

    def lower_idx(key):
        return jax.random.randint(key, (bs,), 0, n)

    def upper_idx(key):
        return jax.random.randint(key, (bs,), 0, m)

    def hvp(x, Z, i, v):
        return jax.jvp(lambda z: gZ(x, z, i), (Z,), (v,))[1]

    def cross(x, Z, i, v):
        return jax.vjp(lambda a: gZ(a, Z, i), x)[1](v)[0]

    def neumann_hg(x, Z, key):
        """stocBiO's estimator: η Σ_{q=0}^{Q} Π (I − η H_j) ∇_Z F, a fresh batch per HVP."""
        k1, k2, k3 = jax.random.split(key, 3)
        j = upper_idx(k1)
        gx, gy = jax.grad(F, argnums=(0, 1))(x, Z, j)
        keys = jax.random.split(k2, Q)

        def body(q, c):
            p, s = c
            p = p - eta * hvp(x, Z, lower_idx(keys[q]), p)
            return p, s + p

        _, s = jax.lax.fori_loop(0, Q, body, (gy, gy))
        return gx - cross(x, Z, lower_idx(k3), eta * s)

    def sgd_lower(x, Z, key, lr):
        keys = jax.random.split(key, T)
        return jax.lax.fori_loop(0, T, lambda t, z: z - lr * gZ(x, z, lower_idx(keys[t])), Z)

    @jax.jit
    def soba(state, key):
        x, Z, v = state
        k1, k2 = jax.random.split(key)
        i, j = lower_idx(k1), upper_idx(k2)
        gy, pull = jax.vjp(lambda a, z: gZ(a, z, i), x, Z)
        jv, hv = pull(v)
        gxF, gyF = jax.grad(F, argnums=(0, 1))(x, Z, j)
        return (x - lr_x * (gxF - jv), Z - lr_y * gy, v - lr_y * (hv - gyF))

    @jax.jit
    def stocbio(state, key):
        x, Z = state
        k1, k2 = jax.random.split(key)
        Z = sgd_lower(x, Z, k1, lr_y)
        return (x - lr_x * neumann_hg(x, Z, k2), Z)

    @jax.jit
    def bsa(state, key):
        """BSA (Ghadimi & Wang 2018): T SGD steps, then the randomly truncated Neumann estimate."""
        x, Z = state
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        Z = sgd_lower(x, Z, k1, lr_y)
        p = jax.random.randint(k2, (), 0, Q)
        gx, gy = jax.grad(F, argnums=(0, 1))(x, Z, upper_idx(k3))
        keys = jax.random.split(k4, Q)
        v = jax.lax.fori_loop(0, p, lambda q, w: w - eta * hvp(x, Z, lower_idx(keys[q]), w), gy)
        return (x - lr_x * (gx - cross(x, Z, lower_idx(k5), eta * Q * v)), Z)

    @jax.jit
    def mrbo(state, key):
        """MRBO (Yang, Ji & Liang 2021): STORM on both levels, same samples at both points."""
        x, Z, xp, Zp, u, w = state
        k1, k2 = jax.random.split(key)
        i = lower_idx(k1)
        u = gZ(x, Z, i) + (1 - 0.5) * (u - gZ(xp, Zp, i))
        w = neumann_hg(x, Z, k2) + (1 - 0.5) * (w - neumann_hg(xp, Zp, k2))
        return (x - lr_x * w, Z - lr_y * u, x, Z, u, w)

    x0 = jnp.full((n,), -2.0, jnp.float32)
    Z0 = jnp.zeros((A.shape[1], 10), jnp.float32)
    st = {"soba": (x0, Z0, Z0), "stocbio": (x0, Z0), "bsa": (x0, Z0),
          "mrbo": (x0, Z0, x0, Z0, Z0, jnp.zeros_like(x0))}
    return {k: (fn, st[k]) for k, fn in
            (("soba", soba), ("stocbio", stocbio), ("bsa", bsa), ("mrbo", mrbo))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("task")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=20, help="iterations per timed call (stochastic)")
    a = ap.parse_args(argv)
    import numpy as np

    jax, jnp = _setup()
    d = dict(np.load(a.data))
    tasks = hypergrad_tasks(d, jax, jnp) if a.task in ("reverse", "cg") else stochastic_tasks(d, jax, jnp)
    fn, arg = tasks[a.task]
    stochastic = a.task not in ("reverse", "cg")
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    out = fn(arg, key) if stochastic else fn(*arg)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(a.reps + 2):
        t0 = time.perf_counter()
        if stochastic:  # the first ``--iters`` iterations from the initial state, like our rows
            state = arg  # (the cost depends on the iterate: e.g. denormal sigmoid weights)
            for _ in range(a.iters):
                key, sub = jax.random.split(key)
                state = fn(state, sub)
            out = state
        else:
            out = fn(*arg)
        jax.block_until_ready(out)
        if r >= 2:
            times.append((time.perf_counter() - t0) / (a.iters if stochastic else 1))
    res = out[0] if stochastic else out
    print(json.dumps({"task": a.task, "ms": 1e3 * statistics.median(times), "compile_s": compile_s,
                      "jax": jax.__version__, "norm": float(jnp.linalg.norm(res)),
                      "head": [float(t) for t in np.asarray(res).reshape(-1)[:4]]}))


if __name__ == "__main__":
    main()

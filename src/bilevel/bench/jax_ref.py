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
* ``soba`` / ``stocbio`` / ``mrbo`` / ``bsa`` / ``saba`` / ``vrbo`` / ``ttsa`` / ``amigo`` /
  ``fsla`` / ``sustain`` — one outer iteration of each stochastic solver on hyper-cleaning
  (10×784 linear classifier Z, logits Z Aᵀ, one weight σ(x_i) per training sample, batch 64, 10
  inner SGD steps and 10 Neumann HVPs with a fresh batch each, as in :mod:`bilevel.solvers.stochastic`), the
  whole iteration one jitted function, batches drawn inside it with ``jax.random``. Each is
  written as ``core(state, indices)`` + ``draw(key)`` (:func:`stochastic_cores`) so that
  :mod:`bilevel.bench.jax_check` can feed it the batches our solver drew and compare the
  iterates (``--check IDX.npz OUT.npz``). Each core follows our solver's update line by line,
  with its oracle calls, batches, Neumann recursion (ours: Richardson steps, the product of the
  last q factors) and first-iteration special cases (``lax.cond`` on the iteration counter).
  VRBO's full-data restart runs inside the step every ``period`` = 10 iterations
  (``lax.cond(t % period == 0)``), exactly as ours: a timed call of 20 iterations from the
  initial state contains two restarts, in both libraries. SABA's SAGA tables live in the state
  (one fixed partition into batches); its step is two jitted calls — the iteration, then the
  row writes on the donated tables, in place (in one call XLA copies every table twice).
  Batches are drawn with replacement within a batch (``randint``); ours are slices of a
  shuffled copy — the same cost per oracle.

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
    """Per-sample softmax cross-entropy of Z (10 × 784, classes first as bilevel's hyperclean)."""
    lt = Z @ A.T
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


#: settings of the added rows that :mod:`bilevel.bench.jax_compare` does not write (its ``make``
#: dict passes the same values to our solvers): VRBO's restart period, the STORM weight of FSLA /
#: SUSTAIN (constant), and the step of the linear systems (lr_v = lr_y).
EXTRA = {"period": 10, "momentum": 0.5}
#: MRBO's default STORM weights a_t = c/(t+1)^e (our ``bilevel.solvers.stochastic.mrbo.MOMENTUM``)
MRBO_MOMENTUM = (0.5, 2 / 3)


def _st_ops(d, jax, jnp, parts=None):
    """The oracles of hyper-cleaning on index batches (``None``: the full data) and the shared
    hypergradient pieces, all plain ``jax.grad`` / ``jvp`` / ``vjp``."""
    import types

    A, lab, Av, labv = (jnp.asarray(d[k]) for k in ("A", "lab", "Av", "labv"))
    n, m, bs = A.shape[0], Av.shape[0], int(d["batch"])
    reg, eta, Q = float(d["reg"]), float(d["eta"]), int(d["Q"])

    def G(x, Z, i):
        if i is None:  # the full data (VRBO's large batch)
            return jnp.dot(jax.nn.sigmoid(x), _ce_vec(jnp, jax, Z, A, lab)) / n + reg * jnp.sum(Z * Z)
        return jnp.dot(jax.nn.sigmoid(x[i]), _ce_vec(jnp, jax, Z, A[i], lab[i])) / i.shape[0] \
            + reg * jnp.sum(Z * Z)

    def F(x, Z, j):
        if j is None:
            return jnp.mean(_ce_vec(jnp, jax, Z, Av, labv))
        return jnp.mean(_ce_vec(jnp, jax, Z, Av[j], labv[j]))

    gZ = jax.grad(G, argnums=1)
    gF = jax.grad(F, argnums=(0, 1))

    def hvp(x, Z, i, v):
        return jax.jvp(lambda z: gZ(x, z, i), (Z,), (v,))[1]

    def cross(x, Z, i, v):
        return jax.vjp(lambda a: gZ(a, Z, i), x)[1](v)[0]

    def neumann_hg(x, Z, j, i_cross, i_hvp):
        """Our :func:`bilevel.estimates.neumann_hypergradient` (MRBO / VRBO): Q Richardson steps
        w ← w − η (H_q w − ∇_y F) from w = η ∇_y F (= η Σ_q Π_{l=Q−q+1}^{Q} (I − ηH_l) ∇_y F),
        HVP batches ``i_hvp[q]`` (``None``: all full data), cross term on ``i_cross``."""
        gx, gy = gF(x, Z, j)
        if i_hvp is None:
            w = jax.lax.fori_loop(0, Q, lambda q, w: w - eta * (hvp(x, Z, None, w) - gy), eta * gy)
        else:
            w = jax.lax.fori_loop(0, Q, lambda q, w: w - eta * (hvp(x, Z, i_hvp[q], w) - gy), eta * gy)
        return gx - cross(x, Z, i_cross, w)

    def sampled_hg(x, Z, j, i_cross, i_hvp, p):
        """:func:`bilevel.estimates.sampled_neumann_hypergradient` (BSA, TTSA, SUSTAIN):
        w = η Q Π_{l=1}^{p} (I − η H_l) ∇_y F, ∇_x F − ∇²_xy G(B_cross) w (p traced)."""
        gx, gy = gF(x, Z, j)
        w = jax.lax.fori_loop(0, p, lambda q, w: w - eta * hvp(x, Z, i_hvp[q], w), gy)
        return gx - cross(x, Z, i_cross, w * (eta * Q))

    if parts is None:  # SABA's fixed partitions into batches (seeded, like FixedBatches)
        kl, ku = jax.random.split(jax.random.PRNGKey(1))
        parts = (jax.random.permutation(kl, n)[: (n // bs) * bs].reshape(-1, bs),
                 jax.random.permutation(ku, m)[: (m // bs) * bs].reshape(-1, bs))
    return types.SimpleNamespace(
        A=A, n=n, m=m, bs=bs, reg=reg, eta=eta, Q=Q, G=G, F=F, gZ=gZ, gF=gF, hvp=hvp, cross=cross,
        neumann_hg=neumann_hg, sampled_hg=sampled_hg,
        lpart=jnp.asarray(parts[0]), upart=jnp.asarray(parts[1]),
        lower_idx=lambda key, shape=(): jax.random.randint(key, (*shape, bs), 0, n),
        upper_idx=lambda key, shape=(): jax.random.randint(key, (*shape, bs), 0, m))


def stochastic_cores(d, jax, jnp, parts=None):
    """The stochastic solvers as ``name -> (core, draw, state0)``: ``core(state, idx)`` is one outer
    iteration on the given batch indices, ``draw(key)`` draws those indices (inside the jitted
    step when timed; given by :mod:`bilevel.bench.jax_check` to compare with our solvers on the
    same batches). Each core follows the update of ``bilevel.solvers.stochastic.<name>`` line by
    line, with its oracle calls and batches (see each docstring); ``t`` counts iterations."""
    o = _st_ops(d, jax, jnp, parts)
    T, Q = int(d["inner"]), o.Q
    lr_y, lr_x = float(d["lr_y"]), float(d["lr_x"])
    lr_v = lr_y
    period = int(d.get("period", EXTRA["period"]))
    a = float(d.get("momentum", EXTRA["momentum"]))
    lax, rnd = jax.lax, jax.random
    gZ, gF, hvp, cross = o.gZ, o.gF, o.hvp, o.cross
    nl, nu = o.lpart.shape[0], o.upart.shape[0]

    def soba(state, idx):
        """SOBA (Dagréou et al. 2022, Eq. 4): ∇_y G, H v and the cross term from one vjp of
        ∇_y G at (x, y) on batch i, ∇F on batch j; y, v, x updated at once."""
        x, Z, v = state
        gy, pull = jax.vjp(lambda a_, z: gZ(a_, z, idx["i"]), x, Z)
        jv, hv = pull(v)
        gxF, gyF = gF(x, Z, idx["j"])
        return (x - lr_x * (gxF - jv), Z - lr_y * gy, v - lr_v * (hv - gyF))

    def soba_draw(key):
        k1, k2 = rnd.split(key)
        return {"i": o.lower_idx(k1), "j": o.upper_idx(k2)}

    def sgd(x, Z, rows):
        return lax.fori_loop(0, T, lambda s, z: z - lr_y * gZ(x, z, rows[s]), Z)

    def stocbio(state, idx):
        """stocBiO (Ji, Yang & Liang 2021, Alg. 3): T SGD steps, then our Neumann estimator
        (Q HVPs on fresh batches, cross term on another)."""
        x, Z = state
        Z = sgd(x, Z, idx["sgd"])
        return (x - lr_x * o.neumann_hg(x, Z, idx["F"], idx["cross"], idx["hvp"]), Z)

    def bsa(state, idx):
        """BSA (Ghadimi & Wang 2018, Algs. 2–3): T SGD steps, then the randomly truncated Neumann
        hypergradient (p HVPs, then the cross term)."""
        x, Z = state
        Z = sgd(x, Z, idx["sgd"])
        return (x - lr_x * o.sampled_hg(x, Z, idx["F"], idx["cross"], idx["hvp"], idx["p"]), Z)

    def double_draw(key):  # stocBiO, AmIGO, BSA: T SGD batches, B_F, Q HVP batches, cross batch
        k1, k2, k3, k4, k5 = rnd.split(key, 5)
        return {"sgd": o.lower_idx(k1, (T,)), "F": o.upper_idx(k2), "hvp": o.lower_idx(k3, (Q,)),
                "cross": o.lower_idx(k4), "p": rnd.randint(k5, (), 0, Q)}

    def mrbo(state, idx):
        """MRBO (Yang, Ji & Liang 2021, Alg. 1): STORM on both levels with our Neumann estimator,
        the same batches at the current and previous point, weights a_t = min(1, 0.5/(t+1)^(2/3))
        (our MRBO's default schedule), plain estimates at t = 0."""
        x, Z, xp, Zp, u, w, t = state
        iy = idx["y"]

        def hg(x_, Z_):
            return o.neumann_hg(x_, Z_, idx["F"], idx["cross"], idx["hvp"])

        gy, h = gZ(x, Z, iy), hg(x, Z)
        at = jnp.clip(MRBO_MOMENTUM[0] / (t + 1.0) ** MRBO_MOMENTUM[1], 0.0, 1.0)

        def later(_):
            return (gy + (1.0 - at) * (u - gZ(xp, Zp, iy)), h + (1.0 - at) * (w - hg(xp, Zp)))

        u, w = lax.cond(t == 0, lambda _: (gy, h), later, None)
        return (x - lr_x * w, Z - lr_y * u, x, Z, u, w, t + 1)

    def saba_read(state, idx):
        """SABA (Dagréou et al. 2022, Alg. 2): SOBA's oracles at one lower batch i and one upper
        batch j of fixed partitions, each replaced by its SAGA estimate (SagaTable.update:
        direction g − m_k + mean, mean += (g − m_k)/n_b; memories start at 0). Returns the new
        (x, y, v, means) and the rows to store, m_k ← g (:func:`saba_write`)."""
        x, Z, v, mem, mean = state
        i, j = idx["i"], idx["j"]
        rows, cols = o.lpart[i], o.upart[j]
        gy, pull = jax.vjp(lambda a_, z: gZ(a_, z, rows), x, Z)
        jv, hv = pull(v)
        gxF, gyF = gF(x, Z, cols)
        out, mean, writes = {}, dict(mean), {}
        for name, k, g, nb in (("gy", i, gy, nl), ("hv", i, hv, nl), ("jv", i, jv, nl),
                               ("gxF", j, gxF, nu), ("gyF", j, gyF, nu)):
            diff = g - mem[name][k]
            out[name], mean[name], writes[name] = diff + mean[name], mean[name] + (1.0 / nb) * diff, (k, g)
        d_y, d_v, d_x = out["gy"], out["hv"] - out["gyF"], out["gxF"] - out["jv"]
        return (x - lr_x * d_x, Z - lr_y * d_y, v - lr_v * d_v, mean), writes

    def saba_write(mem, writes):
        """m_k ← g for every table. A separate jitted call on the donated tables: XLA then writes
        the rows in place, whereas reading m_k and writing m_k in one jitted step makes it copy
        every table twice per call (10 full-table copies per SABA step in the compiled HLO;
        jax 0.10.2, CPU), which would slow the reference down."""
        return {name: mem[name].at[k].set(g) for name, (k, g) in writes.items()}

    def saba(state, idx):
        (x, Z, v, mean), writes = saba_read(state, idx)
        return (x, Z, v, saba_write(state[3], writes), mean)

    def saba_draw(key):
        k1, k2 = rnd.split(key)
        return {"i": rnd.randint(k1, (), 0, nl), "j": rnd.randint(k2, (), 0, nu)}

    def vrbo(state, idx):
        """VRBO (Yang, Ji & Liang 2021, Alg. 2): every ``period`` iterations (t mod q = 0) u, w
        are reset on the full data (Q full HVPs + full cross + full ∇_y G); x ← x − α w; then
        ``inner`` SARAH steps on fresh batches, both estimators at the new and the reference
        point on the same batches (idx F: (inner, b), G: (inner, Q + 2, b) = cross, Q HVPs, ∇_y G)."""
        x, Z, u, w, xp, Zp, t = state

        def reset(_):
            return gZ(x, Z, None), o.neumann_hg(x, Z, None, None, None), x, Z

        u, w, xp, Zp = lax.cond(t % period == 0, reset, lambda _: (u, w, xp, Zp), None)
        xn = x - lr_x * w

        def body(k, c):
            u, w, xp, Zp, Zt = c
            jF, ig = idx["F"][k], idx["G"][k]
            w = w + (o.neumann_hg(xn, Zt, jF, ig[0], ig[1:Q + 1])
                     - o.neumann_hg(xp, Zp, jF, ig[0], ig[1:Q + 1]))
            u = u + (gZ(xn, Zt, ig[Q + 1]) - gZ(xp, Zp, ig[Q + 1]))
            return u, w, xn, Zt, Zt - lr_y * u

        u, w, xp, Zp, Zt = lax.fori_loop(0, T, body, (u, w, xp, Zp, Z))
        return (xn, Zt, u, w, xp, Zp, t + 1)

    def vrbo_draw(key):
        k1, k2 = rnd.split(key)
        return {"F": o.upper_idx(k1, (T,)), "G": o.lower_idx(k2, (T, Q + 2))}

    def ttsa(state, idx):
        """TTSA (Hong et al. 2023, Alg. 1): one lower SGD step, then the randomly truncated
        Neumann hypergradient at the new y (p HVPs, then the cross term) and the upper step."""
        x, Z = state
        Z = Z - lr_y * gZ(x, Z, idx["y"])
        hg = o.sampled_hg(x, Z, idx["F"], idx["cross"], idx["hvp"], idx["p"])
        return (x - lr_x * hg, Z)

    def sampled_draw(key):
        k1, k2, k3, k4, k5 = rnd.split(key, 5)
        return {"y": o.lower_idx(k1), "F": o.upper_idx(k2), "hvp": o.lower_idx(k3, (Q,)),
                "cross": o.lower_idx(k4), "p": rnd.randint(k5, (), 0, Q)}

    def amigo(state, idx):
        """AmIGO (Arbel & Mairal 2022, Algs. 1–2): T warm-started SGD steps on y, ∇F at the new y,
        M = Q warm-started SGD steps on ½vᵀHv − bᵀv (fresh batch each), then the cross term."""
        x, Z, v = state
        Z = sgd(x, Z, idx["sgd"])
        gx, b = gF(x, Z, idx["F"])
        v = lax.fori_loop(0, Q, lambda s, v: v - lr_v * (hvp(x, Z, idx["hvp"][s], v) - b), v)
        return (x - lr_x * (gx - cross(x, Z, idx["cross"], v)), Z, v)

    def fsla(state, idx):
        """FSLA (Li, Gu & Huang 2022, Alg. 1): one SGD step on y (batch 1), one on the linear
        system (batch 2, at the new y), ν = ∇_x F − ∇²_xy G₂ v_new, and the STORM direction
        d = ν + (1 − a)(d − ν(x_prev, y_prev, v_prev)) on the same batches (d = ν at t = 0)."""
        x, Z, v, dk, xp, Zp, vp, t = state
        i1, i2, j = idx["y1"], idx["y2"], idx["F"]
        Z = Z - lr_y * gZ(x, Z, i1)
        gxF, gyF = gF(x, Z, j)
        vn = v - lr_v * (hvp(x, Z, i2, v) - gyF)
        nu = gxF - cross(x, Z, i2, vn)

        def later(_):
            old = gF(xp, Zp, j)[0] - cross(xp, Zp, i2, vp)
            return nu + (1.0 - a) * (dk - old)

        dk = lax.cond(t == 0, lambda _: nu, later, None)
        return (x - lr_x * dk, Z, vn, dk, x, Z, vn, t + 1)

    def fsla_draw(key):
        k1, k2, k3 = rnd.split(key, 3)
        return {"y1": o.lower_idx(k1), "y2": o.lower_idx(k2), "F": o.upper_idx(k3)}

    def sustain(state, idx):
        """SUSTAIN (Khanduri et al. 2021b, Alg. 1): MRBO's STORM recursions on both levels with
        the randomly truncated Neumann hypergradient (same batches and p at both points; plain
        estimates at t = 0)."""
        x, Z, xp, Zp, u, w, t = state
        iy = idx["y"]

        def hg(x_, Z_):
            return o.sampled_hg(x_, Z_, idx["F"], idx["cross"], idx["hvp"], idx["p"])

        gy, h = gZ(x, Z, iy), hg(x, Z)

        def later(_):
            return (gy + (1.0 - a) * (u - gZ(xp, Zp, iy)), h + (1.0 - a) * (w - hg(xp, Zp)))

        u, w = lax.cond(t == 0, lambda _: (gy, h), later, None)
        return (x - lr_x * w, Z - lr_y * u, x, Z, u, w, t + 1)

    saba.parts = (saba_read, saba_write)
    x0 = jnp.full((o.n,), -2.0, jnp.float32)
    Z0 = jnp.zeros((10, o.A.shape[1]), jnp.float32)
    t0 = jnp.zeros((), jnp.int32)

    def tab(k, like):
        return jnp.zeros((k, *like.shape), jnp.float32)

    mem0 = {"gy": tab(nl, Z0), "hv": tab(nl, Z0), "jv": tab(nl, x0), "gxF": tab(nu, x0),
            "gyF": tab(nu, Z0)}
    mean0 = {"gy": Z0, "hv": Z0, "jv": x0 * 0, "gxF": x0 * 0, "gyF": Z0}
    x00 = jnp.zeros_like(x0)
    return {
        "soba": (soba, soba_draw, (x0, Z0, Z0)),
        "stocbio": (stocbio, double_draw, (x0, Z0)),
        "mrbo": (mrbo, sampled_draw, (x0, Z0, x0, Z0, Z0, x00, t0)),
        "bsa": (bsa, double_draw, (x0, Z0)),
        "saba": (saba, saba_draw, (x0, Z0, Z0, mem0, mean0)),
        "vrbo": (vrbo, vrbo_draw, (x0, Z0, Z0, x00, x0, Z0, t0)),
        "ttsa": (ttsa, sampled_draw, (x0, Z0)),
        "amigo": (amigo, double_draw, (x0, Z0, Z0)),
        "fsla": (fsla, fsla_draw, (x0, Z0, Z0, x00, x0, Z0, Z0, t0)),
        "sustain": (sustain, sampled_draw, (x0, Z0, x0, Z0, Z0, x00, t0)),
    }


#: tasks whose step donates (part of) its state: SABA's SAGA tables are written in place, as our
#: solver replaces one memory per oracle (without donation XLA would copy the tables every call)
DONATE = {"saba"}


def stochastic_tasks(d, jax, jnp):
    """name -> (step(state, key), state0): each core with its batches drawn inside one jitted
    step (SABA: two jitted calls, see :func:`stochastic_cores`)."""
    cores = stochastic_cores(d, jax, jnp)
    tasks = {}
    for k, (core, draw, s0) in cores.items():
        def step(state, key, core=core, draw=draw):
            return core(state, draw(key))

        tasks[k] = (jax.jit(step), s0)
    read, write = cores["saba"][0].parts
    draw = cores["saba"][1]
    read_j = jax.jit(lambda state, key: read(state, draw(key)))
    write_j = jax.jit(write, donate_argnums=(0,))

    def saba_step(state, key):
        """Two jitted calls: the step (reads the tables) and the in-place row writes (donated)."""
        (x, Z, v, mean), writes = read_j(state, key)
        return (x, Z, v, write_j(state[3], writes), mean)

    tasks["saba"] = (saba_step, cores["saba"][2])
    return tasks


def check(d, task: str, idx_path: str, out_path: str) -> None:
    """Test hook: run ``task``'s core for the given batch indices (``IDX.npz``: one array per index
    name with a leading iteration axis, plus SABA's partitions ``lpart``/``upart``) from the
    initial state and save the final x, y to ``OUT.npz`` (see :mod:`bilevel.bench.jax_check`)."""
    import numpy as np

    jax, jnp = _setup()
    given = dict(np.load(idx_path))
    parts = (given.pop("lpart"), given.pop("upart")) if "lpart" in given else None
    core, _, state = stochastic_cores(d, jax, jnp, parts)[task]
    core = jax.jit(core)
    iters = len(next(iter(given.values())))
    for k in range(iters):
        state = core(state, {name: jnp.asarray(arr[k]) for name, arr in given.items()})
    np.savez(out_path, x=np.asarray(state[0]), y=np.asarray(state[1]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("task")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=20, help="iterations per timed call (stochastic)")
    ap.add_argument("--check", nargs=2, metavar=("IDX.npz", "OUT.npz"), default=None,
                    help="test hook: run the task on given batch indices (no timing)")
    a = ap.parse_args(argv)
    import numpy as np

    d = dict(np.load(a.data))
    if a.check:
        check(d, a.task, *a.check)
        return
    jax, jnp = _setup()
    tasks = hypergrad_tasks(d, jax, jnp) if a.task in ("reverse", "cg") else stochastic_tasks(d, jax, jnp)
    fn, arg = tasks[a.task]
    stochastic = a.task not in ("reverse", "cg")

    def fresh():  # a donated state is consumed by the call: start each timed run from a copy
        return jax.tree_util.tree_map(jnp.copy, arg) if a.task in DONATE else arg

    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    out = fn(fresh(), key) if stochastic else fn(*arg)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(a.reps + 2):
        state = fresh() if stochastic else None
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        if stochastic:  # the first ``--iters`` iterations from the initial state, like our rows
            for _ in range(a.iters):  # (the cost depends on the iterate: e.g. denormal sigmoid weights)
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

"""nn.Modules in bilevel problems: every estimator on a small CNN with BatchNorm (train mode,
functional buffers), against dense float64 references; buffers as state; seeded dropout;
load_into; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel import hypergrad as H
from tests.reference_problems import dense_ift, fd_grad, hessian_spectrum, newton, rel_err

F64 = torch.float64


def _cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten()]  # smooth: FD checks
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(18, 2)).double()


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=gen, dtype=F64), torch.randint(0, 2, (n,), generator=gen)


@pytest.fixture(scope="module")
def cnn_problem():
    """Weight-decay tuning of a CNN with BatchNorm: g = CE_train + ½ e^x ‖y‖², f = CE_val, both in
    train mode (batch statistics). y* by Newton in float64, exact hypergradient by a dense solve."""
    module = _cnn()
    net = bl.Functional(module)
    train, val = _data(16, 1), _data(8, 2)

    def g(x, y):
        return F.cross_entropy(net(y, train[0]), train[1]) + 0.5 * x.exp() * sum(
            (p**2).sum() for p in y.values())

    def f(x, y):
        return F.cross_entropy(net(y, val[0]), val[1])

    y0 = net.params()
    names, shapes = list(y0), [p.shape for p in y0.values()]
    sizes = [p.numel() for p in y0.values()]

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(names, torch.split(v, sizes), shapes)}

    # weight decay e^x = 1: GD at step 0.5, 0.2 or 0.05 followed by Newton reaches one minimum
    # (μ ≈ 0.65, L ≈ 1.5). At e^-0.5 GD at step 0.5 sits at its edge of stability (L ≈ 2/0.5) and
    # where it stops depends on the CPU's rounding: on some machines Newton then lands on a saddle.
    x = torch.tensor(0.0, dtype=F64)
    g_vec = lambda xv, v: g(xv.reshape(()), unflat(v))  # noqa: E731
    f_vec = lambda xv, v: f(xv.reshape(()), unflat(v))  # noqa: E731
    v = torch.cat([p.reshape(-1) for p in y0.values()])
    for _ in range(200):  # plain gradient descent into the basin of a minimum, then Newton
        vr = v.detach().requires_grad_(True)
        v = v - 0.5 * torch.autograd.grad(g_vec(x.reshape(1), vr), vr)[0]
    v_star = newton(g_vec, x.reshape(1), v.detach())
    mu, L = hessian_spectrum(g_vec, x.reshape(1), v_star)
    assert mu > 0  # strongly convex around y*: the implicit references are well defined
    hg, _, _ = dense_ift(f_vec, g_vec, x.reshape(1), v_star)
    buffers_before = {k: b.clone() for k, b in module.named_buffers()}
    return dict(module=module, net=net, problem=bl.Problem(f, g), x=x, y0=y0, y_star=unflat(v_star),
                hg=hg.reshape(()), mu=mu, L=L, buffers=buffers_before, f=f, g=g, data=(train, val))


@pytest.mark.parametrize("est", [
    H.CG(None, iters=200, tol=1e-14),
    H.Exact(None),
    "neumann",
    "fixed_point",
])
def test_implicit_estimators_on_the_cnn_match_the_dense_reference(cnn_problem, est):
    P = cnn_problem
    if est == "neumann":
        est = H.Neumann(None, iters=int(40 * P["L"] / P["mu"]), alpha=1 / P["L"])
    elif est == "fixed_point":
        est = H.FixedPoint(None, iters=int(40 * P["L"] / P["mu"]), alpha=1 / P["L"])
    res = est(P["problem"], P["x"], P["y_star"])
    # CG / Exact: solve to round-off; Neumann / FixedPoint: (1 − μ/L)^iters ≈ e^-40
    assert rel_err(res.grad, P["hg"]) < 1e-8
    _buffers_untouched(P)


def test_unrolled_estimators_on_the_cnn_match_finite_differences_of_the_unroll(cnn_problem):
    P = cnn_problem
    dyn = bl.inner.GD(lr=1 / P["L"], steps=15)
    rev = H.Reverse(dyn)(P["problem"], P["x"], P["y0"])
    fwd = H.Forward(dyn)(P["problem"], P["x"], P["y0"])
    assert rel_err(rev.grad, fwd.grad) < 1e-10

    def h(xv):  # f(x, y_15(x)) with a textbook GD loop, no bilevel code
        y = {k: v.clone() for k, v in P["y0"].items()}
        with torch.enable_grad():
            for _ in range(15):
                yr = {k: v.detach().requires_grad_(True) for k, v in y.items()}
                gr = torch.autograd.grad(P["g"](xv.reshape(()), yr), list(yr.values()))
                y = {k: v - dyn.lr * gk for (k, v), gk in zip(y.items(), gr)}
        return P["f"](xv.reshape(()), y)

    assert rel_err(rev.grad, fd_grad(h, P["x"].reshape(1)).reshape(())) < 1e-6
    # the T-step unroll converges to the implicit hypergradient (sanity, loose)
    _buffers_untouched(P)


def test_first_order_finite_difference_zeroth_order_closed_form_on_the_cnn(cnn_problem):
    P = cnn_problem
    x, ys = P["x"], P["y_star"]
    assert float(H.FirstOrder(None)(P["problem"], x, ys).grad) == 0.0  # f does not depend on x
    xi = 0.1 / P["L"]
    fd = H.FiniteDifference(None, eps=1e-4, xi=xi)(P["problem"], x, ys)

    def one_step(xv):  # DARTS: f(y − ξ ∇_y g(x, y)) differentiated through that one step, y fixed
        yr = {k: v.detach().requires_grad_(True) for k, v in ys.items()}
        gr = torch.autograd.grad(P["g"](xv.reshape(()), yr), list(yr.values()), create_graph=True)
        return P["f"](xv, {k: v - xi * gk for (k, v), gk in zip(ys.items(), gr)})

    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(one_step(xr), xr)
    assert rel_err(fd.grad, ref) < 1e-6
    dyn = bl.inner.GD(lr=1 / P["L"], steps=10)
    zo = H.ZerothOrder(dyn, samples=4, mu=1e-6, seed=0)(P["problem"], x, P["y0"])
    rev = H.Reverse(dyn)(P["problem"], x, P["y0"])
    u = zo.info["directions"].reshape(-1)  # scalar x: estimate = h'(x) · mean(u²) + O(μ)
    assert rel_err(zo.grad, rev.grad * (u**2).mean()) < 1e-4
    cf = H.ClosedForm(lambda x_: ys)(P["problem"], x, P["y0"])  # y* independent of x: ∇_x f only
    assert float(cf.grad) == 0.0
    _buffers_untouched(P)


def _buffers_untouched(P):
    for k, b in P["module"].named_buffers():
        assert torch.equal(b, P["buffers"][k]), k


def test_buffers_are_state_updated_like_pytorch_and_used_in_eval_mode(cnn_problem):
    P = cnn_problem
    net, module, y = P["net"], P["module"], P["y_star"]
    train, val = P["data"]
    b0 = net.buffers()
    b1 = net.update_buffers(y, b0, train[0])
    b2 = net.update_buffers(y, b1, val[0])
    ref = copy.deepcopy(module)  # the same two steps, by side effect on a copy of the module
    bl.load_into(ref, y)
    ref.train()
    with torch.no_grad():
        ref(train[0])
        ref(val[0])
    for k, b in ref.named_buffers():
        assert torch.allclose(b2[k], b, rtol=1e-12, atol=0), k
    assert int(b2["1.num_batches_tracked"]) == 2 and torch.equal(b0["1.running_mean"], torch.zeros(2))
    ref.eval()
    torch.testing.assert_close(net(y, val[0], buffers=b2, train=False), ref(val[0]))
    _buffers_untouched(P)
    # load_into writes y and the buffers back; the result reproduces the functional call
    out = bl.load_into(copy.deepcopy(module), y, buffers=b2).eval()
    torch.testing.assert_close(out(val[0]), net(y, val[0], buffers=b2, train=False))


# 5 inner steps from the initialization: H is indefinite there (CG warns), not what this test checks
@pytest.mark.filterwarnings("ignore::bilevel.LinearSolveWarning")
def test_hypergradient_descent_on_the_cnn_with_a_dataloader_keeps_the_module_intact(cnn_problem):
    P = cnn_problem
    net = P["net"]
    train, val = P["data"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=8)

    def g(x, y, b):
        return F.cross_entropy(net(y, b[0]), b[1]) + 0.5 * x.exp() * sum((p**2).sum() for p in y.values())

    def f(x, y, b):
        return F.cross_entropy(net(y, b[0]), b[1])

    solver = bl.solvers.HypergradientDescent(H.CG(bl.inner.GD(lr=0.5, steps=5), iters=5), upper=0.1)
    res = bl.solve(bl.Problem(f, g), P["x"], P["y0"], solver=solver, steps=3, lower_data=loader,
                   upper_data=[val], track=False)
    assert set(res.y) == set(P["y0"]) and torch.isfinite(res.x)
    _buffers_untouched(P)


def test_dropout_masks_are_seeded_and_leave_the_global_rng_alone():
    net = bl.Functional(_cnn(dropout=0.5), seed=3)
    y, X = net.params(), _data(4, 0)[0]
    state = torch.get_rng_state()
    a, b = net(y, X), net(y, X)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(net(y, X, seed=4), a)
    assert torch.equal(net(y, X, train=False), net(y, X, train=False, seed=4))  # eval: no dropout
    with torch.random.fork_rng():
        torch.manual_seed(3)
        assert torch.equal(net(y, X, seed=False), a)  # seed=False: the global RNG


def test_bad_input_names_the_argument():
    module = _cnn()
    module[0].weight.requires_grad_(False)
    with pytest.raises(bl.ConfigError,
                       match=r"lower module: parameters \['0.weight'\] have requires_grad=False"):
        bl.Functional(module, name="lower module")
    with pytest.raises(bl.ConfigError, match="requires_grad=False"):
        bl.params(module)
    net = bl.Functional(module, frozen="constant")
    y = net.params()
    assert "0.weight" not in y and net(y, _data(2, 0)[0]).shape == (2, 2)
    assert "0.weight" not in bl.params(module, frozen="constant")
    b = net.buffers()
    b["1.running_mean"] = torch.zeros(3, dtype=F64)
    with pytest.raises(bl.StructureMismatchError, match=r"buffers\['1.running_mean'\] has shape \(3,\)"):
        net(y, _data(2, 0)[0], buffers=b, train=False)
    with pytest.raises(bl.StructureMismatchError, match="missing"):
        net({k: v for k, v in y.items() if k != "4.bias"}, _data(2, 0)[0])
    with pytest.raises(bl.StructureMismatchError, match=r"load_into: params \['nope'\]"):
        bl.load_into(module, {"nope": torch.zeros(1)})
    with pytest.raises(bl.StructureMismatchError, match=r"params\['4.bias'\] has shape"):
        bl.load_into(module, {"4.bias": torch.zeros(5)})

    class Growing(nn.Module):  # a buffer that changes shape during the forward pass
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("seen", torch.zeros(1))

        def forward(self, x):
            self.seen = torch.cat([self.seen, x.new_ones(1)])
            return self.lin(x)

    g = bl.Functional(Growing())
    with pytest.raises(bl.StructureMismatchError, match=r"update_buffers\(\)\['seen'\] has shape \(2,\)"):
        g.update_buffers(g.params(), g.buffers(), torch.ones(3, 2))


def test_upper_variable_from_another_module_and_load_into():
    """x = the parameters of a hyper-module (one log weight decay per weight tensor)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    hyper = nn.Module()
    hyper.log_wd = nn.Parameter(torch.tensor([-1.0, 0.5], dtype=F64))
    net = bl.Functional(model)
    gen = torch.Generator().manual_seed(0)
    X, t = torch.randn(20, 3, generator=gen, dtype=F64), torch.randn(20, 2, generator=gen, dtype=F64)

    def g(x, y):
        wd = x["log_wd"].exp()
        return ((net(y, X) - t) ** 2).mean() + 0.5 * (wd[0] * (y["weight"] ** 2).sum()
                                                     + wd[1] * (y["bias"] ** 2).sum())

    def f(x, y):
        return ((net(y, X[:5]) - 1.0) ** 2).mean()

    x0, y0 = bl.params(hyper), net.params()
    prob = bl.Problem(f, g)
    inner = bl.inner.GD(lr=0.3, steps=400)
    cg = H.CG(inner, iters=20, tol=1e-14)(prob, x0, y0)
    ex = H.Exact(inner)(prob, x0, y0)
    assert set(cg.grad) == {"log_wd"} and rel_err(cg.grad, ex.grad) < 1e-10
    bl.load_into(hyper, {"log_wd": x0["log_wd"] - 0.1 * cg.grad["log_wd"]})
    torch.testing.assert_close(hyper.log_wd.detach(), x0["log_wd"] - 0.1 * cg.grad["log_wd"])


def test_forward_equals_reverse_and_finite_differences_with_dropout_on():
    """Dropout (p=0.5) in the CNN: each train-mode call draws its masks from the Functional's
    seed, so g is one deterministic function and Forward (its vmapped jvps run with
    randomness="same": one mask per pass, the primal's) differentiates the same unroll as Reverse.
    Both products paths, the func backend and a start y0(x) are compared with Reverse (1e-10);
    Reverse with central differences of the unroll (1e-6)."""
    module = _cnn(dropout=0.5)
    net = bl.Functional(module, seed=7)
    (X, t), (Xv, tv) = _data(12, 3), _data(6, 4)

    def g(x, y):
        return F.cross_entropy(net(y, X), t) + 0.5 * x[0].exp() * sum(
            (p**2).sum() for p in y.values()) + x[1] * y["5.bias"].sum()

    def f(x, y):
        return F.cross_entropy(net(y, Xv), tv)

    prob, x = bl.Problem(f, g), torch.tensor([-0.5, 0.1], dtype=F64)
    dyn = bl.inner.GD(lr=0.2, steps=6)
    y0 = net.params()
    rev = H.Reverse(dyn)(prob, x, y0).grad
    for est in (H.Forward(dyn), H.Forward(dyn, products="jvp"), H.Forward(dyn, chunk=1)):
        assert rel_err(est(prob, x, y0).grad, rev) < 1e-10, est
    with bl.oracles.backend("func"):
        assert rel_err(H.Forward(dyn)(prob, x, y0).grad, rev) < 1e-10

    def y0_of_x(x):
        return {k: v * (1 + 0.1 * x[1]) for k, v in y0.items()}

    rev_fn = H.Reverse(dyn)(prob, x, y0_of_x).grad
    assert rel_err(H.Forward(dyn, products="jvp")(prob, x, y0_of_x).grad, rev_fn) < 1e-10

    def h(xv):  # f(x, y_6(x)) by a textbook GD loop
        y = dict(y0)
        with torch.enable_grad():
            for _ in range(6):
                yr = {k: v.detach().requires_grad_(True) for k, v in y.items()}
                gr = torch.autograd.grad(g(xv, yr), list(yr.values()))
                y = {k: v - 0.2 * gk for (k, v), gk in zip(y.items(), gr)}
        return f(xv, y)

    assert rel_err(rev, fd_grad(h, x)) < 1e-6
    # the masks are really active: another seed gives another function (and hypergradient)
    other = bl.Functional(module, seed=8)
    g8 = bl.Problem(f, lambda x, y: F.cross_entropy(other(y, X), t) + 0.5 * x[0].exp() * sum(
        (p**2).sum() for p in y.values()) + x[1] * y["5.bias"].sum())
    assert rel_err(H.Reverse(dyn)(g8, x, y0).grad, rev) > 1e-3


# --- running statistics carried through the unroll (Problem(buffers=net.running_stats())) -------

def _carried(P, eval_upper: bool):
    """The CNN problem with the BatchNorm buffers carried through the lower dynamics; f in eval
    mode with the carried statistics (eval_upper) or in train mode (does not read them)."""
    net = P["net"]
    train, val = P["data"]

    def f_eval(x, y, *, buffers):
        return F.cross_entropy(net(y, val[0], buffers=buffers, train=False), val[1])

    return bl.Problem(f_eval if eval_upper else P["f"], P["g"],
                      buffers=net.running_stats(inputs=lambda batch: (train[0],)))


def _manual_stats(P, dyn, K):
    """K ordinary train-mode forward passes of a copy of the module at the iterates y_0..y_{K-1}
    of ``dyn`` (each y_k from running the dynamics k steps): what training leaves in the module."""
    ref = copy.deepcopy(P["module"])
    ref.train()
    bound = bl.formulation.Bound(bl.Problem(P["f"], P["g"]), P["x"], P["y0"])
    for k in range(K):
        yk, _ = bl.hypergrad.base.solve_lower(bound, dyn, bound.xs, bound.ys0, steps=k)
        bl.load_into(ref, bound.y_tree(yk))
        with torch.no_grad():
            ref(P["data"][0][0])
    return dict(ref.named_buffers())


def test_running_stats_inside_the_unroll_equal_k_manual_train_mode_forwards(cnn_problem):
    """Every estimator that runs the lower dynamics steps the buffers at each iterate: after K
    steps they equal, bit for bit, those of K train-mode forwards of a copy of the module at the
    same iterates (Forward(products="jvp"), whose iterates come from torch.func, to rounding);
    the module itself is untouched and num_batches_tracked counts K."""
    P = cnn_problem
    K = 6
    dyn = bl.inner.GD(lr=1 / P["L"], steps=K)
    want = _manual_stats(P, dyn, K)
    assert int(want["1.num_batches_tracked"]) == K and not torch.equal(
        want["1.running_mean"], P["buffers"]["1.running_mean"])
    prob = _carried(P, eval_upper=False)
    ests = [H.Reverse(dyn), H.Reverse(dyn, truncate=3), H.Reverse(dyn, checkpoint=2),
            H.Forward(dyn), H.Forward(dyn, products="jvp"), H.CG(dyn, iters=5), H.Exact(dyn),
            H.Neumann(dyn, iters=5, alpha=1 / P["L"]), H.FixedPoint(dyn, iters=5, alpha=1 / P["L"]),
            H.FirstOrder(dyn), H.FiniteDifference(dyn),
            H.ZerothOrder(dyn, samples=2, mu=1e-6, seed=0, batched=False), H.EvoGrad(dyn)]
    for est in ests:
        res = est(prob, P["x"], P["y0"])
        assert set(res.buffers) == set(want), est
        for k, b in want.items():
            if getattr(est, "products", None) == "jvp":  # its primal comes from torch.func: the
                torch.testing.assert_close(res.buffers[k], b, rtol=1e-13, atol=1e-15)  # iterates
            else:                                                   # differ by rounding only
                assert torch.equal(res.buffers[k], b), (est, k)
    _buffers_untouched(P)
    # continued from given buffers: K more steps from y_K count 2K batches
    res = H.Reverse(dyn)(prob, P["x"], P["y0"], buffers=res.buffers)
    assert int(res.buffers["1.num_batches_tracked"]) == 2 * K
    # ClosedForm runs no dynamics: the buffers come back unchanged
    cf = H.ClosedForm(lambda x_: P["y_star"])(prob, P["x"], P["y0"])
    assert all(torch.equal(cf.buffers[k], P["buffers"][k]) for k in want)


def test_eval_mode_upper_with_carried_stats_reverse_matches_finite_differences(cnn_problem):
    """f(x, y_K; s_K) in eval mode with the carried statistics s_K, which the hypergradient treats
    as constants (running statistics are not differentiated): Reverse equals central
    differences of x -> f_eval(x, y_K(x); s_K(x0)) by a textbook GD loop (1e-6), and Forward,
    checkpointed and truncated-to-all Reverse equal it (1e-10)."""
    P = cnn_problem
    K = 8
    dyn = bl.inner.GD(lr=1 / P["L"], steps=K)
    prob = _carried(P, eval_upper=True)
    rev = H.Reverse(dyn)(prob, P["x"], P["y0"])
    s_K = rev.buffers
    val = P["data"][1]

    def h(xv):
        y = dict(P["y0"])
        with torch.enable_grad():
            for _ in range(K):
                yr = {k: v.detach().requires_grad_(True) for k, v in y.items()}
                gr = torch.autograd.grad(P["g"](xv.reshape(()), yr), list(yr.values()))
                y = {k: v - dyn.lr * gk for (k, v), gk in zip(y.items(), gr)}
        return F.cross_entropy(P["net"](y, val[0], buffers=s_K, train=False), val[1])

    assert rel_err(rev.grad, fd_grad(h, P["x"].reshape(1)).reshape(())) < 1e-6
    for est in (H.Forward(dyn), H.Reverse(dyn, checkpoint=3), H.Reverse(dyn, truncate=K)):
        assert rel_err(est(prob, P["x"], P["y0"]).grad, rev.grad) < 1e-10, est
    # eval mode really differs from train mode here (the statistics matter)
    assert rel_err(H.Reverse(dyn)(P["problem"], P["x"], P["y0"]).grad, rev.grad) > 1e-3
    _buffers_untouched(P)


def test_implicit_estimators_with_eval_mode_upper_match_the_dense_reference(cnn_problem):
    """From y*, the lower steps stay at y* and step the statistics there; CG / Exact then match
    the dense implicit-function hypergradient of f_eval(·; s_K) (s_K constant), 1e-8."""
    P = cnn_problem
    dyn = bl.inner.GD(lr=1 / P["L"], steps=3)
    prob = _carried(P, eval_upper=True)
    cg = H.CG(dyn, iters=200, tol=1e-14)(prob, P["x"], P["y_star"])
    ex = H.Exact(dyn)(prob, P["x"], P["y_star"])
    net, val = P["net"], P["data"][1]
    y0 = P["y_star"]
    names, shapes = list(y0), [p.shape for p in y0.values()]
    sizes = [p.numel() for p in y0.values()]

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(names, torch.split(v, sizes), shapes)}

    v = torch.cat([p.reshape(-1) for p in cg.y.values()])
    ref, _, _ = dense_ift(
        lambda xv, w: F.cross_entropy(net(unflat(w), val[0], buffers=cg.buffers, train=False), val[1]),
        lambda xv, w: P["g"](xv.reshape(()), unflat(w)), P["x"].reshape(1), v)
    assert rel_err(cg.grad, ref.reshape(())) < 1e-8 and rel_err(ex.grad, ref.reshape(())) < 1e-8
    assert int(cg.buffers["1.num_batches_tracked"]) == 3


@pytest.mark.filterwarnings("ignore::bilevel.LinearSolveWarning")
def test_hypergradient_descent_carries_the_stats_across_outer_steps(cnn_problem):
    P = cnn_problem
    prob = _carried(P, eval_upper=True)
    K, T_ = 4, 3
    est = H.CG(bl.inner.GD(lr=0.5, steps=K), iters=5)
    res = bl.solve(prob, P["x"], P["y0"], solver=bl.solvers.HypergradientDescent(est, upper=0.1),
                   steps=T_, track=True)
    s = res.state["buffers"]
    assert int(s["1.num_batches_tracked"]) == K * T_
    # the same chain by hand: each outer step continues from the previous buffers and y
    x, y, b = P["x"], P["y0"], None
    for _ in range(T_):
        r = est(prob, x, y, buffers=b)
        x, y, b = x - 0.1 * r.grad, r.y, r.buffers
    assert all(torch.equal(s[k], b[k]) for k in s)
    # x to rounding: the solver's step is torch.add(x, g, alpha=-0.1), which CPUs with AVX-512
    # compute with one fused multiply-add (one rounding) where x - 0.1 * g rounds twice (1 ulp
    # apart on an Intel Xeon; bitwise equal on the AMD EPYC where this test was written)
    torch.testing.assert_close(res.x, x, rtol=4 * torch.finfo(torch.float64).eps, atol=0)
    # tracking evaluated the eval-mode f with the carried statistics of the last step
    want = float(prob.f(res.x, res.y, buffers=s))
    assert res.history[-1]["upper_loss"] == pytest.approx(want, rel=1e-12)
    _buffers_untouched(P)
    with pytest.raises(bl.ConfigError, match="SOBA does not step them"):
        bl.solve(prob, P["x"], P["y0"], solver=bl.solvers.SOBA(), steps=1)


def test_carried_buffers_bad_input(cnn_problem):
    P = cnn_problem
    net = P["net"]
    with pytest.raises(bl.ConfigError, match="lower objective takes a `buffers` parameter"):
        bl.Problem(P["f"], lambda x, y, *, buffers: P["g"](x, y), buffers=net.running_stats())
    with pytest.raises(bl.ConfigError, match="upper objective takes `buffers`, but the problem"):
        bl.Problem(lambda x, y, *, buffers: P["f"](x, y), P["g"])
    with pytest.raises(bl.ConfigError, match="must be a bilevel.modules.Buffers"):
        bl.Problem(P["f"], P["g"], buffers=net.buffers())
    prob = _carried(P, eval_upper=False)
    with pytest.raises(bl.ConfigError, match="batched=True"):
        H.ZerothOrder(bl.inner.GD(lr=0.1, steps=2), samples=2)(prob, P["x"], P["y0"])
    with pytest.raises(bl.ConfigError, match="Hypernetwork fits a best-response proxy"):
        H.Hypernetwork()(prob, P["x"], P["y0"])
    with pytest.raises(bl.ConfigError, match="carries none"):
        H.Reverse(bl.inner.GD(lr=0.1, steps=2))(P["problem"], P["x"], P["y0"], buffers={})
    with pytest.raises(bl.ConfigError, match="cannot tell the module's input"):
        H.Reverse(bl.inner.GD(lr=0.1, steps=2))(
            bl.Problem(P["f"], P["g"], buffers=net.running_stats()), P["x"], P["y0"])
    grow = bl.modules.Buffers({"n": torch.zeros(1)}, lambda x, y, b, batch: {"n": torch.zeros(2)})
    with pytest.raises(bl.StructureMismatchError, match="after inner step 1: leaf 0 is \\(2,\\)"):
        H.Reverse(bl.inner.GD(lr=0.1, steps=2))(bl.Problem(P["f"], P["g"], buffers=grow),
                                                 P["x"], P["y0"])


def test_nesterov_steps_the_stats_at_the_extrapolated_point(cnn_problem):
    """The statistics of step k come from the forward pass where step k evaluates ∇_y g — for
    Nesterov the extrapolated point w_k, not the output z_k."""
    P = cnn_problem
    dyn = bl.inner.Nesterov(lr=0.5 / P["L"], steps=4)
    res = H.Reverse(dyn)(_carried(P, eval_upper=False), P["x"], P["y0"])
    bound = bl.formulation.Bound(P["problem"], P["x"], P["y0"])
    gfn = bl.hypergrad.base.lower_grad_fn(bound, bound.xs, create_graph=False)
    ref = copy.deepcopy(P["module"]).train()
    s, outputs = dyn.init(bound.ys0), []
    for k in range(4):
        w = dyn.point(s)
        bl.load_into(ref, bound.y_tree(w))
        with torch.no_grad():
            ref(P["data"][0][0])
        outputs.append(dyn.output(s))
        s = dyn.update(s, gfn(w, k), k)
    assert not all(torch.equal(a, b) for a, b in zip(dyn.point(s), dyn.output(s)))
    for k, b in ref.named_buffers():
        torch.testing.assert_close(res.buffers[k], b, rtol=1e-13, atol=1e-15)
    at_z = copy.deepcopy(P["module"]).train()  # the same passes at the outputs z_k differ
    for z in outputs:
        bl.load_into(at_z, bound.y_tree(z))
        with torch.no_grad():
            at_z(P["data"][0][0])
    assert not torch.allclose(dict(at_z.named_buffers())["1.running_var"],
                              res.buffers["1.running_var"], rtol=1e-9, atol=0)

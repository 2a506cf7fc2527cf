"""Meta-learning methods against exact references (float64).

* MAML: second-order autograd through a hand-written K-step loop (create_graph=True);
* FOMAML / ANIL / Meta-SGD: the same hand-written loops (first order: no graph through the steps);
  Meta-SGD's learning-rate gradient also against central finite differences;
* iMAML: the dense implicit-function-theorem formula (I + H/λ)^{-1} ∇L_query at the proximal
  solution, with H the dense Hessian of the support loss;
* R2D2: the Woodbury ridge head equals the primal dense solve; meta-gradient through it;
* every method: the vmapped meta-gradient equals the Python loop over tasks (1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import bilevel.meta as M
from bilevel import _tree as T
from bilevel.meta.models import features, linear

F64 = torch.float64


def _close(a, b, tol=1e-10):
    for u, v in zip(T.flatten(a)[0], T.flatten(b)[0]):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


def _sinusoid(n=3, shots=5):
    return M.SinusoidTasks(shots=shots, queries=4, seed=3, dtype=F64).next(n)


def _cls_tasks(n=3, ways=3, shots=2, queries=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"support_x": torch.randn(n, ways * shots, dim, generator=g, dtype=F64),
            "support_y": torch.arange(ways).repeat_interleave(shots).repeat(n, 1),
            "query_x": torch.randn(n, ways * queries, dim, generator=g, dtype=F64),
            "query_y": torch.arange(ways).repeat_interleave(queries).repeat(n, 1)}


def _x(learner, seed=0):
    return learner.init(torch.Generator().manual_seed(seed), F64)


def _leaves_rg(x):
    xs, spec = T.flatten(x)
    xs = tuple(t.clone().requires_grad_(True) for t in xs)
    return xs, spec


def _mse(out, y):
    return ((out - y) ** 2).mean()


SIN = M.MLPModel([1, 6, 6], 1)


def test_maml_equals_second_order_autograd_through_hand_written_loop():
    alpha, K = 0.05, 3
    tasks = _sinusoid()
    L = M.MAML(SIN, lr=alpha, steps=K, loss="mse")
    x = _x(L)
    xs, spec = _leaves_rg(x)
    total = 0.0
    for i in range(3):
        th = xs
        for _ in range(K):
            loss = _mse(SIN(T.unflatten(th, spec), tasks["support_x"][i]), tasks["support_y"][i])
            gr = torch.autograd.grad(loss, th, create_graph=True)
            th = tuple(t - alpha * gg for t, gg in zip(th, gr))
        total = total + _mse(SIN(T.unflatten(th, spec), tasks["query_x"][i]), tasks["query_y"][i])
    ref = T.unflatten(torch.autograd.grad(total / 3, xs), spec)
    for vmap in (True, False):
        g, info = L.meta_grad(x, tasks, vmap=vmap)
        _close(g, ref)
        assert info["vmapped"] is vmap
    # the second-order terms matter here: FOMAML differs
    g1, _ = M.FOMAML(SIN, lr=alpha, steps=K, loss="mse").meta_grad(x, tasks)
    assert max(float((u - v).abs().max()) for u, v in zip(T.flatten(g1)[0], T.flatten(ref)[0])) > 1e-4


def test_fomaml_is_query_gradient_at_adapted_parameters():
    alpha, K = 0.05, 2
    tasks = _sinusoid()
    L = M.FOMAML(SIN, lr=alpha, steps=K, loss="mse")
    x = _x(L)
    acc = None
    for i in range(3):
        th, spec = _leaves_rg(x)
        for _ in range(K):
            loss = _mse(SIN(T.unflatten(th, spec), tasks["support_x"][i]), tasks["support_y"][i])
            gr = torch.autograd.grad(loss, th)
            th = tuple((t - alpha * gg).detach().requires_grad_(True) for t, gg in zip(th, gr))
        q = _mse(SIN(T.unflatten(th, spec), tasks["query_x"][i]), tasks["query_y"][i])
        gq = torch.autograd.grad(q, th)
        acc = gq if acc is None else T.add(acc, gq)
    ref = T.unflatten(T.scale(acc, 1 / 3), spec)
    for vmap in (True, False):
        _close(L.meta_grad(x, tasks, vmap=vmap)[0], ref)


def test_anil_adapts_only_the_head():
    alpha, K, ways = 0.3, 2, 3
    model = M.MLPModel([4, 5], ways)
    tasks = _cls_tasks(ways=ways)
    L = M.ANIL(model, lr=alpha, steps=K, ways=ways)
    x = _x(L)
    xs, spec = _leaves_rg(x)
    xt = T.unflatten(xs, spec)
    total = 0.0
    for i in range(3):
        head = xt["head"]
        for _ in range(K):
            out = linear(head, features(xt["body"], tasks["support_x"][i]))
            loss = Fn.cross_entropy(out, tasks["support_y"][i])
            gw, gb = torch.autograd.grad(loss, (head["weight"], head["bias"]), create_graph=True)
            head = {"weight": head["weight"] - alpha * gw, "bias": head["bias"] - alpha * gb}
        out = linear(head, features(xt["body"], tasks["query_x"][i]))
        total = total + Fn.cross_entropy(out, tasks["query_y"][i])
    ref = T.unflatten(torch.autograd.grad(total / 3, xs), spec)
    for vmap in (True, False):
        _close(L.meta_grad(x, tasks, vmap=vmap)[0], ref)


def test_metasgd_learning_rate_gradient_matches_finite_differences():
    tasks = _sinusoid(n=2)
    L = M.MetaSGD(SIN, lr0=0.05, loss="mse")
    x = _x(L)
    x["lr"]["head"]["bias"] = torch.tensor([0.07], dtype=F64)  # not all rates equal
    g, _ = L.meta_grad(x, tasks)
    _close(g, L.meta_grad(x, tasks, vmap=False)[0])

    def h(xx):
        return float(L.evaluate(xx, tasks)["loss"].mean())

    eps = 1e-6
    for key in ("head", "body"):
        for name, t in x["lr"][key].items():
            for j in range(min(2, t.numel())):
                xp = torch.utils._pytree.tree_map(torch.clone, x)
                xm = torch.utils._pytree.tree_map(torch.clone, x)
                xp["lr"][key][name].view(-1)[j] += eps
                xm["lr"][key][name].view(-1)[j] -= eps
                fd = (h(xp) - h(xm)) / (2 * eps)
                assert abs(float(g["lr"][key][name].view(-1)[j]) - fd) <= 1e-7 + 1e-6 * abs(fd)
    assert float(g["lr"]["head"]["weight"].abs().max()) > 1e-3  # the rates do get a gradient


def test_imaml_equals_dense_implicit_function_theorem():
    lam = 2.0
    tasks = _sinusoid(n=2)
    L = M.IMAML(SIN, lam=lam, inner=M.maml.GD(lr=0.1, steps=150), cg_iters=60, loss="mse")
    x = _x(L)
    xs, spec = T.flatten(x)
    refs = []
    for i in range(2):
        task = {k: v[i] for k, v in tasks.items()}
        res = L.estimator()(L.problem(task), x, L.start(x))
        ys = T.flatten(res.y)[0]
        v = T.to_vector(ys)

        def support(vec, ys=ys, task=task):
            return _mse(SIN(T.unflatten(T.from_vector(vec, ys), spec), task["support_x"]),
                        task["support_y"])

        def query(vec, ys=ys, task=task):
            return _mse(SIN(T.unflatten(T.from_vector(vec, ys), spec), task["query_x"]),
                        task["query_y"])

        # y is the proximal solution: ∇L(y) + λ (y − x) = 0
        stat = torch.func.grad(support)(v) + lam * (v - T.to_vector(xs))
        assert float(stat.norm()) < 1e-9
        H = torch.func.hessian(support)(v)
        gq = torch.func.grad(query)(v)
        dense = torch.linalg.solve(torch.eye(len(v), dtype=F64) + H / lam, gq)
        torch.testing.assert_close(T.to_vector(T.flatten(res.grad)[0]), dense, rtol=1e-9, atol=1e-11)
        refs.append(dense)
    for vmap in (True, False):  # bl.hypergrad.vmap (masked CG) and the loop
        g, info = L.meta_grad(x, tasks, vmap=vmap)
        assert info["vmapped"] is vmap and info["breakdowns"] == 0
        assert info["inner_grad_norm"] < 1e-9  # the adaptation reached the proximal solution
        torch.testing.assert_close(T.to_vector(T.flatten(g)[0]), (refs[0] + refs[1]) / 2,
                                   rtol=1e-9, atol=1e-11)


def test_r2d2_woodbury_equals_dense_solve_and_meta_gradient():
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(6, 10, generator=g, dtype=F64)  # n = 6 shots < d = 10 features
    Y = Fn.one_hot(torch.arange(3).repeat(2), 3).to(F64)
    lam = 0.7
    dense = torch.linalg.solve(phi.T @ phi + lam * torch.eye(10, dtype=F64), phi.T @ Y)
    torch.testing.assert_close(M.ridge_head(phi, Y, lam), dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.ridge_head(phi, Y, lam, woodbury=False), dense, rtol=1e-12,
                               atol=1e-13)
    # the ridge head minimises its objective: gradient 2Φᵀ(ΦW − Y) + 2λW = 0
    W = M.ridge_head(phi, Y, lam)
    assert float((phi.T @ (phi @ W - Y) + lam * W).abs().max()) < 1e-12

    ways = 3
    model = M.MLPModel([4, 10], ways)
    tasks = _cls_tasks(ways=ways, shots=2)
    L = M.R2D2(model, ways=ways, lam0=0.5)
    x = _x(L)
    xs, spec = _leaves_rg(x)
    xt = T.unflatten(xs, spec)
    total = 0.0
    for i in range(3):  # autograd through the primal (d × d) dense solve
        P = features(xt["body"], tasks["support_x"][i])
        Yi = Fn.one_hot(tasks["support_y"][i], ways).to(F64)
        Wi = torch.linalg.solve(P.T @ P + xt["log_lam"].exp() * torch.eye(10, dtype=F64), P.T @ Yi)
        out = xt["scale"] * (features(xt["body"], tasks["query_x"][i]) @ Wi) + xt["bias"]
        total = total + Fn.cross_entropy(out, tasks["query_y"][i])
    ref = T.unflatten(torch.autograd.grad(total / 3, xs), spec)
    for vmap in (True, False):
        _close(L.meta_grad(x, tasks, vmap=vmap)[0], ref, tol=1e-9)


def test_protonet_logits_are_negative_squared_distances_to_prototypes():
    ways = 3
    model = M.MLPModel([4, 5], ways)
    tasks = _cls_tasks(ways=ways, shots=2)
    L = M.ProtoNet(model, ways=ways)
    x = _x(L)
    task = {k: v[0] for k, v in tasks.items()}
    s = features(x["body"], task["support_x"])
    protos = torch.stack([s[task["support_y"] == k].mean(0) for k in range(ways)])
    q = features(x["body"], task["query_x"])
    ref = -torch.cdist(q, protos) ** 2
    torch.testing.assert_close(L.query_outputs(x, task), ref, rtol=1e-10, atol=1e-12)
    _close(L.meta_grad(x, tasks, vmap=True)[0], L.meta_grad(x, tasks, vmap=False)[0])


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "imaml", "r2d2", "protonet"])
def test_vmap_equals_loop(name):
    ways = 3
    model = M.MLPModel([4, 5], ways)
    kw = {"ways": ways}
    if name in ("maml", "fomaml", "anil"):
        kw.update(lr=0.2, steps=2)
    if name == "imaml":  # CG stops at different iterations per task: the masks must match the loop
        kw.update(lam=0.5, inner=M.maml.GD(lr=0.3, steps=4), cg_iters=6, cg_tol=1e-3)
    L = M.METHODS[name](model, **kw)
    tasks = _cls_tasks(n=4, ways=ways, seed=2)
    x = _x(L, seed=4)
    a, ia = L.meta_grad(x, tasks, vmap=True)
    b, ib = L.meta_grad(x, tasks, vmap=False)
    _close(a, b)
    assert abs(ia["loss"] - ib["loss"]) < 1e-12


def test_iaptt_fewshot_equals_hand_written_pessimistic_truncation():
    """IAPTT-GM few-shot: per task k* = first argmax of the query loss along the head's K steps,
    meta-gradient of L(y_{k*}; query) w.r.t. body φ and head init z (autograd, float64)."""
    alpha, K, ways = 1.5, 4, 3  # a large step: the query loss is not monotone, so k* varies
    model = M.MLPModel([4, 5], ways)
    tasks = _cls_tasks(n=4, ways=ways, seed=5)
    for key in ("x", "y"):  # tasks 0, 1: query = support, so their query loss falls (k* = 1)
        tasks[f"query_{key}"][:2] = tasks[f"support_{key}"][:2]
    L = M.IAPTTFewShot(model, lr=alpha, steps=K, ways=ways)
    x = _x(L, seed=1)
    xs, spec = _leaves_rg(x)
    xt = T.unflatten(xs, spec)
    total, k_stars = 0.0, []
    for i in range(4):
        head, vals = xt["head"], []
        for _ in range(K):
            out = linear(head, features(xt["body"], tasks["support_x"][i]))
            loss = Fn.cross_entropy(out, tasks["support_y"][i])
            gw, gb = torch.autograd.grad(loss, (head["weight"], head["bias"]), create_graph=True)
            head = {"weight": head["weight"] - alpha * gw, "bias": head["bias"] - alpha * gb}
            vals.append(Fn.cross_entropy(linear(head, features(xt["body"], tasks["query_x"][i])),
                                         tasks["query_y"][i]))
        k = max(range(K), key=lambda j: (float(vals[j].detach()), -j))  # first maximiser
        k_stars.append(k + 1)
        total = total + vals[k]
    assert len(set(k_stars)) > 1, k_stars  # the truncation point differs between tasks
    ref = T.unflatten(torch.autograd.grad(total / 4, xs), spec)
    for vmap in (True, False):
        g, info = L.meta_grad(x, tasks, vmap=vmap)
        _close(g, ref)
        if not vmap:
            assert info["k_star_mean"] == sum(k_stars) / 4
    anil, _ = M.ANIL(model, lr=alpha, steps=K, ways=ways).meta_grad(x, tasks)  # no truncation
    assert max(float((u - v).abs().max()) for u, v in zip(T.flatten(anil)[0], T.flatten(ref)[0])) > 1e-4


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("name", ["imaml", "maml"])
def test_meta_training_under_compiled_oracles_compiles_once_and_equals_eager(name):
    """``bl.solve(..., compile="oracles")`` of a meta-training run (tasks one by one): iMAML's
    per-task oracles become kernels compiled in the first step only (every step and task share
    the learner's one ``batched_problem``; a new problem per step compiled every step), MAML's
    unrolled loss is a ``torch.func`` transform, inside which no capture is attempted (dynamo
    refuses it: one failed capture and warning per step before); the iterates equal eager."""
    import warnings

    import bilevel as bl
    from bilevel import compiled as C

    L = (M.IMAML(SIN, lam=4.0, inner=M.maml.GD(lr=0.1, steps=40), cg_iters=5, loss="mse")
         if name == "imaml" else M.MAML(SIN, lr=0.05, steps=3, loss="mse"))
    x = _x(L)

    def run(compile, steps):
        S = M.SinusoidTasks(shots=5, queries=4, seed=3, dtype=F64)
        return bl.solve(M.train.meta_problem(L, S.next(2)), x, torch.zeros(1, dtype=F64),
                        solver=M.MetaTraining(L, S, 2, vmap=False), steps=steps,
                        compile=compile, track=False)

    ref = run(False, 3)
    C.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CompileFallbackWarning)
        run("oracles", 1)
        first = C.stats()["compiles"]
        res = run("oracles", 3)
    if name == "imaml":  # (MAML: every oracle inside the transform, no kernel)
        assert first > 0
    assert C.stats()["compiles"] == first and C.stats()["fallbacks"] == 0
    _close(res.x, ref.x, 1e-9)


def _episodes(seed, ways=3):
    X = torch.randn(60, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    return M.Episodes(X, torch.arange(6).repeat(10), list(range(6)), ways, 2, 2, seed=seed)


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("name,vmap", [("maml", True), ("maml", False), ("protonet", True),
                                       ("imaml", True), ("r2d2", True), ("metasgd", True),
                                       ("metasgd", False)])
def test_meta_training_as_one_compiled_graph_equals_eager(name, vmap):
    """``bl.solve(..., compile=True)`` of vmapped meta-training: the task batch is drawn and
    checked before the step (``prepare``), the step — every task's adaptation and meta-gradient
    under ``torch.func.vmap``, the outer Adam step — is one graph. Iterates, per-step metrics and
    oracle counts equal eager; the consumed task batch is not left in the state; a second run
    (new solver, new sampler) compiles nothing and probes nothing (the trimmed guards' check
    failed on every pytree guard before, so each run traced its pattern anew). MAML task by task
    (``vmap=False``) differentiates its unrolled loss with ``torch.func.grad_and_value``: the
    checks recorded inside it leave the transform as outputs (a flag kept from inside made AOT
    autograd fail: "Cannot access storage of TensorWrapper"). Meta-SGD failed the same way: the
    deferred check of its unrolled steps kept the bound dynamics for its error message, whose
    learned rate closes over the transform's x."""
    import bilevel as bl
    from bilevel import compiled as C

    kw = {"maml": {"lr": 0.2, "steps": 2},
          "imaml": {"lam": 0.5, "inner": M.maml.GD(lr=0.3, steps=4), "cg_iters": 6, "cg_tol": 1e-3}
          }.get(name, {})  # (iMAML: CG stops at different iterations per task, masked in the graph)
    L = M.METHODS[name](M.MLPModel([4, 5], 3), ways=3, **kw)
    x = _x(L, seed=4)
    P = M.train.meta_problem(L, _episodes(9).next(4))

    def run(compile):
        return bl.solve(P, x, torch.zeros(1, dtype=F64),
                        solver=M.MetaTraining(L, _episodes(1), 4, vmap=vmap),
                        steps=4, compile=compile, track=False)

    ref = run(False)
    res = run(True)
    assert [r["compiled"] for r in res.history] == [False, True, True, True]  # (1st: the probe)
    before = dict(C.stats())
    again = run(True)
    assert all(r["compiled"] for r in again.history)
    assert C.stats()["compiles"] == before["compiles"] and C.stats()["eager_steps"] == before["eager_steps"]
    for out in (res, again):
        _close(out.x, ref.x, 1e-12)
        assert "tasks" not in out.state and out.state["counts"] == ref.state["counts"]
        for a, b in zip(ref.history, out.history):
            assert b["meta_loss"] == pytest.approx(a["meta_loss"], rel=1e-12)
            assert b["meta_grad_norm"] == pytest.approx(a["meta_grad_norm"], rel=1e-12)


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
def test_a_compiled_meta_step_with_a_bad_task_raises_the_eager_error():
    """A NaN in one task's support set: the compiled step's deferred check fails, the step reruns
    eagerly from the state before it and raises hypergrad.vmap's own error naming the task."""
    import bilevel as bl
    from bilevel.errors import NonFiniteError

    L = M.MAML(M.MLPModel([4, 5], 3), ways=3, lr=0.2, steps=2)
    x = _x(L, seed=4)
    P = M.train.meta_problem(L, _episodes(9).next(4))

    class Poisoned:
        def __init__(self):
            self.inner, self.k = _episodes(1), 0

        def next(self, n):
            t, self.k = self.inner.next(n), self.k + 1
            if self.k == 3:  # the third meta-step (patterns are compiled by then)
                t["support_x"][2, 0, 0] = float("nan")
            return t

    with pytest.raises(NonFiniteError, match="task 2 of 4") as err:
        bl.solve(P, x, torch.zeros(1, dtype=F64), solver=M.MetaTraining(L, Poisoned(), 4), steps=4,
                 compile=True, track=False)
    assert err.value.outer_step == 3 and [r["compiled"] for r in err.value.partial.history][1:] == [True]


def test_task_parallel_meta_training_says_why_its_step_is_not_one_graph():
    L = M.MAML(M.MLPModel([4, 5], 3), ways=3, lr=0.2, steps=2)
    assert M.MetaTraining(L, _episodes(1), 4).step_not_compilable is None  # (no process group)
    assert "all-reduces" in M.MetaTraining(L, _episodes(1), 4, task_parallel=True).step_not_compilable

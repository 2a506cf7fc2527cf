"""Whole-step compiled mode (``bl.solve(..., compile="step")``, :mod:`bilevel.compiled_step`):
one graph per outer iteration, equal to eager (float64, same batches, same oracle counts), no
recompiles on new batches or new step counters, random truncations and periodic restarts handled
by patterns, exact resume, a fallback with the reason, errors still raised.

``aot_eager`` backend (dynamo capture with ``fullgraph=True``, no code generation) keeps it fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel import compiled as C
from bilevel.errors import ConfigError, NonFiniteError

pytestmark = [pytest.mark.compiled, pytest.mark.usefixtures("aot_eager")]  # fixtures: conftest
S = bl.solvers


SOLVERS = {
    # decaying schedules: the step counter is symbolic inside the graph
    "SOBA": lambda: S.SOBA(),
    # random truncation p drawn in prepare(): one pattern per p
    "TTSA": lambda: S.TTSA(Q=2),
    # restarts on drawn large batches every 2 steps: Solver.phase (several graphs: slow to trace)
    "VRBO": lambda: S.VRBO(Q=1, inner_steps=1, period=2, large_batches=2),
    # a deterministic-family solver: an estimator (lower GD + CG in traced mode) inside the step,
    # its metrics returned as tensors and read by solve after the step
    "HGD-CG": lambda: S.HypergradientDescent(bl.hypergrad.CG(bl.inner.GD(lr=0.2, steps=3), iters=3),
                                             upper=0.3),
}
SLOW = {"VRBO"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in SOLVERS])
def test_whole_step_equals_eager(tiny, name):
    kw = dict(batch_size=4, seed=0)
    make = SOLVERS[name]
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=7, track=False)
    first = C.stats()["compiles"]
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=7, track=False, compile="step")
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(comp.y, eager.y, rtol=1e-12, atol=1e-14)
    if name == "SOBA":  # one pattern, one graph: the step counter is symbolic from the start
        assert C.stats()["compiles"] - first == 1
    assert comp.state["counts"] == eager.state["counts"]
    assert _same(comp.state["data"], eager.state["data"])  # samplers at the same position
    flags = [r["compiled"] for r in comp.history]
    assert flags[0] is False and any(flags)  # the first step probes its pattern eagerly
    for rc, re in zip(comp.history, eager.history):  # the per-step metrics, as Python numbers
        for k, v in re.items():
            if k not in ("time", "compiled"):
                assert type(rc[k]) is type(v), k
                assert rc[k] == (pytest.approx(v, rel=1e-10) if isinstance(v, float) else v), k
    if name != "SOBA":
        return
    # later runs: patterns known (every step compiled); new batches (another seed) and new step
    # counters cause no recompile
    bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=7, track=False, compile="step")
    before = C.stats()["compiles"]
    again = bl.solve(**tiny.solve_kwargs(batch_size=4, seed=5), solver=make(), steps=9,
                     track=False, compile="step")
    ref = bl.solve(**tiny.solve_kwargs(batch_size=4, seed=5), solver=make(), steps=9, track=False)
    torch.testing.assert_close(again.x, ref.x, rtol=1e-12, atol=1e-14)
    assert C.stats()["compiles"] == before
    assert all(r["compiled"] for r in again.history)


def test_runs_of_draws_are_gathered_in_the_graph(tiny, monkeypatch):
    """StocBiO's runs of lower draws (3 inner steps, Q + 1 = 3 products) are drawn as the rows of
    their batches at once (``Minibatches.next_rows``), gathered inside the graph: the eager run's
    iterates, counts and sampler positions, and one graph although the epochs (6 batches) end
    inside the runs at changing positions."""
    from bilevel.sampling import Minibatches

    sizes = []
    rows = Minibatches.next_rows
    monkeypatch.setattr(Minibatches, "next_rows", lambda self, k: sizes.append(k) or rows(self, k))
    kw = dict(batch_size=4, seed=0)
    make = lambda: S.StocBiO(inner_steps=3, Q=2)  # noqa: E731
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=8, track=False)
    assert sizes == []  # (eager steps draw one batch at a time)
    first = C.stats()["compiles"]
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=8, track=False, compile="step")
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(comp.y, eager.y, rtol=1e-12, atol=1e-14)
    assert comp.state["counts"] == eager.state["counts"]
    assert _same(comp.state["data"], eager.state["data"])
    assert sizes == [3, 1, 3] * sum(r["compiled"] for r in comp.history) != []  # inner, F, Neumann
    assert C.stats()["compiles"] - first == 1


def test_sampler_positions_and_exact_resume(tiny):
    kw = dict(batch_size=4, seed=2)
    full = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=6, track=False)
    lower, upper = tiny.samplers(**kw)
    args = dict(problem=tiny.problem, x0=tiny.x0, y0=tiny.y0, lower_data=lower, upper_data=upper)
    first = bl.solve(**args, solver=S.SOBA(), steps=3, track=False, compile="step")
    rest = bl.solve(**args, solver=S.SOBA(), steps=6, track=False, compile="step",
                    state=first.state)
    torch.testing.assert_close(rest.x, full.x, rtol=1e-12, atol=1e-14)
    assert rest.state["counts"] == full.state["counts"]


def test_fallback_with_reason_when_a_step_cannot_be_captured(tiny):
    base = tiny.problem

    def lower(x, y, batch):  # .item() control flow: no single graph
        g = base.lower(x, y, batch)
        return g * 2 if g.item() > 1e12 else g

    problem = bl.Problem(base.upper, lower, name="item-lower")
    kw = dict(batch_size=4, seed=0)
    lo, up = tiny.samplers(**kw)
    eager = bl.solve(problem, tiny.x0, tiny.y0, solver=S.SOBA(), steps=4, track=False,
                     lower_data=lo, upper_data=up)
    lo, up = tiny.samplers(**kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        comp = bl.solve(problem, tiny.x0, tiny.y0, solver=S.SOBA(), steps=4, track=False,
                        lower_data=lo, upper_data=up, compile="step")
    msgs = [str(m.message) for m in w if issubclass(m.category, C.CompileFallbackWarning)]
    assert any("could not be captured as one graph" in m and "reason:" in m for m in msgs)
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    assert comp.state["counts"] == eager.state["counts"]


def test_non_finite_values_still_raise(tiny):
    lo, up = tiny.samplers(batch_size=4, seed=0)
    bad = tuple(t.clone() for t in up.full())
    bad[0][:] = float("nan")
    upper = bl.sampling.Minibatches(*bad, batch_size=4, seed=0)
    with pytest.raises(NonFiniteError):
        bl.solve(tiny.problem, tiny.x0, tiny.y0, solver=S.SOBA(), steps=4, track=False,
                 lower_data=lo, upper_data=upper, compile="step")


def test_a_failed_backend_reports_its_own_error():
    """dynamo's BackendCompilerFailed says only "backend=... raised:" on its first line; the
    fallback reason is the backend's error instead (it was an empty reason)."""
    def backend(gm, example_inputs):
        raise NotImplementedError("no kernel for this op\nsecond line")

    with pytest.raises(Exception) as err:
        torch.compile(lambda t: t.sin() + 1, backend=backend, fullgraph=True)(torch.ones(3))
    reason = C.reason_of(err.value)
    assert reason == "BackendCompilerFailed: NotImplementedError: no kernel for this op", reason
    assert C.reason_of(ValueError("a\nb")) == "ValueError: a"


def test_compile_setting_is_checked(tiny):
    with pytest.raises(ConfigError, match="compile must be"):
        bl.solve(**tiny.solve_kwargs(), solver=S.SOBA(), steps=1, compile="fast")


def test_loops_setting_is_checked(tiny, monkeypatch):
    from bilevel import compiled_step as CS

    monkeypatch.setitem(CS.settings, "loops", "scan")
    with pytest.raises(ConfigError, match="'unroll' or 'while_loop', got 'scan'"):
        bl.solve(**tiny.solve_kwargs(), solver=S.SOBA(), steps=1, compile="step")


def test_guards_setting_is_checked(tiny, monkeypatch):
    from bilevel import compiled_step as CS

    monkeypatch.setitem(CS.settings, "guards", "none")
    with pytest.raises(ConfigError, match="'trim' or 'full', got 'none'"):
        bl.solve(**tiny.solve_kwargs(), solver=S.SOBA(), steps=1, compile="step")


def test_trimmed_guards_drop_only_global_code_identity():
    """The filter keeps tensor, constant, local and global-state guards; it drops (and records)
    guards on which module / function / class / builtin a global name refers to."""
    import types

    from bilevel import compiled_step as CS

    if not CS._GUARD_FILTER:
        pytest.skip("this torch has no guard_filter_fn")
    from torch._dynamo.types import GuardFilterEntry

    def entry(kind, value, is_global=True, name="G['x']"):
        return GuardFilterEntry(name=name, has_value=True, value=value, guard_type=kind,
                                derived_guard_types=(), is_global=is_global, orig_guard=None)

    scope = {"m": types, "f": len}
    trim = CS._TrimGuards(scope)
    entries = [entry("TENSOR_MATCH", torch.zeros(1)), entry("CONSTANT_MATCH", True),
               entry("GLOBAL_STATE", None, is_global=False), entry("ID_MATCH", types, is_global=False),
               entry("MODULE_MATCH", types, name="G['m']"), entry("BUILTIN_MATCH", len, name="G['f']"),
               entry("CLOSURE_MATCH", CS._load, name="G['m'].__name__")]
    assert trim(entries) == [True, True, True, True, False, False, False]
    assert [n for n, _ in trim.dropped] == ["G['m']", "G['f']", "G['m'].__name__"]
    trim.dropped.pop()  # (a name of another object: checked below)
    assert trim.valid()
    scope["f"] = abs  # a rebound global: the graph's assumption no longer holds
    assert not trim.valid()
    del scope["f"]  # a name that no longer resolves
    assert not trim.valid()


def test_a_rebound_global_function_is_traced_again(tiny, monkeypatch):
    """Trimmed guards are checked once per run: a module function monkeypatched between two runs
    of the same problem and solver settings is used by the second run (not the stale graph)."""
    from bilevel.solvers.stochastic import soba

    kw = dict(batch_size=4, seed=0)
    bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=4, track=False, compile="step")
    plain = soba.soba_oracles

    def halved(*args, **kwargs):  # every oracle output halved: a different trajectory
        return tuple(tuple(0.5 * t for t in out) for out in plain(*args, **kwargs))

    monkeypatch.setattr(soba, "soba_oracles", halved)
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=4, track=False, compile="step")
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=4, track=False)
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    assert any(r["compiled"] for r in comp.history)
    monkeypatch.undo()
    unpatched = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=4, track=False)
    assert not torch.allclose(unpatched.x, eager.x)


def test_a_solver_that_cannot_be_one_graph_says_why(tiny):
    class NoGraph(S.SOBA):
        step_not_compilable = "this solver's step reads a Python random number"

    kw = dict(batch_size=4, seed=0)
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=NoGraph(), steps=3, track=False)
    with pytest.warns(C.CompileFallbackWarning, match="reads a Python random number"):
        comp = bl.solve(**tiny.solve_kwargs(**kw), solver=NoGraph(), steps=3, track=False,
                        compile="step")
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    assert not any(r["compiled"] for r in comp.history)


@pytest.mark.parametrize("init_memory", ["zero", "full"])
def test_saba_is_one_graph_for_every_batch_index(tiny, init_memory):
    """SABA's SAGA memories in compiled steps: stacked tensors indexed by the drawn batch index as
    a tensor, so one graph serves every index; iterates, memories and counts equal eager; a
    compiled run's state resumes eagerly (back to the row form) like the uninterrupted run."""
    kw = dict(batch_size=4, seed=0, kind="fixed")
    make = lambda: S.SABA(lr_x=0.2, lr_y=0.5, init_memory=init_memory)  # noqa: E731
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=9, track=False)
    before = C.stats()["compiles"]
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=6, track=False, compile="step")
    lo, _ = tiny.samplers(**kw)
    drawn = [(lo.next(), lo.last_index)[1] for _ in range(6)]  # the lower batch of each step
    compiled = [i for i, r in zip(drawn, comp.history) if r["compiled"]]
    assert len(compiled) >= 4 and len(set(compiled)) >= 3  # several indices ...
    assert C.stats()["compiles"] - before == 1  # ... one graph
    table = comp.state["memory"]["gy"]
    assert table._stacked is not None
    resumed = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=9, track=False,
                       state=comp.state)
    assert table._stacked is not None  # (the resumed run copied the state: never mutated)
    torch.testing.assert_close(resumed.x, eager.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed.y, eager.y, rtol=1e-12, atol=1e-14)
    assert resumed.state["counts"] == eager.state["counts"]
    for key, tab in eager.state["memory"].items():
        got = resumed.state["memory"][key]
        torch.testing.assert_close(got.mean, tab.mean, rtol=1e-12, atol=1e-14)
        for a, b in zip(got.memory, tab.memory):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    seed = [M.clone() for tab in comp.state["memory"].values() for M in tab._stacked]
    for _ in range(2):  # compiled resumes write rows in place: never into the state they copied
        again = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=9, track=False,
                         state=comp.state, compile="step")
        torch.testing.assert_close(again.x, eager.x, rtol=1e-12, atol=1e-14)
        assert sum(r["compiled"] for r in again.history) == 3
        now = [M for tab in comp.state["memory"].values() for M in tab._stacked]
        assert all(torch.equal(a, b) for a, b in zip(seed, now))


def test_saba_compiled_failure_keeps_the_memories_of_the_last_good_state(tiny):
    """A compiled SABA step that diverges raises like eager; its partial result (the state before
    the failing step) has the memories of the eager run's partial result: the failing step's rows
    were not written, earlier steps' were."""
    kw = dict(batch_size=4, seed=0, kind="fixed")
    make = lambda: S.SABA(lr_x=0.1, lr_y=40.0)  # noqa: E731  (diverges after a few steps)
    errs = []
    for compile in (False, "step", "step"):  # (the second compiled run: every step compiled)
        with pytest.raises(NonFiniteError) as info:
            bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=200, track=False,
                     compile=compile)
        errs.append(info.value)
    eager, _, comp = errs
    assert comp.outer_step == eager.outer_step > 3
    assert sum(r["compiled"] for r in comp.partial.history) == len(comp.partial.history)
    torch.testing.assert_close(comp.partial.x, eager.partial.x, rtol=1e-12, atol=1e-14)
    for key, tab in eager.partial.state["memory"].items():
        got = comp.partial.state["memory"][key]
        torch.testing.assert_close(got.mean, tab.mean, rtol=1e-12, atol=1e-14)
        for a, b in zip(got.memory, tab.memory):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["stocBiO", "BSA", "STABLE"])
def test_inner_loop_as_while_loop_equals_eager(tiny, monkeypatch, name):
    """``settings["loops"] = "while_loop"``: the inner SGD loop of the double-loop solvers is one
    ``while_loop`` over the stacked pre-drawn batches: same iterates, counts, sampler positions."""
    from bilevel import compiled_step as CS

    make = {"stocBiO": lambda: S.StocBiO(inner_steps=3, Q=2),
            "BSA": lambda: S.BSA(inner_steps=3, Q=2), "STABLE": lambda: S.STABLE(Q=3)}[name]
    kw = dict(batch_size=4, seed=3)
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=4, track=False)
    monkeypatch.setitem(CS.settings, "loops", "while_loop")
    CS._CODE.clear()  # (patterns recorded with unrolled graphs by earlier tests)
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=4, track=False, compile="step")
    assert any(r["compiled"] for r in comp.history)
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(comp.y, eager.y, rtol=1e-12, atol=1e-14)
    assert comp.state["counts"] == eager.state["counts"]
    assert _same(comp.state["data"], eager.state["data"])
    CS._CODE.clear()


def test_while_loop_inner_loop_still_reports_non_finite_iterates(tiny, monkeypatch):
    """lr_y = 30 makes the lower iterate grow ~27× per inner step: from 1e299 a compiled step
    overflows inside the while_loop; the run stops there with the eager step's exact error."""
    from bilevel import compiled_step as CS

    monkeypatch.setitem(CS.settings, "loops", "while_loop")
    CS._CODE.clear()
    make = lambda: S.StocBiO(inner_steps=3, Q=1, lr_y=30.0)  # noqa: E731
    bl.solve(**tiny.solve_kwargs(batch_size=4, seed=3), solver=make(), steps=6, track=False,
             compile="step")  # (records the patterns: no eager probe below)
    huge = {**tiny.solve_kwargs(batch_size=4, seed=3), "y0": torch.full_like(tiny.y0, 1e299)}
    with pytest.raises(NonFiniteError, match="lower-level iterate at step 1 of GD.*outer step 3"):
        bl.solve(**huge, solver=make(), steps=6, track=False, compile="step")
    CS._CODE.clear()


def test_while_loop_carries_the_finiteness_of_every_inner_iterate(tiny):
    """The carried flag of the while_loop form (run here eagerly, in traced mode) is False as soon
    as one inner iterate is non-finite, even if later ones are finite again (a projection)."""
    from bilevel import _trace
    from bilevel.estimates import _gd, _sgd_while_loop

    lo, _ = tiny.samplers(batch_size=4, seed=0)
    stacked = tuple(torch.stack(ts) for ts in zip(*[lo.next() for _ in range(3)]))
    ctx = bl.solvers.base.Context(tiny.problem, bl._tree.flatten(tiny.x0)[1], bl._tree.flatten(tiny.y0)[1])
    for y0, clip, ok in ((tiny.y0, None, True), (torch.full_like(tiny.y0, 1e307), None, False),
                         (torch.full_like(tiny.y0, 1e307), lambda t: torch.nan_to_num(t), False)):
        with _trace.traced() as checks:
            _sgd_while_loop(_gd(30.0, 3, clip), ctx.G, stacked, (tiny.x0,), (y0,), 3, 30.0, clip)
        assert bool(checks[-1].ok) is ok


def test_trimmed_guards_check_names_that_use_builtins():
    """dynamo names some guarded objects through builtins (pytree's registry:
    ``list(dict.keys(G['...'].SUPPORTED_NODES))[0]``); the once-per-run check must evaluate them
    (without builtins it raised, counted as a rebinding: every run traced its patterns anew)."""
    import types

    from bilevel.compiled_step import _TrimGuards

    reg = {"a": 1}
    trim = _TrimGuards({"m": types.SimpleNamespace(D=reg)})
    trim.dropped.append(("list(dict.keys(G['m'].D))[0]", next(iter(reg))))
    assert trim.valid()
    trim.dropped.append(("G['m'].D", {"a": 1}))  # (an equal but different object: rebound)
    assert not trim.valid()


@pytest.mark.parametrize("name", ["RHG", "VPBGD", "PrimalDualVF"])
def test_deterministic_steps_are_one_graph_and_equal_eager(tiny, name):
    """RHG differentiates its unrolled loop with ``torch.func.grad_and_value`` inside the graph;
    the inner steps' deferred checks leave the transform as outputs. Before, a check flag kept
    from inside it made AOT autograd fail ("Cannot access storage of TensorWrapper") and RHG fell
    back to per-oracle kernels. VPBGD read its penalty metric on the host, and PrimalDualVF kept
    its multiplier λ as a Python float (a new pattern, so an eager step, at every step)."""
    import warnings

    kw = dict(batch_size=4, seed=0)
    make = {"RHG": lambda: S.RHG(bl.inner.GD(0.2, 5), 0.3),
            "VPBGD": lambda: S.VPBGD(bl.inner.GD(0.2, 5), 0.05),
            "PrimalDualVF": lambda: S.PrimalDualVF(bl.inner.GD(0.2, 5), 0.05)}[name]
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=5, track=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CompileFallbackWarning)
        comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=5, track=False, compile=True)
    assert any(r["compiled"] for r in comp.history)
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    assert comp.state["counts"] == eager.state["counts"]


def test_iapttgm_step_is_one_graph_with_its_truncation_held_in_the_graph():
    """IAPTT-GM's truncation k* (the first maximiser of f along the lower trajectory) was read on the
    host (``Tensor.tolist()``), so its step fell back to per-oracle kernels. Inside the graph k* is
    a tensor and all K steps are recomputed with those after k* held (``bl.inner.Stopped``): the
    same iterates as eager while k* changes from step to step (here 2, 2, 2, 1, 6, 5), k*
    reported per step, and K differentiated steps counted each step (eager counts k*)."""
    import warnings

    prob = bl.Problem(upper=lambda x, y: y.sum() + 0.3 * (x * y).sum(),
                      lower=lambda x, y: 0.5 * ((y - x) ** 2).sum() + 0.01 * (y**4).sum())
    x0 = torch.tensor([0.0, 0.2], dtype=torch.float64)
    z0 = torch.tensor([1.0, 0.6], dtype=torch.float64)

    def make():
        return S.IAPTTGM(bl.inner.GD(lr=1.9, steps=6), 0.4)

    eager = bl.solve(prob, x0, z0, solver=make(), steps=6, track=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CompileFallbackWarning)
        comp = bl.solve(prob, x0, z0, solver=make(), steps=6, track=False, compile=True)
    k_eager = [r["k_star"] for r in eager.history]
    assert len(set(k_eager)) > 1 and min(k_eager) < 6  # (the truncation really moves)
    assert [r["k_star"] for r in comp.history] == k_eager
    assert [r["compiled"] for r in comp.history] == [False] + [True] * 5
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(comp.state["z"], eager.state["z"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(comp.y, eager.y, rtol=1e-12, atol=1e-14)
    # eager: K + k* lower gradients and k* products per step; compiled (and the eager step that
    # records the pattern, whose counts the compiled steps repeat): 2K and K
    assert eager.state["counts"]["lower"] == {"grad": 6 * 6 + sum(k_eager), "hvp": sum(k_eager),
                                              "cross": sum(k_eager)}
    assert comp.state["counts"]["lower"] == {"grad": 12 * 6, "hvp": 6 * 6, "cross": 6 * 6}


@pytest.mark.parametrize("trials", [3, 1])
def test_backtracked_bda_step_is_one_graph_and_a_longer_search_reruns_eagerly(trials, monkeypatch):
    """BDA's Armijo search (``adaptive=True``, the default) read f on the host, so its step fell
    back. In the graph the trial steps are a tensor (``BDA.graph_state``) and each search tries
    ``GRAPH_TRIALS`` halvings; a search that needs more fails a ``redo`` check and that step runs
    again eagerly. On the LLC toy from a start that backtracks (up to 6 halvings per outer step
    after the first): the iterates, the steps used, the halvings and the new trials equal eager;
    with 3 trials every step after the probes is one graph, with 1 exactly the steps that halved
    are rerun eagerly."""
    import warnings

    from bilevel.problems import llc_toy
    from bilevel.solvers import bda

    monkeypatch.setattr(bda, "GRAPH_TRIALS", trials)
    toy = llc_toy(n=4, x0=2.0, y0=-2.0)  # (a new problem: no graph of another test's setting)
    x0, y0 = toy.start()

    def run(**kw):
        solver = S.BDA(bl.inner.GD(lr=0.5, steps=6), mu=0.5, s_u=10.0,
                       upper=bl.inner.Adam(lr=0.05, betas=(0.9, 0.9)))
        return bl.solve(toy.problem, x0, y0, solver=solver, steps=10, track=False,
                        x_projection=toy.x_projection, **kw)

    eager = run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CompileFallbackWarning)
        comp = run(compile=True)
    halved = [r["backtracks"] > 0 for r in eager.history]
    assert sum(halved[2:]) >= 3  # (the searches really work after the probes)
    want = [True] * 8 if trials == 3 else [not h for h in halved[2:]]
    assert [r["compiled"] for r in comp.history] == [False, False] + want
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    for key in ("backtracks", "s_u_min", "s_u_max"):
        assert [r[key] for r in comp.history] == [r[key] for r in eager.history]
    assert comp.state["est"]["s_u"].tolist() == eager.state["est"]["s_u"]


def test_a_float_that_changes_every_step_falls_back_naming_the_entry(tiny):
    """A Python float in the state that changes every step makes every step a new pattern (an
    eager probe): after SCALAR_PATTERNS such values the run falls back with a warning that names
    the entry (it ran up to MAX_PATTERNS = 32 eager steps without a word); the results stay
    those of the eager run."""
    from bilevel import compiled_step as CS

    class Drifting(S.SOBA):
        def init(self, ctx, xs, ys):
            return {**super().init(ctx, xs, ys), "c": 0.0}

        def step(self, ctx, state, t):
            out = super().step(ctx, state, t)
            state["c"] = state["c"] + 0.5
            return out

    kw = dict(batch_size=4, seed=0)
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=Drifting(), steps=8, track=False)
    with pytest.warns(C.CompileFallbackWarning, match="'c' is a Python float that changes"):
        comp = bl.solve(**tiny.solve_kwargs(**kw), solver=Drifting(), steps=8, track=False,
                        compile=True)
    assert sum(not r["compiled"] for r in comp.history) == 8  # (probes, then per-oracle kernels)
    assert len(CS._patterns(tiny.problem, Drifting)) <= CS.SCALAR_PATTERNS + 1  # (not 32)
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
    assert comp.state["c"] == eager.state["c"] == 4.0

"""State is data: estimators and solvers keep nothing on the object, so runs are repeatable and a
resumed run is bit-identical to the uninterrupted one (issue 11, "Foundation first").

* an estimator's state goes in and comes out (``est(..., state=s) -> res.state``); the state passed in
  is never mutated and equal states give identical results;
* ``HypergradientDescent(ZerothOrder(...))`` and AID with a warm-started CG, stopped, saved with
  ``torch.save``, loaded and resumed, end bit-identical to the uninterrupted run;
* the same solver object run twice gives identical results and no attribute of the solver or of its
  estimator changes during a run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import CG, ZerothOrder
from tests.reference_problems import mixed

F64 = torch.float64
S = bl.solvers


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _equal(a, b) -> bool:
    """Exact (bitwise) equality of nested states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


def _attrs(obj, seen=None):
    """Every attribute of a bilevel object, recursively (tensors cloned), to detect mutation."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return "<seen>"
    seen.add(id(obj))
    out = {}
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif type(v).__module__.startswith("bilevel.") and hasattr(v, "__dict__"):
            out[k] = _attrs(v, seen)
        else:
            out[k] = v
    return out


def _solvers():
    ref = mixed()
    dyn = bl.inner.GD(lr=ref.lr, steps=5)
    return {
        "zeroth_order": S.HypergradientDescent(ZerothOrder(dyn, samples=3, mu=1e-4, seed=7),
                                               upper=bl.inner.Adam(lr=0.05)),
        "aid_cg_warm": S.AID(dyn, upper_lr=0.05, iters=3, warm_start_v=True),
    }


@pytest.mark.parametrize("name", ["zeroth_order", "aid_cg_warm"])
def test_resume_from_a_saved_state_is_bit_identical(name):
    ref = mixed()
    solver = _solvers()[name]
    kw = dict(solver=solver, track=False, y_projection=lambda t: t.clamp(-5, 5))
    full = bl.solve(ref.problem, ref.x, ref.y0, steps=6, **kw)
    part = bl.solve(ref.problem, ref.x, ref.y0, steps=3, **kw)
    saved = _roundtrip(part.state)
    rest = bl.solve(ref.problem, ref.x, ref.y0, steps=6, state=saved, **kw)
    assert torch.equal(rest.x, full.x) and torch.equal(rest.y, full.y)
    assert _equal(rest.state["est"], full.state["est"]) and _equal(rest.state["upper"], full.state["upper"])
    # a second solver object built the same way, and the same object run again: identical
    again = bl.solve(ref.problem, ref.x, ref.y0, steps=6, **kw)
    other = bl.solve(ref.problem, ref.x, ref.y0, steps=6, **{**kw, "solver": _solvers()[name]})
    assert torch.equal(again.x, full.x) and torch.equal(other.x, full.x)
    assert float((full.x - ref.x).norm()) > 0  # the run moved


@pytest.mark.parametrize("name", ["zeroth_order", "aid_cg_warm"])
def test_no_attribute_of_solver_or_estimator_changes_during_a_run(name):
    ref = mixed()
    solver = _solvers()[name]
    before = _attrs(solver)
    bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=3, track=False,
             y_projection=lambda t: t.clamp(-5, 5))
    after = _attrs(solver)
    assert after.keys() == before.keys()
    for k in before:
        a, b = before[k], after[k]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), k
            for kk in a:
                assert (torch.equal(a[kk], b[kk]) if isinstance(a[kk], torch.Tensor)
                        else a[kk] is b[kk] or a[kk] == b[kk]), (k, kk)
        else:
            assert a is b or a == b, k


def test_estimator_state_goes_in_and_comes_out():
    ref = mixed()
    est = ZerothOrder(bl.inner.GD(lr=ref.lr, steps=3), samples=4, mu=1e-4, seed=1)
    s0 = est.init(ref.problem, ref.x, ref.y0)
    assert set(s0) == {"rng"} and s0["rng"].dtype == torch.uint8
    frozen = copy.deepcopy(s0)
    a = est(ref.problem, ref.x, ref.y0, state=s0)
    b = est(ref.problem, ref.x, ref.y0, state=s0)
    c = est(ref.problem, ref.x, ref.y0)  # state=None is init(...)
    assert torch.equal(s0["rng"], frozen["rng"])  # never mutated
    assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, c.grad)
    assert torch.equal(a.info["directions"], b.info["directions"])
    d = est(ref.problem, ref.x, ref.y0, state=a.state)  # the next draw
    assert not torch.equal(d.info["directions"], a.info["directions"])
    assert _equal(_roundtrip(a.state), a.state)
    # the directions are those of a generator seeded like the estimator
    gen = torch.Generator().manual_seed(1)
    torch.testing.assert_close(a.info["directions"], torch.randn(4, 5, generator=gen, dtype=F64),
                               rtol=0, atol=0)


def test_bad_estimator_state_is_rejected():
    ref = mixed()
    est = CG(bl.inner.GD(lr=ref.lr, steps=3), iters=3, warm_start=True)
    with pytest.raises(bl.errors.ConfigError, match="state must be the dict"):
        est(ref.problem, ref.x, ref.y0, state=[1, 2])
    with pytest.raises(bl.errors.ConfigError, match=r"lacks \['v'"):
        est(ref.problem, ref.x, ref.y0, state={"rng": 0})


# --- bl.solve: resume pitfalls and errors with the outer step (issue 8, items 6 and 7) -----------
def _aid():
    ref = mixed()
    return ref, S.AID(bl.inner.GD(lr=ref.lr, steps=5), upper_lr=0.05, iters=3)


def test_solve_never_mutates_the_state_passed_in():
    ref, solver = _aid()
    part = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=2, track=False)
    frozen = copy.deepcopy(part.state)
    a = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=5, track=False, state=part.state)
    assert _equal(part.state, frozen)
    b = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=5, track=False, state=part.state)
    assert len(a.history) == len(b.history) == 3 and torch.equal(a.x, b.x)
    assert part.state["solver"] == "AID"


def test_resume_with_another_solver_or_other_shapes_is_rejected():
    ref, solver = _aid()
    part = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=2, track=False)
    with pytest.raises(bl.errors.ConfigError, match="made by solver AID, not SOBA"):
        bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(), steps=4, state=part.state)
    with pytest.raises(bl.errors.ConfigError, match=r"state's x has leaves .*\(5,\).* x0 has .*\(6,\)"):
        bl.solve(ref.problem, torch.zeros(6, dtype=F64), ref.y0, solver=solver, steps=4,
                 state=part.state)
    with pytest.raises(bl.errors.ConfigError, match="state's y has leaves"):
        bl.solve(ref.problem, ref.x, torch.zeros(3, dtype=F64), solver=solver, steps=4, state=part.state)
    with pytest.raises(bl.errors.ConfigError, match="needs the .state of a previous SolveResult"):
        bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=4, state={"x": 1})


def test_errors_name_the_outer_step_and_carry_the_partial_result():
    ref = mixed()
    # GD with a step far beyond 2/L diverges inside the lower loop once x has moved enough:
    # make it blow up at outer step 3 by a lower objective that turns NaN there
    calls = {"n": 0}
    f, g = ref.problem.upper, ref.problem.lower

    def g_bad(x, y):
        return g(x, y) * (float("nan") if calls["n"] >= 2 else 1.0)

    def count(t, x, y, rec):
        calls["n"] += 1

    problem = bl.Problem(f, g_bad)
    solver = S.RHG(bl.inner.GD(lr=ref.lr, steps=3), upper_lr=0.05)
    with pytest.raises(bl.NonFiniteError) as info:
        bl.solve(problem, ref.x, ref.y0, solver=solver, steps=6, track=False, callback=count)
    exc = info.value
    assert exc.outer_step == 3 and "outer step 3 of RHG" in str(exc) and exc.level == "lower"
    assert "step 1 of GD" in str(exc)  # the inner step is still named
    part = exc.partial
    assert len(part.history) == 2 and part.state["t"] == 2
    # the partial state is the last good one: resuming it (with a sane objective) equals the clean run
    clean = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=4, track=False)
    rest = bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=4, track=False, state=part.state)
    assert torch.equal(rest.x, clean.x) and torch.equal(part.x, bl.solve(
        ref.problem, ref.x, ref.y0, solver=solver, steps=2, track=False).x)


def test_non_bilevel_errors_get_a_note_and_the_partial_result():
    ref, solver = _aid()

    def g_raises(x, y):
        if float(x.detach().sum()) != float(ref.x.sum()):
            raise RuntimeError("user code failed")
        return ref.problem.lower(x, y)

    with pytest.raises(RuntimeError, match="user code failed") as info:
        bl.solve(bl.Problem(ref.problem.upper, g_raises), ref.x, ref.y0, solver=solver, steps=4,
                 track=False)
    assert info.value.outer_step == 2 and len(info.value.partial.history) == 1
    assert any("outer step 2 of AID" in n for n in info.value.__notes__)


@pytest.mark.parametrize("name", bl.solvers.stochastic.__all__)
def test_one_state_seeds_several_identical_resumes_for_every_stochastic_solver(name):
    """The state passed in is copied with everything mutable in it (generator states, SAGA
    tables, ...), so two resumes from it draw the same."""
    from bilevel.problems import stochastic_quadratic

    p = stochastic_quadratic(dim_x=3, dim_y=4, n_lower=32, n_upper=32, batch_size=8, seed=0)
    solver = getattr(bl.solvers, name)()

    def run(steps, state=None):
        lo, up = p.samplers(seed=0, batch_size=8, kind="fixed" if name in ("SABA", "SRBA") else "minibatch")
        return bl.solve(p.problem, p.x0, p.y0, solver=solver, steps=steps, lower_data=lo,
                        upper_data=up, track=False, state=state)

    part = run(2)
    a, b = run(5, part.state), run(5, part.state)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y), name
    assert not torch.equal(a.x, part.x)  # the resumed steps moved

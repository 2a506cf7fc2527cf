"""Host synchronisations per outer step (the GPU hot-path budget), counted on CPU."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import hostsync
from bilevel.sampling import Minibatches
from bilevel.solvers import base
from bilevel.solvers.base import Solver
from tests.distributed import workers as W


def test_counter_counts_conversions_and_restores():
    t = torch.ones(3)
    before = torch.Tensor.__float__
    with hostsync.count() as c:
        float(t.sum())
        bool(t.all())
        t[0].item()
        t.tolist()
        _ = t + 1  # no conversion
    assert c.calls == 4
    assert torch.Tensor.__float__ is before


def _soba_syncs(check_every: int, steps: int = 20) -> int:
    lo, up = W.data()
    with hostsync.count() as c:
        bl.solve(W.PROBLEM, *W.start(), solver=bl.solvers.SOBA(), steps=steps, track=False,
                 lower_data=Minibatches(*lo, batch_size=5), upper_data=Minibatches(*up, batch_size=5),
                 check_every=check_every)
    return c.calls


def test_soba_outer_loop_syncs_once_per_check_batch(monkeypatch):
    """SOBA's step (oracles, data, updates) never reads a value on the host; solve's
    finiteness checks of x and y cost one sync per ``check_every`` steps on the device path (what
    a GPU runs) and none where small CPU leaves are summarised on the host."""
    assert _soba_syncs(1) == 0 and _soba_syncs(10) == 0  # host summaries (small CPU leaves)
    monkeypatch.setattr(base, "_HOST_MAX", -1)  # every leaf on the device path
    assert _soba_syncs(1) == 20
    assert _soba_syncs(10) == 2


class _Blowup(Solver):
    """x ← 2x: finite until float64 overflows, then inf (at a known step)."""

    def step(self, ctx, state, t):
        state["x"] = tuple(u * 1e100 for u in state["x"])
        return {}


@pytest.mark.parametrize("check_every", [1, 3, 10])
def test_batched_finiteness_check_names_the_first_bad_step(check_every):
    P = bl.Problem(lambda x, y: (x * y).sum(), lambda x, y: ((y - x) ** 2).sum())
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(bl.NonFiniteError) as e:
        bl.solve(P, x, x.clone(), solver=_Blowup(), steps=20, track=False, check_every=check_every)
    assert e.value.step == 4 and e.value.level == "upper"  # 1e300 is finite, 1e400 is not


@pytest.mark.parametrize("check_every", [None, 1])
def test_a_blow_up_under_warnings_as_errors_is_the_non_finite_error(check_every):
    """The host summary ⟨x, 0⟩ meets inf: numpy's "invalid value" warning is silenced there, so
    under ``-W error`` the user gets the NonFiniteError, not a RuntimeWarning from numpy."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = _blowup_run(check_every=check_every)
    assert err.step == 4


class _BlowupThenRaise(_Blowup):
    """_Blowup whose step raises once x is non-finite (e.g. a solver that reads it)."""

    def step(self, ctx, state, t):
        if not all(bool(torch.isfinite(u).all()) for u in state["x"]):
            raise RuntimeError("x is not finite")
        return super().step(ctx, state, t)


def _blowup_run(**kw):
    P = bl.Problem(lambda x, y: (x * y).sum(), lambda x, y: ((y - x) ** 2).sum())
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(bl.NonFiniteError) as e:
        bl.solve(P, x, x.clone(), **{"solver": _Blowup(), "steps": 20, "track": False, **kw})
    return e.value


@pytest.mark.parametrize("check_every", [None, 1, 3, 10])
def test_small_cpu_iterates_fail_with_the_last_good_state_whatever_the_batching(check_every):
    """Small CPU iterates: the state before each pending step is kept, so a batched check names
    the first bad step (4) and carries the state after step 3 and the history up to it."""
    err = _blowup_run(check_every=check_every)
    assert err.step == err.outer_step == 4 and "outer step 4 of _Blowup" in str(err)
    part = err.partial
    assert [r["step"] for r in part.history] == [1, 2, 3] and part.state["t"] == 3
    assert torch.equal(part.x, torch.full((2,), 1e300, dtype=torch.float64))


def test_device_iterates_are_checked_every_step_by_default(monkeypatch):
    monkeypatch.setattr(base, "_HOST_MAX", -1)  # every leaf on the device path
    assert _soba_syncs(None) == 20
    err = _blowup_run(check_every=3)  # steps 4..6 pending: the state before the checking step
    assert err.step == 4 and err.outer_step == 6 and err.partial.state["t"] == 5


def test_an_error_after_an_unchecked_non_finite_step_reports_that_step():
    """Step 5 raises because x went non-finite at step 4, which was not checked yet: the error is
    the NonFiniteError of step 4 (the RuntimeError its cause), with the state before step 4."""
    err = _blowup_run(solver=_BlowupThenRaise())
    assert err.step == err.outer_step == 4 and isinstance(err.__cause__, RuntimeError)
    assert err.partial.state["t"] == 3 and len(err.partial.history) == 3


def test_callbacks_taking_the_state_only_see_checked_iterates_and_a_stop_is_checked():
    seen = []

    def keep(t, x, y, rec, state):
        seen.append(bool(torch.isfinite(state["x"][0]).all()))

    err = _blowup_run(callback=keep)
    assert err.step == 4 and seen == [True] * 3
    err = _blowup_run(callback=lambda t, x, y, rec: t == 6)  # stops at 6, step 4 still pending
    assert err.step == err.outer_step == 4 and err.partial.state["t"] == 3


def test_a_stop_with_a_bad_device_step_pending_attaches_no_partial_result(monkeypatch):
    """Device iterates keep no state per pending step: a callback stop at 5 with step 4 unchecked
    (check_every=3) raises step 4's error without a partial result — the live state holds the
    non-finite iterate, which must not be handed back as the last good one."""
    monkeypatch.setattr(base, "_HOST_MAX", -1)
    err = _blowup_run(check_every=3, callback=lambda t, x, y, rec: t == 5)
    assert err.step == 4 and not hasattr(err, "partial")


def _cg_syncs(iters: int, **kw) -> int:
    lo, up = W.data()
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.5, steps=20), iters=iters, tol=1e-30, **kw)
    with hostsync.count() as c:
        est(W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up)
    return c.calls


def test_cg_hypergradient_syncs_do_not_grow_with_iterations():
    """linalg.cg never needs a read per iteration: ``check_every=0`` (fixed iterations, masks)
    reads once per solve whatever the budget; ``check_every=10`` (the accelerator default) once
    at the start and once per block of 10 iterations. Here CG reaches r ≈ 0 at iteration 10
    (5 unknowns, tol=1e-30), so budgets 5, 10 and 40 all cost one block, and ``check_every=1``
    (the CPU default, where a read is no synchronisation) one read per iteration."""
    fixed = _cg_syncs(3, check_every=0)
    assert _cg_syncs(40, check_every=0) == fixed
    assert all(_cg_syncs(n, check_every=10) == fixed + 1 for n in (5, 10, 40))
    assert _cg_syncs(40, check_every=1) == _cg_syncs(40) == fixed + 10


def test_fixed_point_and_neumann_read_once_per_block():
    A = torch.diag(torch.linspace(1.0, 2.0, 6, dtype=torch.float64))
    b = (torch.ones(6, dtype=torch.float64),)

    def reads(fn, **kw):
        with hostsync.count() as c:
            fn(lambda v: (A @ v[0],), b, alpha=0.3, **kw)
        return c.calls

    for fn in (bl.linalg.fixed_point, bl.linalg.neumann):
        assert reads(fn, iters=5, check_every=0) == reads(fn, iters=40, check_every=0) == 1
        assert reads(fn, iters=40, check_every=10) == 4  # no tolerance: the full budget runs
        assert reads(fn, iters=40, check_every=1) == 40


def test_implicit_estimators_pass_check_every_to_linalg():
    lo, up = W.data()

    def reads(est):
        with hostsync.count() as c:
            est(W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up)
        return c.calls

    gd = bl.inner.GD(lr=0.5, steps=20)
    for make in (lambda n, e: bl.hypergrad.Neumann(gd, iters=n, check_every=e),
                 lambda n, e: bl.hypergrad.FixedPoint(gd, iters=n, check_every=e)):
        assert reads(make(4, 0)) == reads(make(30, 0))  # fixed iterations: one read per solve
        assert reads(make(30, 1)) - reads(make(30, 0)) == 30 - 1  # a read per iteration instead


def test_minres_and_normal_cg_read_once_per_block():
    """MINRES and CGLS (issue 12) like CG: one read at the start, one per block of
    ``check_every`` iterations (CGLS: one more for the final ‖r‖), one in all for the masked
    form whatever the budget. The spectrum (1e-3 … 1e3, 30 unknowns, tol=0) keeps both running
    for the whole budget of 20 iterations."""
    ev = torch.logspace(-3, 3, 30, dtype=torch.float64)
    b = (torch.ones(30, dtype=torch.float64),)

    def reads(fn, **kw):
        with hostsync.count() as c:
            _, info = fn(lambda v: (ev * v[0],), b, tol=0.0, **kw)
        assert info["iterations"] == kw["iters"] and info["breakdown"] is None
        return c.calls

    for fn, final in ((bl.linalg.minres, 0), (bl.linalg.normal_cg, 1)):
        assert reads(fn, iters=5, check_every=0) == reads(fn, iters=20, check_every=0) == 1
        assert reads(fn, iters=20, check_every=10) == 1 + 2 + final
        assert reads(fn, iters=20, check_every=3) == 1 + 7 + final
        assert reads(fn, iters=20, check_every=1) == reads(fn, iters=20) == 1 + 20 + final  # CPU default


def test_minres_and_normal_cg_estimators_pass_check_every_to_linalg():
    lo, up = W.data()

    def reads(est):
        with hostsync.count() as c:
            est(W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up)
        return c.calls

    gd = bl.inner.GD(lr=0.5, steps=20)
    for cls in (bl.hypergrad.MINRES, bl.hypergrad.NormalCG):
        fixed = reads(cls(gd, iters=4, tol=1e-30, check_every=0))
        assert reads(cls(gd, iters=30, tol=1e-30, check_every=0)) == fixed  # one read per solve
        assert reads(cls(gd, iters=30, tol=1e-30, check_every=1)) > fixed + 2  # a read per iteration

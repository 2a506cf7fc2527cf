"""The bookkeeping of ``bl.solve``'s outer loop (issue 9 item 2 made it cheaper; these pin what it
must keep doing):

* the last good state attached to an error is the state after the previous step — bitwise, SAGA
  memories included (they are shared by the copy, so a table written in place would leak the
  failing step into it), and resuming it equals the uninterrupted run;
* a SAGA table's copy is independent of the original (either one updated, the other unchanged),
  and its state survives ``state_dict`` / pickling, also from a table pickled with a list memory;
* the finiteness summaries (a dot product with a cached zero vector) flag ±inf and NaN in any
  leaf — 2-D, non-contiguous, float64, bfloat16 — never a finite one, however large, and name
  the step and level; compiled-step summaries mix with eager ones;
* every record holds the step, the time, the step's metrics and the flat oracle counts, and a
  callback gets x and y in the shape of x0 / y0.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import bilevel as bl
from bilevel.estimates import SagaTable
from bilevel.problems import stochastic_quadratic
from bilevel.solvers import base
from bilevel.solvers.base import _check_pending, _finite_summary, copy_state

S = bl.solvers
F64 = torch.float64


def _equal(a, b) -> bool:
    """Bitwise equality of nested states (SAGA tables by their memories and mean)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, SagaTable):
        return isinstance(b, SagaTable) and a.n == b.n and _equal(a.state_dict(), b.state_dict())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


def _same(a: dict, b: dict) -> bool:
    """Two solver states equal bitwise but for the clock (``time``: wall seconds of each run)."""
    return _equal({k: v for k, v in a.items() if k != "time"}, {k: v for k, v in b.items() if k != "time"})


@pytest.fixture(scope="module")
def quad():
    return stochastic_quadratic(dim_x=3, dim_y=4, n_lower=64, n_upper=64, batch_size=8, seed=1)


def _kw(quad, problem=None):
    kw = quad.solve_kwargs(batch_size=8, seed=3, kind="fixed")
    if problem is not None:
        kw["problem"] = problem
    return kw


@pytest.mark.parametrize("solver", [S.SABA(lr_x=0.1, lr_y=0.3), S.SOBA(lr_x=0.1, lr_y=0.3)],
                         ids=["SABA", "SOBA"])
def test_the_partial_state_of_a_failing_step_is_the_previous_steps_state(quad, solver):
    """The lower objective turns NaN in step 4 (after the step has updated every SAGA memory it
    draws): the error's partial state equals, bitwise, the state of a clean 3-step run, and
    resuming it with the sane problem equals the clean 6-step run."""
    f, g = quad.problem.upper, quad.problem.lower
    done = {"n": 0}

    def g_bad(x, y, batch):
        return g(x, y, batch) * (math.nan if done["n"] >= 3 else 1.0)

    def count(t, x, y, rec):
        done["n"] = t

    with pytest.raises(bl.NonFiniteError) as info:
        bl.solve(**_kw(quad, bl.Problem(f, g_bad)), solver=solver, steps=6, track=False, callback=count)
    exc = info.value
    assert exc.outer_step == 4 and exc.level == "upper"  # (x first: every G oracle is NaN)
    part = exc.partial
    clean3 = bl.solve(**_kw(quad), solver=solver, steps=3, track=False)
    assert part.state["t"] == 3 and len(part.history) == 3
    assert _same(part.state, clean3.state)
    assert torch.equal(part.x, clean3.x) and torch.equal(part.y, clean3.y)
    clean6 = bl.solve(**_kw(quad), solver=solver, steps=6, track=False)
    rest = bl.solve(**_kw(quad), solver=solver, steps=6, track=False, state=part.state)
    assert torch.equal(rest.x, clean6.x) and torch.equal(rest.y, clean6.y)
    assert _equal(rest.state["counts"], clean6.state["counts"])
    assert [r["step"] for r in rest.history] == [4, 5, 6]


def test_resume_does_not_write_into_the_state_passed_in(quad):
    """SAGA tables are shared structurally by copies: a resumed run must leave the seed state (and
    a second resume from it) untouched."""
    solver = S.SABA(lr_x=0.1, lr_y=0.3)
    part = bl.solve(**_kw(quad), solver=solver, steps=2, track=False)
    frozen = copy.deepcopy(part.state)
    a = bl.solve(**_kw(quad), solver=solver, steps=5, track=False, state=part.state)
    assert _equal(part.state, frozen)
    b = bl.solve(**_kw(quad), solver=solver, steps=5, track=False, state=part.state)
    assert torch.equal(a.x, b.x) and _same(a.state, b.state)


def _leaves(gen, n):
    return (torch.randn(3, generator=gen, dtype=F64), torch.randn(2, 2, generator=gen, dtype=F64))[:n]


@pytest.mark.parametrize("n_leaves", [1, 2])
def test_saga_table_copy_is_independent(n_leaves):
    gen = torch.Generator().manual_seed(0)
    like = _leaves(gen, n_leaves)
    table = SagaTable(4, like)
    for i in (0, 2, 3):
        table.update(i, _leaves(gen, n_leaves))
    before = copy.deepcopy(table.state_dict())
    snap = copy_state(table)
    assert snap is not table
    table.update(2, _leaves(gen, n_leaves))  # the original moves on ...
    assert _equal(snap.state_dict(), before)  # ... the copy does not
    d_copy = snap.update(1, like)
    after = copy.deepcopy(table.state_dict())
    snap.update(0, _leaves(gen, n_leaves))  # and the other way round
    assert _equal(table.state_dict(), after)
    # the copy continues exactly like the original would have from the same point
    twin = SagaTable(4, like)
    twin.load_state_dict(before)
    assert _equal(twin.update(1, like), d_copy)


def test_saga_table_state_survives_pickling_and_old_list_memories():
    gen = torch.Generator().manual_seed(1)
    table = SagaTable(3, _leaves(gen, 2))
    table.update(1, _leaves(gen, 2))
    buf = io.BytesIO()
    torch.save({"memory": {"gy": table}}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)["memory"]["gy"]
    assert _equal(back.state_dict(), table.state_dict())
    old = copy.copy(table)  # a table from before the tuple memory: a list
    old.__dict__["memory"] = list(table.memory)
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    revived = torch.load(buf, weights_only=False)
    g = _leaves(gen, 2)
    assert _equal(revived.update(2, g), copy_state(table).update(2, g))
    with pytest.raises(IndexError, match="out of range"):
        table.update(3, g)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_finiteness_summaries_flag_every_nonfinite_entry_and_no_finite_one(dtype):
    with base._quiet_fp():  # (how solve calls them: numpy's "invalid value" warning is the point)
        _summaries_flag_every_nonfinite_entry(dtype)


def _summaries_flag_every_nonfinite_entry(dtype):
    zeros: dict = {}
    big = (torch.full((3,), 3e38 if dtype != F64 else 1e308, dtype=dtype),)
    wide = torch.full((4, 6), -3e38 if dtype != F64 else -1e308, dtype=dtype)
    for cache in (zeros, None):
        _check_pending([_finite_summary(big, (wide, wide.T), cache)], 1)  # no false alarm
    for bad in (math.inf, -math.inf, math.nan):
        for level in ("upper", "lower"):
            y = torch.ones(4, 6, dtype=dtype)
            y[2, 5] = bad
            # a non-contiguous 2-D leaf (device path), a contiguous one (host path for small
            # float32 / float64 CPU leaves), one above the host path's size
            for leaves in ((torch.ones(2, dtype=dtype), y.T), (torch.ones(2, dtype=dtype), y),
                           (torch.ones(base._HOST_MAX + 1, dtype=dtype), y)):
                xs, ys = (leaves, big) if level == "upper" else (big, leaves)
                for cache in (zeros, None):
                    with pytest.raises(bl.NonFiniteError, match=f"{level} level at step 9") as e:
                        _check_pending([_finite_summary(xs, ys, cache)], 9)
                    assert e.value.step == 9 and e.value.level == level
                    pending = [_finite_summary(big, big, cache), _finite_summary(xs, ys, cache)]
                    with pytest.raises(bl.NonFiniteError, match=f"{level} level at step 9"):
                        _check_pending(pending, 9)  # steps 8, 9 pending (one sync)
    on_host = _finite_summary(big, (wide,), zeros)
    assert all(type(c) is float for c in on_host) == (dtype != torch.bfloat16)


def test_pending_summaries_name_the_first_bad_step_also_mixed_with_compiled_ones():
    zeros: dict = {}
    ok, bad = (torch.ones(3),), (torch.tensor([1.0, math.nan, 2.0]),)
    compiled_ok = torch.zeros(2)  # what a compiled step leaves: [x code, y code]
    pending = [_finite_summary(ok, ok, zeros), compiled_ok, _finite_summary(ok, bad, zeros),
               torch.tensor([math.nan, 0.0])]
    with pytest.raises(bl.NonFiniteError, match="lower level at step 7"):
        _check_pending(pending, 8)  # steps 5..8 pending: y of step 7 is the first bad entry
    assert pending == []
    with pytest.raises(bl.NonFiniteError, match="upper level at step 2"):
        _check_pending([torch.tensor([math.nan, 0.0])], 2)
    _check_pending([compiled_ok, _finite_summary(ok, ok, zeros)], 2)


class _Counting(bl.solvers.Solver):
    """SOBA's step plus a metric (the record must carry it)."""

    def __init__(self):
        self.inner = S.SOBA(lr_x=0.1, lr_y=0.3)

    def init(self, ctx, xs, ys):
        return self.inner.init(ctx, xs, ys)

    def step(self, ctx, state, t):
        self.inner.step(ctx, state, t)
        return {"probe": torch.tensor(float(t)), "label": "s"}


def test_records_hold_step_time_metrics_and_flat_counts(quad):
    seen = []

    def cb(t, x, y, rec, state):
        seen.append((t, x.shape, y.shape, dict(rec), state["counts"].flat(), state["t"]))

    res = bl.solve(**quad.solve_kwargs(batch_size=8, seed=0), solver=_Counting(), steps=3,
                   track=False, callback=cb)
    assert [r["step"] for r in res.history] == [1, 2, 3]
    for (t, xshape, yshape, rec, flat, st), r in zip(seen, res.history):
        assert xshape == quad.x0.shape and yshape == quad.y0.shape and st == t
        assert rec == r and rec["probe"] == t - 1 and rec["label"] == "s"
        assert {k: rec[k] for k in flat} == flat  # ("compiled": only with --solve-compile)
        assert set(rec) - {"compiled"} == {"step", "time", "probe", "label", *flat}
    assert res.history[-1]["time"] == res.state["time"] > 0


def test_a_callback_gets_pytree_variables(quad):
    """x0 / y0 given as dicts: the callback and the result see dicts."""
    lin = bl.Problem(lambda x, y: (x["a"] - y["b"]).pow(2).sum(), lambda x, y: (y["b"] - x["a"]).pow(2).sum())
    got = []
    res = bl.solve(lin, {"a": torch.ones(2)}, {"b": torch.zeros(2)}, solver=S.SOBA(lr_x=0.1, lr_y=0.3),
                   steps=2, track=False, callback=lambda t, x, y, rec: got.append((set(x), set(y))))
    assert got == [({"a"}, {"b"})] * 2 and set(res.x) == {"a"}

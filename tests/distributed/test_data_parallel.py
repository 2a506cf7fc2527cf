"""Data parallelism over 2 local gloo processes equals one process on the union of the data.

One launch (module fixture) computes everything on both ranks; each test compares one piece with
a single-process float64 reference. Differences come only from the summation order of the
all-reduce (float64 rounding, ~1e-16 relative), so 1e-10 is a wide margin that any missing or
misweighted reduction (an O(1) error) exceeds.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import bilevel as bl
from tests.distributed import workers as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


@pytest.fixture(scope="module")
def ranks():
    return bl.distributed.spawn(W.rank_all, 2, timeout=60)


@pytest.fixture(scope="module")
def union():
    return W.data()


@pytest.mark.parametrize("name", list(W.estimators()))
def test_hypergradient_equals_single_process_on_union(ranks, union, name):
    lo, up = union
    ref = W.estimators()[name](W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up).grad
    for r in (0, 1):
        got = ranks[r]["hypergradients"][name]
        assert torch.allclose(got, ref, atol=1e-10, rtol=0), (name, r, got, ref)
    assert ref.abs().max() > 1e-3  # the comparison is not vacuous


def test_func_backend_is_reduced_too(ranks, union):
    lo, up = union
    ref = W.estimators()["CG"](W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up).grad
    assert torch.allclose(ranks[0]["func_cg"], ref, atol=1e-10, rtol=0)


def test_sum_reduction_adds_the_ranks_results(ranks, union):
    """reduction="sum": Σ_r g_r; the data-independent ‖y‖² (value 4, gradient 2y, Hessian 2I)
    is counted once per rank, i.e. once too many on 2 ranks."""
    lo, _ = union
    (val, gx, gy), hv = W.sum_oracles(lo, False)
    (dval, dgx, dgy), dhv = ranks[0]["sum"]
    y = torch.ones(W.D, dtype=torch.float64)
    assert torch.allclose(dval, val + 4.0, rtol=1e-12)
    assert torch.allclose(dgx[0], gx[0], rtol=1e-12)
    assert torch.allclose(dgy[0], gy[0] + 2 * y, rtol=1e-12)
    assert torch.allclose(dhv[0], hv[0] + 2 * y, rtol=1e-12)


def test_single_rank_shards_alone_differ(union):
    """Control: one rank's shard alone gives a different hypergradient (so the test above
    checks the reduction, not a problem insensitive to the data)."""
    lo, up = union
    est = W.estimators()["CG"]
    full = est(W.PROBLEM, *W.start(), lower_batch=lo, upper_batch=up).grad
    part = est(W.PROBLEM, *W.start(), lower_batch=bl.distributed.shard(*lo, rank=0, world=2),
               upper_batch=bl.distributed.shard(*up, rank=0, world=2)).grad
    assert (full - part).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(W.stochastic_solvers()))
def test_200_stochastic_steps_equal_single_process_on_concatenated_batches(ranks, name):
    s0, s1 = W.samplers(0, 2), W.samplers(1, 2)
    ref = W.stochastic_runs(lambda: W.Concat([s0[0], s1[0]]), lambda: W.Concat([s0[1], s1[1]]))
    for r in (0, 1):
        for got, want in zip(ranks[r]["stochastic"][name], ref[name]):
            assert torch.allclose(got, want, atol=1e-10, rtol=0), (name, r, got, want)
    assert (ref[name][0] + 1.0).abs().max() > 1e-3  # x moved


def test_collectives_and_bytes_per_cg_hypergradient(ranks):
    """CG hypergradient with T = 40 inner steps and k = 8 products, dim x = 4, dim y = 5
    (float64; each all-reduce carries its batch size too): one collective per oracle call —
    T gradients, one (f, ∇_x f, ∇_y f), one (g, ∇_y g) (the estimator checks them for NaN
    before the solve, so they cannot wait to ride along with the first product), k H-products,
    one cross product."""
    T, k, dx, dy = 40, 8, 4, 5
    elems = T * (dy + 1) + (1 + dx + dy + 1) + (1 + dy + 1) + k * (dy + 1) + (dx + 1)
    assert ranks[0]["cg_stats"] == {"collectives": T + 1 + 1 + k + 1, "bytes": 8 * elems}


def test_soba_step_costs_two_collectives(ranks):
    """SOBA: ∇_y G, H v and ∇²_xy G v in one all-reduce, (∇_x F, ∇_y F) in another."""
    assert ranks[0]["soba_stats"]["collectives"] == 2 * 10


def test_needs_a_process_group():
    with pytest.raises(bl.distributed.DistributedError, match="process group"), bl.distributed():
        pass


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_dead_or_hung_rank_fails_the_others_within_the_timeout(mode):
    timeout = 3.0
    t0 = time.monotonic()
    with pytest.raises(bl.distributed.DistributedError) as e:
        bl.distributed.spawn(W.rank_dies, 2, (mode,), timeout=timeout, wall=60)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "rank 0:" in msg and "a peer rank died or hung" in msg, msg
    assert "rank 1:" in msg  # the dead / hung rank is reported too
    assert elapsed < 45, elapsed  # process start-up (~seconds each) + timeout, never a hang

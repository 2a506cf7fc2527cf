"""Mixed precision on CPU: objectives in bf16 under autocast, linear solves in float32."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.precision import autocast


def _problem(seen):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 20
    A, Av = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    b, bv = (torch.rand(n, generator=g) > 0.5).float(), (torch.rand(n, generator=g) > 0.5).float()

    def lower(x, y, batch):
        A, b = batch
        z = A @ y
        seen.append(z.dtype)
        return torch.nn.functional.binary_cross_entropy_with_logits(z, b) + 0.5 * (x.exp() * y * y).sum()

    def upper(x, y, batch):
        A, b = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(A @ y, b)

    return bl.Problem(upper, lower), (A, b), (Av, bv), torch.full((d,), -2.0), torch.zeros(d)


def test_bf16_objectives_float32_solves():
    seen: list = []
    P, lo, up, x, y = _problem(seen)
    est = bl.hypergrad.CG(bl.inner.GD(lr=1.0, steps=100), iters=20, tol=0.0, warm_start=True)
    ref = est(P, x, y, lower_batch=lo, upper_batch=up)
    assert set(seen) == {torch.float32}
    seen.clear()
    res = est(autocast(P), x, y, lower_batch=lo, upper_batch=up)
    assert set(seen) == {torch.bfloat16}  # the objective's matmuls ran in bf16
    assert res.grad.dtype == torch.float32 and res.y.dtype == torch.float32
    assert res.state["v"][0].dtype == torch.float32  # the linear-solve solution
    # bf16 unit roundoff 2^-8 ≈ 4e-3: the hypergradient is that accurate, no better, no worse
    rel = float((res.grad - ref.grad).norm() / ref.grad.norm())
    assert 1e-5 < rel < 5e-2, rel
    # the CG recursion runs in float32: its residual goes far below bf16 resolution
    assert res.info["linear_solve"]["relative_residual"] < 1e-6


def test_value_is_float32_and_bad_dtype_rejected():
    P, lo, up, x, y = _problem([])
    Pa = autocast(P)
    assert Pa.g(x, y, lo).dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        autocast(P, torch.float64)

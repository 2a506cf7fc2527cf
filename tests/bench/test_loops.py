"""``bench.loops``: the unrolled and the ``while_loop`` form of the inner SGD loop compute the same
iterates as T explicit SGD steps (float64, exact gradients of a quadratic)."""

from __future__ import annotations

import pytest
import torch

from bilevel.bench.loops import inner_loops

pytestmark = pytest.mark.compiled


def test_both_loop_forms_equal_explicit_sgd():
    gen = torch.Generator().manual_seed(0)
    T, b, n, d = 4, 5, 12, 3
    D = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = torch.randn(n, generator=gen, dtype=torch.float64)
    rows = torch.randint(n, (T, b), generator=gen)

    def g(x, y, batch):  # Σ_i w_i (D_i·y − t_i)² / b with weights w = x[i]
        A, lab, i = batch
        return (x.index_select(0, i) * (A @ y - lab) ** 2).sum() / A.shape[0]

    x = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    y = torch.zeros(d, dtype=torch.float64)
    want = y.clone()
    for k in range(T):  # explicit gradient: (2/b) Aᵀ (w ⊙ (A y − lab))
        A, lab, w = D[rows[k]], t[rows[k]], x[rows[k]]
        want = want - 0.1 * (2 / b) * A.T @ (w * (A @ want - lab))
    data = (D[rows], t[rows], rows)
    for name, fn in inner_loops(g, lr=0.1).items():
        torch.testing.assert_close(fn(x, y, *data) if name == "unrolled" else
                                   torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y, *data),
                                   want, rtol=1e-12, atol=1e-14, msg=name)

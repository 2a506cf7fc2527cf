"""bilevel._tree: pytree flattening and vector arithmetic on flat tuples of tensors."""

from __future__ import annotations

import pytest
import torch

from bilevel import _tree as T


def _tree(gen):
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "rest": (torch.randn(4, generator=gen, dtype=torch.float64),
                 [torch.randn((), generator=gen, dtype=torch.float64)]),
    }


def test_flatten_unflatten_roundtrip(gen):
    tree = _tree(gen)
    leaves, spec = T.flatten(tree)
    assert len(leaves) == 3 and all(isinstance(t, torch.Tensor) for t in leaves)
    back = T.unflatten(leaves, spec)
    assert set(back) == {"w", "rest"}
    assert isinstance(back["rest"], tuple) and isinstance(back["rest"][1], list)
    assert torch.equal(back["w"], tree["w"]) and torch.equal(back["rest"][1][0], tree["rest"][1][0])


def test_flatten_rejects_non_tensor_leaves():
    with pytest.raises(TypeError, match="leaf 1 is a float"):
        T.flatten((torch.zeros(2), 1.5))


def test_vector_arithmetic_matches_concatenated_vectors(gen):
    a, _ = T.flatten(_tree(gen))
    b, _ = T.flatten(_tree(gen))
    va, vb = T.to_vector(a), T.to_vector(b)
    assert va.shape == (11,) and T.numel(a) == 11
    torch.testing.assert_close(T.to_vector(T.add(a, b)), va + vb, rtol=0, atol=0)
    torch.testing.assert_close(T.to_vector(T.sub(a, b)), va - vb, rtol=0, atol=0)
    torch.testing.assert_close(T.to_vector(T.scale(a, -2.5)), -2.5 * va, rtol=0, atol=0)
    torch.testing.assert_close(T.to_vector(T.axpy(0.7, a, b)), vb + 0.7 * va, rtol=1e-15, atol=0)
    alpha = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(T.to_vector(T.axpy(alpha, a, b)), vb + 0.7 * va, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.dot(a, b), va @ vb, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.sq_norm(a), va @ va, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.norm(a), va.norm(), rtol=1e-14, atol=0)
    assert float(T.norm(T.zeros_like(a))) == 0.0
    torch.testing.assert_close(T.to_vector(T.map_leaves(torch.mul, a, b)), va * vb)


def test_from_vector_inverts_to_vector_also_batched(gen):
    a, _ = T.flatten(_tree(gen))
    back = T.from_vector(T.to_vector(a), a)
    assert all(torch.equal(u, v) for u, v in zip(back, a))
    M = torch.randn(4, T.numel(a), generator=gen, dtype=torch.float64)
    rows = T.from_vector(M, a)  # a batch of 4 vectors shaped like a
    assert [tuple(r.shape) for r in rows] == [(4, 3, 2), (4, 4), (4,)]
    torch.testing.assert_close(T.to_vector_batched(rows), M, rtol=0, atol=0)
    torch.testing.assert_close(T.to_vector(T.from_vector(M[2], a)), M[2], rtol=0, atol=0)


def test_requires_grad_and_detach_make_fresh_leaves(gen):
    x = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = (x * 2,)
    fresh = T.requires_grad(y)
    assert fresh[0].requires_grad and fresh[0].is_leaf and fresh[0].grad_fn is None
    assert not T.detach(y)[0].requires_grad
    torch.testing.assert_close(fresh[0], y[0].detach())


def test_dot_of_empty_leaves_raises():
    with pytest.raises(ValueError, match="empty"):
        T.dot((), ())


def test_dot_of_leaves_laid_out_alike_reads_them_in_place(gen):
    """dot of transposed (column-major) leaves, of 3-D permuted ones, and of mixed layouts equals
    the dot of their row-major copies; leaves laid out alike are read through views of their own
    storage (no copy), in one common order."""
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64).t()   # column-major
    b = torch.randn(7, 5, generator=gen, dtype=torch.float64).t()
    c = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).permute(2, 0, 1)
    d = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).permute(2, 0, 1)
    e = torch.randn(5, 7, generator=gen, dtype=torch.float64)         # row-major, a's shape
    for u, v in ((a, b), (c, d), (a, e), (a, a)):
        want = float((u.contiguous().reshape(-1) * v.contiguous().reshape(-1)).sum())
        assert float(T.dot((u,), (v,))) == pytest.approx(want, rel=1e-14)
    for u, v in ((a, b), (c, d)):
        fu, fv = T._flat_pair(u, v)
        assert fu.data_ptr() == u.data_ptr() and fu._base is not None and fv._base is not None


def test_dot_of_transposed_leaves_under_vmap_and_compile(gen):
    """The layout test of ``dot`` also runs on vmap's batched tensors and under torch.compile."""
    B = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    want = (B * B).sum((1, 2))
    got = torch.func.vmap(lambda u: T.dot((u.t(),), (u.t(),)))(B)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    got = torch.func.vmap(lambda u: T.dot((u.t(),), (u.t(),)))(B.transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    compiled = torch.compile(lambda u: T.dot((u.t(),), (u.t(),)), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(B[0]), want[0], rtol=1e-14, atol=0)

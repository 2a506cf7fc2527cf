"""Samplers (:mod:`bilevel.sampling`): which rows each batch holds, epochs, exact resume."""

from __future__ import annotations

import torch

from bilevel.sampling import FixedBatches, Minibatches


def _data(n: int = 23):
    X = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)
    return X, torch.arange(n) % 4, torch.arange(n)


def test_minibatches_are_the_epochs_permutation_in_order():
    X, lab, idx = _data()
    s = Minibatches(X, lab, idx, batch_size=5, seed=3)
    g = torch.Generator().manual_seed(3)
    for epoch in range(3):
        perm = torch.randperm(23, generator=g)
        for k in range(23 // 5):  # 4 full batches; the last 3 rows of the epoch are dropped
            bx, bl_, bi = s.next()
            rows = perm[5 * k : 5 * k + 5]
            assert torch.equal(bi, rows) and torch.equal(bx, X[rows]) and torch.equal(bl_, lab[rows])
            assert bx.is_contiguous() and s.epoch == epoch


def test_resume_is_exact_across_epochs():
    a = Minibatches(*_data(), batch_size=4, seed=1)
    for _ in range(7):  # into the second epoch (5 batches an epoch)
        a.next()
    saved = a.state_dict()
    ahead = [a.next() for _ in range(9)]
    c = Minibatches(*_data(), batch_size=4, seed=99)
    c.load_state_dict(saved)
    assert c.epoch == 1
    for want in ahead:
        assert all(torch.equal(u, v) for u, v in zip(c.next(), want))
    assert c.epoch == a.epoch == 3


def test_next_rows_are_those_of_that_many_next_calls_across_epochs():
    """``next_rows(k)`` (a compiled step's pre-draw) gives the rows of k ``next`` calls in order,
    also when they span epochs (5 batches an epoch here), and leaves the sampler where those
    calls would."""
    X, lab, idx = _data()
    one, many = Minibatches(X, lab, idx, batch_size=4, seed=2), Minibatches(X, lab, idx, batch_size=4, seed=2)
    for k in (1, 3, 7, 2, 11):
        want = [one.next() for _ in range(k)]
        rows = many.next_rows(k)
        assert rows.shape == (4 * k,)
        for j, (bx, bl_, bi) in enumerate(want):
            r = rows[4 * j : 4 * j + 4]
            assert torch.equal(r, bi) and torch.equal(X[r], bx) and torch.equal(lab[r], bl_)
        assert (many.epoch, many.state_dict()["pos"]) == (one.epoch, one.state_dict()["pos"])
    assert one.epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(many.next(), one.next()))


def test_fixed_batches_partition_and_last_index():
    s = FixedBatches(*_data(), batch_size=5, seed=0)
    seen = torch.cat([s.batch(i)[2] for i in range(s.n_batches)])
    assert s.n_batches == 4 and len(set(seen.tolist())) == 20
    for _ in range(5):
        batch = s.next()
        assert torch.equal(batch[2], s.batch(s.last_index)[2])

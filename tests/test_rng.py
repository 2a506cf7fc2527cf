"""bilevel._rng.index: the stateless per-step draw of BSA's / TTSA's random truncation index."""

from __future__ import annotations

import pytest

from bilevel._rng import index


def test_index_is_a_pure_function_of_seed_and_step():
    assert [index(3, t, 10) for t in range(50)] == [index(3, t, 10) for t in range(50)]
    assert index(0, 0, 1) == 0
    with pytest.raises(ValueError, match="n >= 1"):
        index(0, 0, 0)


@pytest.mark.parametrize("n", [2, 10, 7])
def test_index_is_uniform_and_streams_of_seeds_and_steps_are_unrelated(n):
    """Counts of 20,000 draws within a chi-square bound (p ≈ 1e-5 for a uniform source), for
    one seed along the steps and for one step along the seeds; two seeds' streams agree on about
    1/n of the steps, as independent draws do."""
    draws = 20_000
    for seq in ([index(11, t, n) for t in range(draws)], [index(s, 5, n) for s in range(draws)],
                [index(-7, t, n) for t in range(draws)]):
        counts = [seq.count(k) for k in range(n)]
        chi2 = sum((c - draws / n) ** 2 / (draws / n) for c in counts)
        assert chi2 < 4.0 * (n - 1) + 20.0, counts
    a, b = [index(1, t, n) for t in range(draws)], [index(2, t, n) for t in range(draws)]
    same = sum(x == y for x, y in zip(a, b)) / draws
    assert abs(same - 1 / n) < 0.02
    pairs = sum(x == y for x, y in zip(a, a[1:])) / (draws - 1)  # consecutive steps
    assert abs(pairs - 1 / n) < 0.02

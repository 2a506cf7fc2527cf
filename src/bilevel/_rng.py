"""Random numbers of estimators and solvers, kept as generator *state* in their state dicts.

A state holds ``torch.Generator().get_state()`` (a uint8 tensor), never a generator: states are
copied, checkpointed and resumed, and a copy must replay the same numbers. :func:`advancing` is
the one way a step draws from such a state. A single random index per step (a random truncation)
needs no state at all: :func:`index` is a pure function of (seed, step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["seeded_generator", "initial_state", "advancing", "index"]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def initial_state(seed: int | None) -> torch.Tensor:
    """The generator state to put in a new solver / estimator state."""
    return seeded_generator(seed).get_state()


@contextlib.contextmanager
def advancing(state: dict[str, Any], key: str = "rng") -> Iterator[torch.Generator]:
    """``with advancing(state) as gen:`` a generator at ``state[key]``; on a normal exit its
    advanced state is written back to ``state[key]`` (on an error the state is left as it was)."""
    gen = torch.Generator().set_state(state[key])
    yield gen
    state[key] = gen.get_state()


_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijection of 64-bit integers
    whose outputs for consecutive inputs pass BigCrush."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def index(seed: int, step: int, n: int) -> int:
    """A draw from U{0, …, n−1} for ``step`` of a run seeded with ``seed``: SplitMix64 at counter
    ``step`` of the stream that the mixed seed selects, reduced mod n (bias below n / 2⁶⁴). A pure
    function of (seed, step): nothing to keep in a state, copy at every step or checkpoint, and a
    resumed run draws the indices of the uninterrupted one."""
    if n < 1:
        raise ValueError(f"index needs n >= 1, got {n}")
    golden = 0x9E3779B97F4A7C15
    z = (_mix((int(seed) * golden) & _MASK) + (int(step) + 1) * golden) & _MASK
    return _mix(z) % int(n)

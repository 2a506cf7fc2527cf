"""Random numbers of estimators and solvers, kept as generator *state* in their state dicts.

A state holds ``torch.Generator().get_state()`` (a uint8 tensor), never a generator: states are
copied, checkpointed and resumed, and a copy must replay the same numbers. :func:`advancing` is
the one way a step draws from such a state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["seeded_generator", "initial_state", "advancing"]


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

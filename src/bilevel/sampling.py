"""Data samplers handed to solvers as ``lower_data=`` / ``upper_data=``.

A sampler returns a batch (a tuple of tensors) from :meth:`next`; :meth:`full` returns all the
data (used for evaluation). Samplers own their random state and can be checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Sampler", "FullBatch", "Minibatches", "FixedBatches"]


class Sampler:
    n: int
    batch_size: int

    def next(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def full(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _check(tensors: tuple[Tensor, ...], batch_size: int | None = None) -> int:
    """Number of rows shared by ``tensors`` (and, if given, a valid ``batch_size`` for them)."""
    if not tensors:
        raise ValueError("a sampler needs at least one tensor")
    n = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != n:
            raise ValueError(f"tensor {i} has {t.shape[0]} rows, tensor 0 has {n}")
    if batch_size is not None and not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    return int(n)


class FullBatch(Sampler):
    """Always the whole data set (deterministic algorithms)."""

    def __init__(self, *tensors: Tensor):
        self.tensors = tuple(tensors)
        self.n = self.batch_size = _check(self.tensors)

    def next(self):
        return self.tensors

    def full(self):
        return self.tensors


class Minibatches(Sampler):
    """Contiguous batches over a pre-shuffled copy of the data, reshuffled every epoch.

    Shuffling a copy once per epoch and slicing contiguous views avoids a gather per batch.
    The last incomplete batch of an epoch is dropped (every batch has ``batch_size`` rows).
    """

    def __init__(self, *tensors: Tensor, batch_size: int = 64, seed: int = 0):
        self.tensors = tuple(tensors)
        self.n = _check(self.tensors, batch_size)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._pos = self.n  # forces a shuffle on first use
        self._perm: Tensor | None = None
        self._shuffled: tuple[Tensor, ...] = ()

    def _apply(self, perm: Tensor) -> None:
        self._perm = perm
        # index_select is ~4x faster than fancy indexing for a row gather of a (n, 784) matrix
        self._shuffled = tuple(t.index_select(0, perm.to(t.device)) for t in self.tensors)

    def next(self):
        if self._pos + self.batch_size > self.n:
            if self._shuffled:
                self.epoch += 1
            self._apply(torch.randperm(self.n, generator=self.generator))
            self._pos = 0
        lo = self._pos
        self._pos += self.batch_size
        return tuple(t[lo : self._pos] for t in self._shuffled)

    def full(self):
        return self.tensors

    def state_dict(self):
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "pos": self._pos,
            "perm": self._perm,
        }

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.epoch, self._pos = state["epoch"], state["pos"]
        if state["perm"] is not None:
            self._apply(state["perm"])


class FixedBatches(Sampler):
    """A fixed partition into ⌊n / batch_size⌋ batches (seeded); :meth:`next` draws a batch index
    uniformly at random and remembers it in ``last_index`` (for SAGA-style memories).
    """

    def __init__(self, *tensors: Tensor, batch_size: int = 64, seed: int = 0):
        self.tensors = tuple(tensors)
        self.n = _check(self.tensors, batch_size)
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(self.n, generator=self.generator)
        shuffled = tuple(t[perm.to(t.device)] for t in self.tensors)
        self.n_batches = self.n // self.batch_size
        self._batches = [
            tuple(t[i * self.batch_size : (i + 1) * self.batch_size] for t in shuffled)
            for i in range(self.n_batches)
        ]
        self.last_index = -1

    def batch(self, i: int) -> tuple[Tensor, ...]:
        return self._batches[i]

    def next(self):
        self.last_index = int(torch.randint(self.n_batches, (1,), generator=self.generator))
        return self._batches[self.last_index]

    def full(self):
        return self.tensors

    def state_dict(self):
        return {"generator": self.generator.get_state(), "last_index": self.last_index}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.last_index = state["last_index"]

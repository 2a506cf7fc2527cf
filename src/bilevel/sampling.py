"""Data samplers handed to solvers as ``lower_data=`` / ``upper_data=``.

A sampler returns a batch (a tuple of tensors) from :meth:`next`; :meth:`full` returns all the
data (used for evaluation). Samplers own their random state and can be checkpointed.

Any re-iterable of batches (a ``torch.utils.data.DataLoader``, a list) is accepted too:
:func:`as_sampler` — the one adapter, called by :func:`bilevel.solve` — wraps it in
:class:`IterableSampler`. :func:`paired` makes the pairing of the lower and upper batches of
one task explicit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import EmptyDataError

__all__ = [
    "Sampler", "FullBatch", "Minibatches", "FixedBatches", "IterableSampler", "paired", "as_sampler", "gather"
]


class Sampler:
    """Interface of ``lower_data`` / ``upper_data``: :meth:`next` returns the next batch,
    :meth:`full` all the data (evaluation), :meth:`state_dict` / :meth:`load_state_dict`
    checkpoint the position and random state. ``n``: samples; ``batch_size``: rows per batch.
    Any iterable of batches is adapted to it by :func:`as_sampler`.
    """

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


def gather(tensors: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """The rows ``rows`` of every tensor (the indices moved to each tensor's device): a
    :class:`Minibatches` batch, eagerly or inside a compiled step's graph."""
    # index_select is ~4x faster than fancy indexing for a row gather of a (n, 784) matrix
    return tuple([t.index_select(0, rows if rows.device == t.device else rows.to(t.device))
                  for t in tensors])


class Minibatches(Sampler):
    """Batches of ``batch_size`` rows in a random order, reshuffled every epoch.

    Each epoch draws one permutation; each batch is the next ``batch_size`` rows of it, gathered
    with ``index_select`` (no shuffled copy of the data set: the memory stays one copy, and the
    gathering is spread over the epoch's batches instead of paid at its first). The last
    incomplete batch of an epoch is dropped (every batch has ``batch_size`` rows).
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
        self._on: Tensor | None = None  # the permutation on the data's device
        self._gen_state: Tensor | None = None  # the generator's state, taken once per epoch

    def _apply(self, perm: Tensor) -> None:
        self._perm = perm
        self._on = perm.to(self.tensors[0].device)

    def _epoch(self) -> int:
        """Batches left in the current epoch, shuffling a new epoch first if none is left."""
        if self._pos + self.batch_size > self.n:
            if self._on is not None:
                self.epoch += 1
            self._apply(torch.randperm(self.n, generator=self.generator))
            self._gen_state = None
            self._pos = 0
        return (self.n - self._pos) // self.batch_size

    def next(self):
        self._epoch()
        lo = self._pos
        self._pos += self.batch_size
        return gather(self.tensors, self._on[lo : self._pos])

    def next_rows(self, k: int) -> Tensor:
        """The row indices (on the data's device) of the next ``k`` batches: rows j·b … (j+1)·b − 1
        are those of the j-th of ``k`` calls of :meth:`next`, also where the batches span epochs,
        and the sampler moves on as those calls would. A compiled step draws its batches this way
        before it runs and gathers the rows inside its graph (``bilevel.compiled_step``)."""
        pieces = []
        while k > 0:
            m = min(k, self._epoch())
            lo = self._pos
            self._pos += m * self.batch_size
            pieces.append(self._on[lo : self._pos])
            k -= m
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def full(self):
        return self.tensors

    def state_dict(self):
        if self._gen_state is None:  # (it changes only when an epoch is drawn: solve asks
            self._gen_state = self.generator.get_state()  # after every step)
        return {
            "generator": self._gen_state,
            "epoch": self.epoch,
            "pos": self._pos,
            "perm": self._perm,
        }

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self._gen_state = state["generator"]
        self.epoch, self._pos = state["epoch"], state["pos"]
        if state["perm"] is not None:
            self._apply(state["perm"])


class FixedBatches(Sampler):
    """A fixed partition into ⌊n / batch_size⌋ batches (seeded); :meth:`next` draws a batch index
    uniformly at random and remembers it in ``last_index`` (for SAGA-style memories; inside a
    whole-step compiled step the solver reads it as a 0-dim tensor, one graph for every index).
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


# --- any iterable of batches (DataLoader, list, generator factory) ------------------------------


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (non-blocking from pinned memory)."""
    if device is None:
        return batch
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device, non_blocking=t.is_pinned()) if isinstance(t, Tensor) else t, batch
    )


def _generators(iterable: Any) -> list[torch.Generator]:
    """The torch generators that decide a DataLoader's order (its own and its sampler's)."""
    out = []
    for owner in (iterable, getattr(iterable, "sampler", None),
                  getattr(getattr(iterable, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _shuffles(iterable: Any) -> bool:
    """True when a DataLoader draws a random order (or random subset) per epoch."""
    samplers = (getattr(iterable, "sampler", None),
                getattr(getattr(iterable, "batch_sampler", None), "sampler", None))
    random = (torch.utils.data.RandomSampler, torch.utils.data.SubsetRandomSampler,
              torch.utils.data.WeightedRandomSampler)
    return any(isinstance(s, random) for s in samplers)


def _in_order(iterable: Any) -> Any:
    """For :meth:`IterableSampler.full`: a DataLoader that shuffles a permutation of its whole
    data set, re-made to read it in index order (same dataset, batch size, collate, workers), so
    the full-data pass does not depend on where the generator stands; anything else as is."""
    s = getattr(iterable, "sampler", None)
    if not (isinstance(iterable, torch.utils.data.DataLoader)
            and isinstance(s, torch.utils.data.RandomSampler) and not s.replacement
            and s.num_samples == len(s.data_source)):
        return iterable
    return torch.utils.data.DataLoader(
        iterable.dataset, batch_size=iterable.batch_size, shuffle=False,
        collate_fn=iterable.collate_fn, num_workers=iterable.num_workers,
        pin_memory=iterable.pin_memory)


class IterableSampler(Sampler):
    """Any re-iterable of batches — a ``torch.utils.data.DataLoader`` (with its own workers and
    pin-memory), a list of tuples of tensors, ... — behind the sampler interface.

    * :meth:`next` returns the next batch, re-iterating ``iterable`` at the end of each epoch
      (``epoch`` counts completed passes); batches are moved to ``device`` (the device of the
      variables when built by :func:`bilevel.solve`).
    * :meth:`full` concatenates one whole pass along dim 0 (used for tracking/evaluation). It is
      computed once and cached, from a separate pass that does not disturb the batch order (a
      loader that shuffles its whole data set is read in index order there, so ``full()`` is the
      same tensor whenever it is first called — e.g. after a resume).
    * :meth:`state_dict` records the epoch, the position inside it and the state of the loader's
      torch generators at the start of the epoch (``DataLoader(generator=...)`` or a sampler with a
      ``generator``). Resuming is exact when the loader's order is decided by such a seeded
      generator (or the loader does not shuffle); a loader that shuffles with the global RNG
      resumes at the right position but in a different order — approximate
      (:attr:`exact_resume` is False; ``bl.solve(state=...)`` then warns once).

    A single-pass iterator (``iter(it) is it``, e.g. a generator) is rejected: it cannot be
    re-iterated per epoch. ``name`` (e.g. ``"lower_data"``) appears in every error message.
    """

    def __init__(self, iterable: Any, *, name: str = "data", device: torch.device | str | None = None):
        if hasattr(type(iterable), "__next__"):  # an iterator (not re-iterable); never iter() here
            raise TypeError(
                f"{name}: got a single-pass iterator ({type(iterable).__name__}); pass a "
                "re-iterable object (a DataLoader, a list of batches, or a Sampler) so that it can "
                "be re-iterated every epoch"
            )
        self.iterable, self.name = iterable, name
        self.device = None if device is None else torch.device(device)
        self.epoch, self.pos = 0, 0
        self._it: Any = None
        self._gen_states: list[Tensor] | None = None
        self._full: tuple[Tensor, ...] | None = None
        bs = getattr(iterable, "batch_size", None)
        self.batch_size = int(bs) if isinstance(bs, int) else 0
        try:
            self.n = len(iterable.dataset) if hasattr(iterable, "dataset") else 0
        except TypeError:
            self.n = 0

    @property
    def exact_resume(self) -> bool:
        """False for a loader that shuffles without a torch generator of its own (its order
        comes from the global RNG, so a resumed run draws other batches)."""
        return not (_shuffles(self.iterable) and not _generators(self.iterable))

    def _start_epoch(self) -> None:
        gens = _generators(self.iterable)
        if self._gen_states is not None and len(self._gen_states) == len(gens):
            for g, s in zip(gens, self._gen_states):  # resuming: replay this epoch's order
                g.set_state(s)
        self._gen_states = [g.get_state() for g in gens]
        self._it = iter(self.iterable)

    def _empty(self) -> EmptyDataError:
        return EmptyDataError(f"{self.name}: the data loader / iterable yielded no batch")

    def next(self) -> Any:
        if self._it is None:
            self._start_epoch()
            for _ in range(self.pos):  # resuming inside an epoch: skip the batches already used
                next(self._it)
        try:
            batch = next(self._it)
        except StopIteration:
            if self.pos == 0:
                raise self._empty() from None
            self.epoch, self.pos, self._gen_states = self.epoch + 1, 0, None
            self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                raise self._empty() from None
        self.pos += 1
        return _to_device(batch, self.device)

    def full(self) -> Any:
        if self._full is None:
            gens = _generators(self.iterable)
            saved = [g.get_state() for g in gens]
            batches = list(_in_order(self.iterable))  # the same data whatever the epoch
            for g, s in zip(gens, saved):
                g.set_state(s)
            if not batches:
                raise self._empty()
            leaves0, spec = torch.utils._pytree.tree_flatten(batches[0])
            if not all(isinstance(t, Tensor) for t in leaves0):
                raise TypeError(
                    f"{self.name}: cannot concatenate batches holding non-tensors for full(); "
                    "yield tensors or tuples/lists/dicts of tensors"
                )
            cols = [torch.utils._pytree.tree_flatten(b)[0] for b in batches]
            self._full = torch.utils._pytree.tree_unflatten(
                [torch.cat([c[i] for c in cols]) for i in range(len(leaves0))], spec
            )
        return _to_device(self._full, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "generators": self._gen_states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._gen_states = state["generators"]
        self._it = None  # the next draw restarts the recorded epoch and skips `pos` batches


def as_sampler(data: Any, name: str = "data", *, device: torch.device | str | None = None) -> Any:
    """Turn ``lower_data=`` / ``upper_data=`` into the sampler interface (``next()``, ``full()``,
    ``state_dict()``, ``load_state_dict()``).

    ``None`` and objects that already have that interface (every :class:`Sampler`, or a duck-typed
    one) are returned unchanged; any other re-iterable (``DataLoader``, list of batches) is wrapped
    in :class:`IterableSampler`, whose batches are moved to ``device``. Anything else is a
    ``TypeError`` naming ``name``.
    """
    if isinstance(data, (IterableSampler, _PairedHalf)):
        src = data if isinstance(data, IterableSampler) else data.pairs.source
        if src.device is None and device is not None:  # built by the user without a device
            src.device = torch.device(device)
        return data
    if data is None or isinstance(data, Sampler):
        return data
    if callable(getattr(data, "next", None)) and callable(getattr(data, "full", None)):
        return data
    if isinstance(data, (Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{name} must be a bilevel.sampling sampler or an iterable of batches (e.g. a "
            f"torch.utils.data.DataLoader), got {type(data).__name__}"
        )
    return IterableSampler(data, name=name, device=device)


class _PairSource:
    """The shared state of :func:`paired`: the task iterable and the pair drawn by one half but
    not yet by the other."""

    def __init__(self, source: IterableSampler):
        self.source = source
        self.pending: Any = None  # (task, index of the half that drew it)

    def draw(self, index: int) -> Any:
        if self.pending is not None:
            task, by = self.pending
            if by == index:
                names = ("lower", "upper")
                raise RuntimeError(
                    f"{self.source.name}: paired() {names[index]} batch drawn twice before the "
                    f"{names[1 - index]} batch of the same task; the solver draws the two levels "
                    "at different rates, so a pairing is not defined — pass separate samplers"
                )
            self.pending = None
            return task[index]
        task = self.source.next()
        if not isinstance(task, (tuple, list)) or len(task) != 2:
            raise TypeError(
                f"{self.source.name}: paired() needs an iterable of (lower_batch, upper_batch) "
                f"pairs, got a {type(task).__name__}"
                + (f" of length {len(task)}" if isinstance(task, (tuple, list)) else "")
            )
        self.pending = (task, index)
        return task[index]


class _PairedHalf(Sampler):
    """One half of :func:`paired` (see there)."""

    def __init__(self, pairs: _PairSource, index: int):
        self.pairs, self.index = pairs, index
        self.n, self.batch_size = pairs.source.n, pairs.source.batch_size

    def next(self) -> Any:
        return self.pairs.draw(self.index)

    def full(self) -> Any:
        return self.pairs.source.full()[self.index]

    @property
    def exact_resume(self) -> bool:
        return self.pairs.source.exact_resume

    def state_dict(self) -> dict[str, Any]:
        if self.index == 1:  # the lower half carries the shared state
            return {}
        return {"source": self.pairs.source.state_dict(), "pending": self.pairs.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.index == 0:
            self.pairs.source.load_state_dict(state["source"])
            self.pairs.pending = state["pending"]


def paired(tasks: Any, name: str = "tasks", *, device: torch.device | str | None = None
           ) -> tuple[Sampler, Sampler]:
    """``lower_data, upper_data = paired(tasks)``: explicit pairing of the two levels' batches.

    ``tasks`` is a re-iterable (e.g. a DataLoader) whose items are pairs ``(lower_batch,
    upper_batch)`` drawn together (a task's support and query sets, two halves of one
    minibatch). The rule, independent of which level a solver asks for first: the k-th lower
    batch and the k-th upper batch come from the k-th pair. A level asking twice before the other
    asked once raises (the solver draws the levels at different rates; pairing is undefined).
    Checkpoint with the lower half's ``state_dict`` (it carries the shared position); ``full()``
    concatenates one pass of each half.
    """
    src = tasks if isinstance(tasks, IterableSampler) else IterableSampler(tasks, name=name,
                                                                         device=device)
    pairs = _PairSource(src)
    return _PairedHalf(pairs, 0), _PairedHalf(pairs, 1)

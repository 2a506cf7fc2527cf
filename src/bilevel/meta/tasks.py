"""Task batches and task samplers (seeded, resumable).

A *task* is a dict of four tensors: ``support_x`` (n_s, ...), ``support_y`` (n_s, ...), ``query_x``
(n_q, ...), ``query_y`` (n_q, ...). A *task batch* has the same keys with a leading task dimension
(what ``torch.func.vmap`` maps over). :func:`stack_tasks` builds one from a list, with errors
naming the task and the field when shapes differ or a support set is empty.

Samplers (``next(n)`` returns a batch of n tasks; ``state_dict`` / ``load_state_dict`` resume
exactly — draw i of a sampler seeded s is a pure function of (s, i)):

* :class:`SinusoidTasks` — y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]
  (Finn, Abbeel & Levine 2017, Sec. 5.1);
* :class:`Episodes` — N-way K-shot classification episodes over a set of classes of a labelled
  data set (Vinyals et al. 2016); :func:`class_split` gives disjoint meta-train / meta-test classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, StructureMismatchError

__all__ = ["FIELDS", "stack_tasks", "check_tasks", "num_tasks", "SinusoidTasks", "Episodes",
           "class_split", "index_tasks"]

FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _check_fields(task: Mapping[str, Any], where: str) -> None:
    if not isinstance(task, Mapping):
        raise StructureMismatchError(f"{where} must be a dict with keys {FIELDS}, got "
                                     f"{type(task).__name__}")
    missing = [k for k in FIELDS if k not in task]
    extra = [k for k in task if k not in FIELDS]
    if missing or extra:
        raise StructureMismatchError(f"{where}: missing fields {missing}, unknown fields {extra} "
                                     f"(a task has exactly {FIELDS})")
    for k in FIELDS:
        if not isinstance(task[k], Tensor):
            raise StructureMismatchError(f"{where}: field {k!r} is a {type(task[k]).__name__}, "
                                         "expected a tensor")


def stack_tasks(tasks: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A list of tasks -> one task batch; every task must have the shapes of task 0."""
    if len(tasks) == 0:
        raise StructureMismatchError("empty list of tasks")
    for i, t in enumerate(tasks):
        _check_fields(t, f"task {i}")
        _check_sizes(t, f"task {i}", batched=False)
    ref = tasks[0]
    for i, t in enumerate(tasks[1:], start=1):
        for k in FIELDS:
            if t[k].shape != ref[k].shape or t[k].dtype != ref[k].dtype:
                raise StructureMismatchError(
                    f"task {i}: field {k!r} has shape {tuple(t[k].shape)} ({t[k].dtype}) but task 0 "
                    f"has {tuple(ref[k].shape)} ({ref[k].dtype}); tasks in one vmapped batch must "
                    "have equal shapes (same ways, shots and queries)"
                )
    return {k: torch.stack([t[k] for t in tasks]) for k in FIELDS}


def _check_sizes(t: Mapping[str, Tensor], where: str, *, batched: bool) -> None:
    d = 1 if batched else 0
    for side in ("support", "query"):
        xk, yk = f"{side}_x", f"{side}_y"
        if t[xk].dim() <= d or t[yk].dim() < d + 1:
            raise StructureMismatchError(f"{where}: fields {xk!r}/{yk!r} need a sample dimension, "
                                         f"got shapes {tuple(t[xk].shape)} / {tuple(t[yk].shape)}")
        if t[xk].shape[d] != t[yk].shape[d]:
            raise StructureMismatchError(
                f"{where}: field {xk!r} has {t[xk].shape[d]} samples but {yk!r} has {t[yk].shape[d]}")
    if t["support_x"].shape[d] == 0:
        raise StructureMismatchError(f"{where}: the support set is empty (field 'support_x' has 0 "
                                     "samples); every task needs at least one support example")
    if t["query_x"].shape[d] == 0:
        raise StructureMismatchError(f"{where}: the query set is empty (field 'query_x' has 0 samples)")


def check_tasks(tasks: Any) -> dict[str, Tensor]:
    """Validate a task batch (or stack a list of tasks): fields, leading task dimension, sizes."""
    if isinstance(tasks, (list, tuple)):
        return stack_tasks(tasks)
    _check_fields(tasks, "task batch")
    n = {k: (tasks[k].shape[0] if tasks[k].dim() else None) for k in FIELDS}
    if len(set(n.values())) != 1 or None in n.values():
        raise StructureMismatchError(f"task batch: fields have different numbers of tasks "
                                     f"(leading dimensions {n})")
    _check_sizes(tasks, "task batch", batched=True)
    return dict(tasks)


def num_tasks(tasks: Mapping[str, Tensor]) -> int:
    return int(tasks["support_x"].shape[0])


def index_tasks(tasks: Mapping[str, Tensor], i: int | slice) -> dict[str, Tensor]:
    """Task i (or a slice of the batch), for all fields given (e.g. only the support set)."""
    return {k: v[i] for k, v in tasks.items()}


class _Seeded:
    """Draw i depends only on (seed, i): ``state_dict`` is the draw counter."""

    def __init__(self, seed: int):
        self.seed, self.count = int(seed), 0

    def _rng(self) -> np.random.Generator:
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        return rng

    #: the attributes :meth:`__repr__` shows (besides the seed)
    _shown: tuple[str, ...] = ()

    def __repr__(self) -> str:  # (by value: whole-step compiled mode keys its graphs on it)
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in (*self._shown, "seed"))
        return f"{type(self).__name__}({shown})"

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "count": self.count}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if int(s["seed"]) != self.seed:
            raise ConfigError(f"sampler state has seed {s['seed']}, this sampler {self.seed}")
        self.count = int(s["count"])


class SinusoidTasks(_Seeded):
    """Sinusoid regression tasks (Finn et al. 2017, Sec. 5.1): A ~ U[0.1, 5], φ ~ U[0, π],
    inputs x ~ U[−5, 5], targets A sin(x − φ); ``shots`` support and ``queries`` query points;
    tensors of ``dtype`` on ``device`` (drawn on the CPU, so the tasks do not depend on the device)."""

    _shown = ("shots", "queries", "dtype")
    amplitude = (0.1, 5.0)
    phase = (0.0, math.pi)
    inputs = (-5.0, 5.0)

    def __init__(self, shots: int = 10, queries: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        if int(shots) < 1 or int(queries) < 1:
            raise ConfigError(f"shots and queries must be >= 1, got {shots}, {queries}")
        super().__init__(seed)
        self.shots, self.queries, self.dtype = int(shots), int(queries), dtype
        self.device = device
        self.last_params: np.ndarray | None = None

    def next(self, n: int) -> dict[str, Tensor]:
        rng = self._rng()
        amp = rng.uniform(*self.amplitude, size=(n, 1))
        ph = rng.uniform(*self.phase, size=(n, 1))
        x = rng.uniform(*self.inputs, size=(n, self.shots + self.queries))
        y = amp * np.sin(x - ph)
        X = torch.from_numpy(x[..., None]).to(dtype=self.dtype, device=self.device)
        Y = torch.from_numpy(y[..., None]).to(dtype=self.dtype, device=self.device)
        s = self.shots
        return {"support_x": X[:, :s], "support_y": Y[:, :s], "query_x": X[:, s:], "query_y": Y[:, s:]}


def class_split(labels: np.ndarray, split: str = "low-high") -> tuple[list[int], list[int]]:
    """Disjoint meta-train / meta-test classes: ``low-high`` = lower half / upper half of the class
    ids (MNIST, digits: {0..4} / {5..9}); ``even-odd`` = even / odd ids."""
    classes = sorted(int(c) for c in np.unique(labels))
    if split == "low-high":
        h = len(classes) // 2
        return classes[:h], classes[h:]
    if split == "even-odd":
        return classes[0::2], classes[1::2]
    raise ConfigError(f"unknown class split {split!r}; valid: low-high, even-odd")


class Episodes(_Seeded):
    """N-way K-shot episodes: each task draws ``ways`` of ``classes`` (labels relabelled 0..N−1 in
    random order), ``shots`` support and ``queries`` query examples per class, without overlap.
    Tasks live on the device of ``inputs`` (the draws are made on the CPU)."""

    _shown = ("name", "ways", "shots", "queries")

    def __init__(self, inputs: Tensor, labels: Tensor | np.ndarray, classes: Sequence[int],
                 ways: int, shots: int, queries: int = 15, seed: int = 0, name: str = "data"):
        super().__init__(seed)
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
        classes = [int(c) for c in classes]
        if int(ways) < 2:
            raise ConfigError(f"ways must be >= 2, got {ways}")
        if int(shots) < 1:
            raise ConfigError(f"shots must be >= 1 (a support set of size 0 has nothing to adapt "
                              f"on), got {shots}")
        if int(queries) < 1:
            raise ConfigError(f"queries must be >= 1, got {queries}")
        if int(ways) > len(classes):
            raise ConfigError(f"ways={ways} but the {name} split has only {len(classes)} classes "
                              f"({classes})")
        self.inputs, self.name = inputs, name
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.classes = classes
        self.by_class = {c: np.flatnonzero(labels == c) for c in classes}
        need = self.shots + self.queries
        for c, idx in self.by_class.items():
            if len(idx) < need:
                raise ConfigError(f"class {c} of {name} has {len(idx)} examples, fewer than shots + "
                                  f"queries = {need}")

    def next(self, n: int) -> dict[str, Tensor]:
        rng = self._rng()
        N, K, Q = self.ways, self.shots, self.queries
        sx, sy, qx, qy = [], [], [], []
        for _ in range(n):
            chosen = rng.choice(self.classes, size=N, replace=False)
            s_idx, q_idx = [], []
            for c in chosen:
                pick = rng.choice(self.by_class[int(c)], size=K + Q, replace=False)
                s_idx.append(pick[:K])
                q_idx.append(pick[K:])
            s_idx, q_idx = np.concatenate(s_idx), np.concatenate(q_idx)
            dev = self.inputs.device
            sx.append(self.inputs[torch.from_numpy(s_idx).to(dev)])
            qx.append(self.inputs[torch.from_numpy(q_idx).to(dev)])
            sy.append(torch.arange(N, device=dev).repeat_interleave(K))
            qy.append(torch.arange(N, device=dev).repeat_interleave(Q))
        return {"support_x": torch.stack(sx), "support_y": torch.stack(sy),
                "query_x": torch.stack(qx), "query_y": torch.stack(qy)}

"""Data-parallel bilevel optimization on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every oracle of a finite-sum objective is a sum over data, so a rank that holds a shard of the
data computes its local oracle and one all-reduce gives the oracle of the union::

    g(x, y) = Σ_r (n_r / N) g_r(x, y),     N = Σ_r n_r,

where g_r is the objective on rank r's batch (n_r samples) and the same weights apply to ∇_y g,
H v, ∇²_xy g v, ∇ f, ... (they are linear in g). Inside ``with bl.distributed():`` the oracle
layer (:mod:`bilevel.oracles`, the one place that differentiates) reduces every result this way,
so every estimator and solver runs unchanged: CG / Neumann / fixed point (each product is
reduced), ``Reverse`` (each step's ∇_y g is reduced with an autograd-aware all-reduce whose
backward all-reduces the adjoint), ``Forward`` (the all-reduce has a jvp and a vmap rule),
SOBA / SABA / stocBiO (each rank draws its own minibatch; the estimates are averaged).

Assumptions (what "the union" means):

* ``reduction="mean"`` (default): each level's objective is a **mean over its batch** plus terms
  that do not depend on the data (regularizers such as λ‖y‖²). Weights n_r / N sum to one, so a
  data-independent term is kept exactly once — write the objective as on one process.
* ``reduction="sum"``: objectives are **sums over the batch**; results are summed over ranks. A
  data-independent term would then be counted once per rank: divide it by
  :func:`world_size` or add it on rank 0 only.
* A level is reduced when its objective was given a batch (``levels="auto"``); an objective
  without data is the same on every rank and costs no communication. Pass ``levels=("lower",)``
  etc. to choose explicitly (e.g. when the objective reads its shard from a closure: then every
  rank gets weight 1 / world size).

Communication: all leaves of one oracle result (and the batch size) travel in **one flat
all-reduce**; a Linearization's ∇_y g rides along with its first product, and H v and ∇²_xy g v
from one backward share one all-reduce. Accumulation is in at least float32 (bf16 results are
reduced in float32). :attr:`Reducer.stats` counts collectives and bytes.

Launch with ``torchrun --nproc-per-node N -m bilevel run ...`` or ``bilevel run ... --nproc N``
(:mod:`bilevel.launch`). See docs/distributed.md.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import oracles as O
from .errors import BilevelError

__all__ = [
    "distributed",
    "Reducer",
    "init",
    "shutdown",
    "is_active",
    "rank",
    "world_size",
    "is_main",
    "shard",
    "rank_seed",
    "all_mean",
    "sum_counts",
    "barrier",
    "DistributedError",
    "spawn",
    "free_port",
]

#: default seconds before a collective that waits on a dead or hung rank fails
DEFAULT_TIMEOUT = 60.0


class DistributedError(BilevelError, RuntimeError):
    """A peer rank died, hung past the timeout, or the ranks disagree."""


# --- the one primitive: a differentiable, vmap-able all-reduce (sum) --------------------------
class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r z_r over the process group. Backward: z̄_r = Σ_r' ȳ_r' (the adjoint of a sum over
    ranks of per-rank losses); jvp: ẏ = Σ_r ż_r; vmap: the batched tensor is reduced as a whole.
    The group and the statistics travel as arguments (the backward may run on another thread,
    where no context variable is set)."""

    @staticmethod
    def forward(z: Tensor, reducer: Reducer) -> Tensor:  # type: ignore[override]
        return reducer._all_reduce(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.reducer = inputs[1]

    @staticmethod
    def backward(ctx: Any, gy: Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(gy, ctx.reducer), None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, _r: Any) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(dz, ctx.reducer)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, z: Tensor, reducer: Reducer):  # type: ignore[override]
        return reducer._all_reduce(z), in_dims[0]


class Reducer:
    """Weighted all-reduce of oracle results over a process group (see the module docstring)."""

    def __init__(
        self,
        group: Any = None,
        *,
        levels: str | Sequence[str] = "auto",
        reduction: str = "mean",
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "bl.distributed() needs an initialized process group: launch with torchrun / "
                "`bilevel run ... --nproc N`, or call bl.distributed.init() first"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if levels != "auto":
            levels = tuple(levels)
            bad = [lv for lv in levels if lv not in ("upper", "lower")]
            if bad:
                raise ValueError(f"levels must be 'auto' or a subset of ('upper', 'lower'), got {bad}")
        self.group = group
        self.levels = levels
        self.reduction = reduction
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: collectives issued and bytes all-reduced (payload, per rank) since the last reset
        self.stats = {"collectives": 0, "bytes": 0}

    def reset_stats(self) -> dict[str, int]:
        """Return the statistics and start counting from zero."""
        out, self.stats = dict(self.stats), {"collectives": 0, "bytes": 0}
        return out

    def applies(self, fn: Any) -> bool:
        """Is fn's level sharded (its results differ between ranks)?"""
        level = getattr(fn, "level", None)
        if self.levels == "auto":
            return level in ("upper", "lower") and getattr(fn, "batch", None) is not None
        return level in self.levels

    def _all_reduce(self, z: Tensor) -> Tensor:
        out = z.clone()
        self.stats["collectives"] += 1
        self.stats["bytes"] += out.numel() * out.element_size()
        try:
            dist.all_reduce(out, group=self.group)
        except RuntimeError as e:  # gloo / NCCL report a dead or hung peer as a RuntimeError
            raise DistributedError(
                f"all-reduce failed on rank {self.rank} of {self.world}: a peer rank died or hung "
                f"past the process-group timeout ({e.__class__.__name__}: {str(e)[:300]})"
            ) from e
        return out

    def reduce(self, fn: Any, leaves: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The union's value of per-rank results ``leaves`` of fn (one flat all-reduce).

        Differentiable (reverse and forward mode, vmap): used both for plain results and for
        results with a graph (unrolled differentiation)."""
        if not leaves:
            return ()
        dtype = torch.promote_types(leaves[0].dtype, torch.float32)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in leaves])
        if self.reduction == "mean":
            n = torch.full((1,), float(getattr(fn, "n", 1)), dtype=dtype, device=flat.device)
            out = _AllReduceSum.apply(torch.cat([flat * n, n]), self)
            flat = out[:-1] / out[-1]
        else:
            flat = _AllReduceSum.apply(flat, self)
        res, i = [], 0
        for t in leaves:
            k = t.numel()
            res.append(flat[i : i + k].reshape(t.shape).to(t.dtype))
            i += k
        return tuple(res)

    def mean(self, leaves: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Plain mean over ranks (one flat all-reduce)."""
        if not leaves:
            return ()
        dtype = torch.promote_types(leaves[0].dtype, torch.float32)
        flat = _AllReduceSum.apply(torch.cat([t.reshape(-1).to(dtype) for t in leaves]), self)
        flat = flat / self.world
        res, i = [], 0
        for t in leaves:
            res.append(flat[i : i + t.numel()].reshape(t.shape).to(t.dtype))
            i += t.numel()
        return tuple(res)


@contextmanager
def distributed(
    group: Any = None, *, levels: str | Sequence[str] = "auto", reduction: str = "mean"
) -> Iterator[Reducer]:
    """Reduce every oracle result over ``group`` (default: the world) inside the block.

    Each rank passes its own shard as the batch (``lower_data=`` / ``upper_data=`` or
    ``lower_batch=``); the results are those of a single process on the union. Yields the
    :class:`Reducer` (its ``stats`` count collectives and bytes)."""
    r = Reducer(group, levels=levels, reduction=reduction)
    with O.reducing(r):
        yield r


# --- process-group helpers --------------------------------------------------------------------
def init(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); returns False (and does nothing) outside a distributed launch.

    ``backend``: default NCCL when CUDA is available, else gloo. ``timeout`` (seconds) bounds
    every collective: a rank that dies or hangs makes the others fail with an error instead of
    waiting forever. With CUDA each process uses GPU ``LOCAL_RANK``."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that writes files and prints."""
    return rank() == 0


def shard(*tensors: Tensor, rank: int | None = None, world: int | None = None) -> tuple[Tensor, ...]:
    """This rank's contiguous block of rows of each tensor (sizes differ by at most one)."""
    r = globals()["rank"]() if rank is None else int(rank)
    w = world_size() if world is None else int(world)
    n = tensors[0].shape[0]
    if n < w:
        raise ValueError(f"cannot shard {n} rows over {w} ranks")
    return tuple(t.tensor_split(w)[r] for t in tensors)


def rank_seed(seed: int, rank: int | None = None) -> int:
    """A per-rank seed (each rank draws its own minibatches)."""
    r = globals()["rank"]() if rank is None else int(rank)
    return int(seed) + 1_000_003 * r


def all_mean(leaves: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Mean over ranks of replicated-variable derivatives computed outside the oracle layer
    (see :func:`bilevel.oracles.rank_mean`)."""
    return O.rank_mean(tuple(leaves))


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Oracle-call counts (``OracleCounts.flat()``) summed over the ranks: each rank counts the
    per-sample evaluations on its own shard, so the sum is the union's count — what a single
    process on the union would report. Identity without an active process group; a collective
    (every rank must call it at the same point), so the runner calls it once per trace record."""
    if not is_active():
        return dict(counts)
    box: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(box, dict(counts))
    except RuntimeError as e:  # a dead or hung peer
        raise DistributedError(f"gathering oracle counts failed on rank {rank()}: a peer rank died "
                               f"or hung past the process-group timeout ({str(e)[:300]})") from e
    out: dict[str, int] = {}
    for part in box:
        for k, v in part.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def barrier(timeout: float = DEFAULT_TIMEOUT) -> None:
    """A barrier that fails with :class:`DistributedError` naming the missing ranks (gloo's
    monitored barrier) instead of hanging when a rank died."""
    if not is_active():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
        else:
            dist.barrier()
    except RuntimeError as e:
        raise DistributedError(f"barrier failed on rank {rank()}: {str(e)[:300]}") from e


# --- local launcher (tests, benchmarks, `bilevel run --nproc N`) ------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous of a local launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rank: int, world: int, port: int, fn: Any, args: tuple, outdir: str,
                 backend: str, timeout: float) -> None:
    import traceback

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init(backend, timeout=timeout)
        res = fn(*args)
        torch.save(res, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        shutdown()


def spawn(fn: Any, nprocs: int = 2, args: tuple = (), *, backend: str | None = None,
          timeout: float = DEFAULT_TIMEOUT, wall: float | None = None,
          start_method: str | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` local processes joined in a process group (rendezvous on
    127.0.0.1, a free port); return the per-rank results. ``timeout`` is the process group's
    collective timeout; ``wall`` (default ``4 * timeout``) bounds the whole launch. If any rank
    fails, the others are given ``timeout`` (+1) seconds to fail too, then killed, and
    :class:`DistributedError` reports every rank's error. ``start_method``: "fork" where
    available and CUDA is not initialized (no re-import: fast), else "spawn" (then ``fn`` must
    be importable)."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    wall = 4 * timeout if wall is None else wall
    if start_method is None:
        fork_ok = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
        start_method = "fork" if fork_ok else "spawn"
    ctx = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="bilevel-spawn-") as outdir:
        port = free_port()
        procs = [ctx.Process(target=_spawn_entry,
                             args=(r, nprocs, port, fn, args, outdir, backend, timeout))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        t0, first_fail = time.monotonic(), None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_fail is None and any(p.exitcode not in (None, 0) for p in procs):
                first_fail = now
            if now - t0 > wall or (first_fail is not None and now - first_fail > timeout + 1):
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        errors = {}
        for r, p in enumerate(procs):
            err = os.path.join(outdir, f"{r}.err")
            if os.path.exists(err):
                with open(err) as f:
                    errors[r] = f.read()
            elif p.exitcode != 0:
                errors[r] = f"exit code {p.exitcode} (killed or died without a Python error)"
        if errors:
            lines = "\n".join(f"--- rank {r}:\n{e.strip()}" for r, e in sorted(errors.items()))
            raise DistributedError(f"{len(errors)} of {nprocs} ranks failed:\n{lines}")
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)
                for r in range(nprocs)]


class _CallableModule(type(os)):
    """``bl.distributed(...)`` is the context manager; ``bl.distributed.init()`` etc. the helpers."""

    def __call__(self, *args: Any, **kw: Any):
        return distributed(*args, **kw)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule

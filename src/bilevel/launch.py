"""Data-parallel experiment runs: ``torchrun --nproc-per-node N -m bilevel run NAME ...`` or the
shortcut ``bilevel run NAME ... --nproc N`` (which starts that same torchrun on this machine).

Every rank builds the same experiment (same seed: same model, same data), then keeps its shard
of the training data (:func:`shard_setup`: contiguous rows, per-rank sampler seeds, per-rank
minibatch ``batch_size // world``; ``full()`` still returns the union, so evaluation needs no
communication) and runs the solver inside ``bl.distributed()``, so every oracle is the union's.

Files: rank 0 writes the run folder (trace, checkpoints, progress bar, plots, summary); rank R > 0
keeps only what resuming needs — its own run record and checkpoint (its sampler position) under
``RUN/ranks/R/`` — and prints nothing. ``--resume RUN`` resumes every rank from its checkpoint
(all ranks checkpoint at the same steps). A rank that dies or hangs makes the others fail within
the process-group timeout (``BILEVEL_DIST_TIMEOUT`` seconds, default 60); the last checkpoint
stays in the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .errors import ConfigError
from .sampling import FixedBatches, FullBatch, Minibatches, Sampler

__all__ = ["shard_sampler", "shard_setup", "in_launch", "launch_cli", "run_rank", "strip_nproc",
           "resume_command"]


def in_launch() -> bool:
    """True inside a torchrun-style launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_sampler(s: Sampler | None, rank: int, world: int) -> Sampler | None:
    """This rank's part of a sampler: same kind over a contiguous shard of the rows, its own
    seed; ``full()`` still returns all the data (evaluation on the union)."""
    if s is None:
        return None
    if not hasattr(s, "tensors"):
        raise ConfigError(f"cannot shard a {type(s).__name__} for a data-parallel run "
                          "(supported: FullBatch, Minibatches, FixedBatches)")
    parts = D.shard(*s.tensors, rank=rank, world=world)
    if isinstance(s, FullBatch):
        out: Sampler = FullBatch(*parts)
    elif isinstance(s, (Minibatches, FixedBatches)):
        bs = s.batch_size // world
        if bs < 1:
            raise ConfigError(f"batch_size {s.batch_size} is smaller than the {world} ranks")
        seed = s.seed if isinstance(s, Minibatches) else s.generator.initial_seed()
        out = type(s)(*parts, batch_size=min(bs, parts[0].shape[0]), seed=D.rank_seed(seed, rank))
    else:
        raise ConfigError(f"cannot shard a {type(s).__name__} for a data-parallel run")
    union = s.tensors
    out.full = lambda: union  # type: ignore[method-assign]
    return out


def shard_setup(setup: Any) -> Any:
    """The experiment setup with this rank's data shards (unchanged outside a launch)."""
    if not D.is_active():
        return setup
    r, w = D.rank(), D.world_size()
    return dataclasses.replace(setup, lower_data=shard_sampler(setup.lower_data, r, w),
                               upper_data=shard_sampler(setup.upper_data, r, w))


def resume_command(name: str, path: Any) -> str:
    """The command that continues run ``path``: with ``--nproc N`` inside an N-process launch
    (every rank resumes from its own checkpoint, so the run must be resumed on as many)."""
    cmd = f"bilevel run {name} --resume {path}"
    return f"{cmd} --nproc {D.world_size()}" if D.is_active() else cmd


def strip_nproc(argv: list[str]) -> tuple[list[str], int]:
    """Remove ``--nproc N`` / ``--nproc=N`` from a command line; return (rest, N)."""
    out, n, i = [], 1, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = int(argv[i + 1]), i + 2
            continue
        if a.startswith("--nproc="):
            n = int(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return out, n


def launch_cli(argv: list[str], nproc: int) -> int:
    """``bilevel ARGV`` on ``nproc`` local processes through torchrun (standalone rendezvous on
    this machine, no restarts); returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    args = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "bilevel", *argv]
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        print(f"bilevel: distributed run failed: {e}", file=sys.stderr)
        return 1
    return 0


def run_rank(name: str, **kw: Any) -> Any:
    """``bilevel.experiments.run(name, **kw)`` as one rank of a launch (see the module docstring)."""
    import torch.distributed as dist

    from .experiments import run
    from .experiments.runner import new_run_dir

    timeout = float(os.environ.get("BILEVEL_DIST_TIMEOUT", D.DEFAULT_TIMEOUT))
    D.init(timeout=timeout)
    try:
        r = D.rank()
        if kw.get("resume") is not None:
            root = Path(kw["resume"])
        else:
            box = [str(new_run_dir(name, kw.get("out"))) if r == 0 else None]
            dist.broadcast_object_list(box, src=0)
            root = Path(box[0])
            kw["out"] = root
        if r > 0:
            kw.update(progress=False, plots=False, echo=None)
            if kw.get("resume") is not None:
                kw["resume"] = root / "ranks" / str(r)
            else:
                kw["out"] = root / "ranks" / str(r)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        with D.distributed():
            res = run(name, **kw)
        D.barrier(timeout)
        return res
    finally:
        D.shutdown()

"""Data-parallel experiment runs (what ``bilevel run ... --nproc 2`` / torchrun do on each rank),
on 2 forked gloo processes: rank 0 alone writes the run folder; resume is exact; the trace equals
a single-process run up to float32 summation order."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import bilevel as bl
from bilevel import launch
from bilevel.experiments import run
from bilevel.experiments.runner import load_trace
from tests.experiments.conftest import TINY_HC, strip_time

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

CFG = {**{k: v for k, v in TINY_HC.items() if k not in ("lower.steps", "hypergrad.iters")},
       "data.batch_size": 10, "solver": "SOBA"}  # (SOBA takes no lower steps / CG iterations)


def _rank(out, resume, stop_after):
    said: list[str] = []
    res = launch.run_rank("hyperclean", overrides=None if resume else CFG, out=out, resume=resume,
                          stop_after=stop_after, progress=False, plots=False, echo=said.append)
    return str(res.path), res.completed, said


def test_resume_and_rank0_files(tmp_path):
    # single process first: the forked ranks then inherit its lazily imported modules (fast)
    one = run("hyperclean", overrides=CFG, out=tmp_path / "one", plots=False, progress=False, echo=None)
    full = bl.distributed.spawn(_rank, 2, (tmp_path / "full", None, None), timeout=60)
    assert full[0][:2] == (str(tmp_path / "full"), True)
    assert full[1] == (str(tmp_path / "full" / "ranks" / "1"), True, [])  # rank 1: its own record
    part = bl.distributed.spawn(_rank, 2, (tmp_path / "part", None, 3), timeout=60)
    assert not part[0][1]
    # the resume hint names --nproc: every rank resumes from its own checkpoint
    hint = f"continue with: bilevel run hyperclean --resume {tmp_path / 'part'} --nproc 2"
    assert any(line.endswith(hint) for line in part[0][2]), part[0][2]
    assert launch.resume_command("hyperclean", "R") == "bilevel run hyperclean --resume R"
    bl.distributed.spawn(_rank, 2, (None, tmp_path / "part", None), timeout=60)
    a, b = load_trace(tmp_path / "full"), load_trace(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(7))
    assert strip_time(a) == strip_time(b)
    # two ranks drawing per-rank minibatches are not one process drawing one minibatch
    assert strip_time(load_trace(one.path))[-1]["upper_loss"] != strip_time(a)[-1]["upper_loss"]


def _fullbatch_rank(out):
    res = launch.run_rank("hyperclean", overrides=TINY_HC, out=out, progress=False, plots=False,
                          echo=None)
    return str(res.path)


def test_fullbatch_trace_equals_single_process(tmp_path):
    one = run("hyperclean", overrides=TINY_HC, out=tmp_path / "one", plots=False, progress=False,
              echo=None)
    bl.distributed.spawn(_fullbatch_rank, 2, (tmp_path / "dp",), timeout=60)
    a, b = load_trace(one.path), load_trace(tmp_path / "dp")
    assert len(a) == len(b) == 7
    for ra, rb in zip(a, b):  # float32 problem: only the summation order differs
        for k in ("upper_loss", "lower_loss", "test_accuracy"):
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
        # oracle counts are summed over the ranks: the union's, as one process counts them
        counts = [k for k in ra if k.startswith(("upper_", "lower_")) and isinstance(ra[k], int)]
        assert {k: ra[k] for k in counts + ["calls"]} == {k: rb[k] for k in counts + ["calls"]}
    assert a[-1]["calls"] > 0 and any(k.startswith("lower_") and isinstance(v, int)
                                      for k, v in a[-1].items())


def test_strip_nproc_and_sampler_shards():
    assert launch.strip_nproc(["run", "x", "--nproc", "2", "--seed", "1"]) == (["run", "x", "--seed", "1"], 2)
    assert launch.strip_nproc(["run", "x", "--nproc=3"]) == (["run", "x"], 3)
    import torch

    X = torch.arange(10.0).reshape(5, 2)
    s = bl.sampling.Minibatches(X, batch_size=4, seed=0)
    s0, s1 = launch.shard_sampler(s, 0, 2), launch.shard_sampler(s, 1, 2)
    assert s0.batch_size == s1.batch_size == 2
    assert torch.equal(torch.cat([s0.tensors[0], s1.tensors[0]]), X)
    assert s0.full()[0] is X  # evaluation on the union


def _dying_rank(out, die_at):
    """Rank 1 dies in the middle of step ``die_at`` (after checkpoints at steps 2, 4)."""
    if die_at is not None and bl.distributed.rank() == 1:
        import os

        real = launch.shard_setup

        def patched(setup):
            setup = real(setup)
            step = setup.solver.step

            def dying(ctx, state, t):
                if t + 1 == die_at:
                    os._exit(9)
                return step(ctx, state, t)

            setup.solver.step = dying
            return setup

        launch.shard_setup = patched
    return _fullbatch_rank(out)


def test_dead_rank_keeps_the_last_checkpoint_and_resume_finishes(tmp_path):
    one = run("hyperclean", overrides=TINY_HC, out=tmp_path / "one", plots=False, progress=False,
              echo=None)
    with pytest.raises(bl.distributed.DistributedError) as e:
        bl.distributed.spawn(_dying_rank, 2, (tmp_path / "dp", 5), timeout=30)
    assert "a peer rank died or hung" in str(e.value)
    from bilevel.experiments import checkpoint as CK

    assert CK.load(tmp_path / "dp" / "checkpoints" / "last.pt")["step"] == 4
    bl.distributed.spawn(_resume_rank, 2, (tmp_path / "dp",), timeout=60)
    a, b = load_trace(one.path), load_trace(tmp_path / "dp")
    assert [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a, b):
        assert abs(ra["upper_loss"] - rb["upper_loss"]) <= 1e-5 * max(1.0, abs(ra["upper_loss"]))


def _resume_rank(path):
    return str(launch.run_rank("hyperclean", resume=path, progress=False, plots=False,
                               echo=None).path)

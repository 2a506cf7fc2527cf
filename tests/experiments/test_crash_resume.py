"""kill -9 at any point of a CLI run, then --resume: the same trace as an uninterrupted run.

A small quadratic toy run (AID-CG, 24 outer steps, a checkpoint every 2) is killed three ways in
one chain of subprocesses — half-way through writing a checkpoint (fault injection), between the
two renames of a checkpoint, and by SIGKILL from outside after a random number of trace records —
and resumed each time. Then ``last.pt`` is truncated / corrupted by hand: the checksum catches it
and the run resumes from ``prev.pt``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bilevel.experiments import checkpoint as CK
from bilevel.experiments import load_trace, run
from tests.experiments.conftest import strip_time

SETS = {"toy": "quadratic", "solver": "LS", "inner.lr": 0.5, "inner.steps": 10, "upper.lr": 0.2,
        "steps": 24, "eval_every": 1, "checkpoint_every": 2, "memory_every": 1000, "x0": 0.5, "y0": 0.0}
ARGS = [f"{k}={v}" for k, v in SETS.items()]
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, crash: str = "") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT), OMP_NUM_THREADS="1",
               BILEVEL_CRASH_AT=crash)
    return subprocess.Popen([sys.executable, "-m", "bilevel.cli", "run", "toy", "--no-progress", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _done(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``p`` and read its stderr to the end (which closes the pipe): (return code, stderr)."""
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in load_trace(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    p = tmp_path_factory.mktemp("ref") / "run"
    run("toy", overrides=SETS, out=p, progress=False, echo=None, plots=False)
    return strip_time(load_trace(p))


def test_kill9_anywhere_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    # 1. killed half-way through writing the 3rd checkpoint (step 6): a torn last.pt.tmp is left
    rc, err = _done(_cli(*["--set", *ARGS], "--out", str(out), crash="checkpoint:3"))
    assert rc == -signal.SIGKILL, err
    assert (out / "checkpoints" / "last.pt.tmp").exists() and max(_steps(out)) >= 6
    # 2. resumed, killed between the renames of its 2nd checkpoint (only prev.pt is complete)
    rc, err = _done(_cli("--resume", str(out), crash="rename:2"))
    assert rc == -signal.SIGKILL, err
    assert not (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "prev.pt").exists()
    # 3. resumed, killed from outside after a random number of new trace records
    rng = random.Random(0)
    before = len(_steps(out))
    p = _cli("--resume", str(out))
    target = before + rng.randint(1, 6)
    t0 = time.monotonic()
    while p.poll() is None and len(load_trace(out)) < target and time.monotonic() - t0 < 300:
        time.sleep(0.01)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    _done(p, 60)
    # 4. resumed to the end
    rc, err = _done(_cli("--resume", str(out)))
    assert rc == 0, err
    assert strip_time(load_trace(out)) == reference  # every metric bit-identical, wall times excepted


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    out = tmp_path / "run"
    r = run("toy", overrides=SETS, out=out, stop_after=7, progress=False, echo=None, plots=False)
    assert not r.completed
    last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "prev.pt"
    assert CK.load(last)["step"] == 7 and CK.load(prev)["step"] == 6
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the payload
    last.write_bytes(bytes(data))
    with pytest.raises(CK.CorruptCheckpoint, match="checksum"):
        CK.load(last)
    msgs: list[str] = []
    r = run("toy", resume=out, progress=False, echo=msgs.append, plots=False)
    assert r.completed and any("checksum mismatch" in m and "prev.pt" in m for m in msgs)
    assert strip_time(load_trace(out)) == reference
    # a truncated last.pt and a garbage prev.pt: both rejected, the run starts again from step 0
    r = run("toy", overrides={**SETS, "steps": 4}, out=tmp_path / "two", stop_after=3, progress=False,
            echo=None, plots=False)
    ck = tmp_path / "two" / "checkpoints"
    (ck / "last.pt").write_bytes((ck / "last.pt").read_bytes()[:100])
    (ck / "prev.pt").write_bytes(b"not a checkpoint")
    msgs.clear()
    r = run("toy", resume=tmp_path / "two", progress=False, echo=msgs.append, plots=False)
    assert r.completed and len([m for m in msgs if "bad checkpoint" in m]) == 2
    assert any("starting from step 0" in m for m in msgs)
    assert strip_time(load_trace(tmp_path / "two")) == reference[:5]

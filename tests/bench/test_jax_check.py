"""The same-batches check of the plain-JAX references (:mod:`bilevel.bench.jax_check`).

Without JAX (CI): the recording samplers hand out the logged rows, and every solver draws exactly
the batches its JAX core consumes per iteration (the layouts raise otherwise). With a JAX
interpreter in ``BILEVEL_JAX_PYTHON``: the JAX cores, fed those batches, reproduce our iterates to
float32 rounding (and a wrong batch order does not).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from bilevel.bench import jax_check as jc
from bilevel.bench import jax_ref
from bilevel.bench.jax_compare import ST, stochastic_data


@pytest.fixture(scope="module")
def problem():
    return stochastic_data()[0]


def test_recording_sampler_logs_the_rows_it_hands_out(problem):
    A, lab, idx = problem.lower_tensors
    for cls in (jc.RecordingMinibatches, jc.RecordingFixedBatches):
        log: list = []
        s = cls(A, lab, idx, log=log, batch_size=64, seed=3)
        for _ in range(3):
            b = s.next()
            rows, last = log[-1]
            assert len(b) == 3 and len(set(rows.tolist())) == 64
            assert torch.equal(b[0], A[rows]) and torch.equal(b[2], idx[rows])
            if cls is jc.RecordingFixedBatches:
                assert torch.equal(s.batch(last)[0], b[0])
        assert len(s.full()) == 3 and s.full()[0] is A


def test_settings_match_the_jax_reference():
    assert jc.SOLVERS["vrbo"]().period == jax_ref.EXTRA["period"]
    assert jc.SOLVERS["fsla"]().momentum(7) == jax_ref.EXTRA["momentum"]
    assert jc.SOLVERS["sustain"]().momentum_x(7) == jax_ref.EXTRA["momentum"]
    assert jc.SOLVERS["amigo"]().v_steps == ST["Q"] and jc.SOLVERS["amigo"]().inner_steps == ST["inner"]


@pytest.mark.parametrize("name", sorted(jc.SOLVERS))
def test_solver_draws_what_the_jax_core_consumes(problem, name):
    steps = 1 if name == "vrbo" else 2
    idx = jc.indices(name, jc.record(name, steps, p=problem))
    b, T, Q = ST["batch"], ST["inner"], ST["Q"]
    shapes = {
        "saba": {"i": (steps,), "j": (steps,), "lpart": (3000 // b, b), "upart": (1000 // b, b)},
        "vrbo": {"F": (steps, T, b), "G": (steps, T, Q + 2, b)},
        "ttsa": {"y": (steps, b), "F": (steps, b), "hvp": (steps, Q, b), "cross": (steps, b), "p": (steps,)},
        "amigo": {"sgd": (steps, T, b), "F": (steps, b), "hvp": (steps, Q, b), "cross": (steps, b),
                  "p": (steps,)},
        "soba": {"i": (steps, b), "j": (steps, b)},
        "fsla": {"y1": (steps, b), "y2": (steps, b), "F": (steps, b)},
    }
    shapes["sustain"] = shapes["mrbo"] = shapes["ttsa"]
    shapes["stocbio"] = shapes["bsa"] = shapes["amigo"]
    assert {k: v.shape for k, v in idx.items()} == shapes[name]


def test_layout_rejects_a_different_number_of_batches():
    one = (np.arange(64), -1)
    with pytest.raises(AssertionError, match="fsla: 3 lower"):
        jc.LAYOUTS["fsla"]([one] * 3, [one])
    with pytest.raises(AssertionError, match="ttsa: 12 lower"):
        jc.LAYOUTS["ttsa"]([one] * 12, [one])


def _jax_python() -> str:
    py = os.environ.get("BILEVEL_JAX_PYTHON")
    if not py:
        pytest.skip("set BILEVEL_JAX_PYTHON to an interpreter with jax to run the JAX comparison")
    if subprocess.run([py, "-c", "import jax"], capture_output=True).returncode != 0:
        pytest.skip(f"{py} cannot import jax")
    return py


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(jc.SOLVERS))
def test_jax_core_reproduces_our_iterates(problem, name, tmp_path):
    py = _jax_python()
    np.savez(tmp_path / "st.npz", **stochastic_data()[1])
    rec = jc.record(name, p=problem)
    res = jc.compare(name, rec, py, str(tmp_path / "st.npz"), str(tmp_path))
    assert res["x_rel"] < 1e-4 and res["y_rel"] < 1e-4, res
    # the same batches in another order give another trajectory: the comparison can fail
    rec["iters"] = rec["iters"][1:] + rec["iters"][:1]
    bad = jc.compare(name, rec, py, str(tmp_path / "st.npz"), str(tmp_path))
    assert max(bad["x_rel"], bad["y_rel"]) > 1e-3, bad

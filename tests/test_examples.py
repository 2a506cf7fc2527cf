"""The examples the README and guide point to run and print what they claim."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

import bilevel as bl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    dtype = torch.get_default_dtype()  # examples may set a global default dtype: don't leak it
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        torch.set_default_dtype(dtype)
    return capsys.readouterr().out


def test_quickstart_estimators_match_the_closed_form(capsys):
    out = _run("quickstart.py", capsys)
    errors = {
        " ".join(line.split("relative error")[0].split()): float(line.split()[-1])
        for line in out.splitlines()
        if "relative error" in line
    }
    assert set(errors) == {"CG", "Neumann", "Reverse None", "Reverse 20", "Forward", "FirstOrder"}
    # converged (float64) estimators agree with the ridge closed form; first order misses the implicit term
    assert all(v < 1e-8 for k, v in errors.items() if k != "FirstOrder")
    assert errors["FirstOrder"] > 0.5
    before, after = map(float, re.search(r"validation loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < 0.6 * before


def test_stochastic_example_reduces_the_exact_hypergradient(capsys):
    out = _run("stochastic_soba.py", capsys)
    before, after = map(float, out.splitlines()[0].split(" -> "))
    assert after < 0.01 * before


def test_pytorch_cnn_example_tiny(capsys, monkeypatch):
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", ["pytorch_cnn.py", "--tiny"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run("pytorch_cnn.py", capsys)
    assert not [w for w in caught if issubclass(w.category, bl.LinearSolveWarning)]
    rel = float(re.search(r"bl.hypergrad.CG: relative difference ([\d.e+-]+)", out).group(1))
    assert rel < 1e-6  # the autograd function's backward is the CG estimator's hypergradient
    assert "reproduces the functional eval-mode output: True" in out
    assert float(re.search(r"test accuracy ([\d.]+)", out).group(1)) > 0.3  # chance: 0.1


def test_vmap_example_matches_the_loop_and_learns_the_regularization(capsys):
    out = _run("vmap_tasks.py", capsys)
    dev = float(re.search(r"max \|vmap - loop\| = ([\d.e+-]+)", out).group(1))
    assert dev < 1e-10
    before, after = map(float, re.search(r"validation loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < 0.5 * before
    reg = [float(v) for v in re.search(r"exp\(x\): \[(.*)\]", out).group(1).split(",")]
    assert max(reg[:2]) < 0.1 < 5.0 < min(reg[2:])  # useful features kept, useless ones shrunk


def test_maml_sinusoid_example_meta_trains(capsys):
    out = _run("maml_sinusoid.py", capsys)
    m0, c0, m1, c1 = map(float, re.search(
        r"10 steps: ([\d.]+) ± ([\d.]+) -> ([\d.]+) ± ([\d.]+)", out).groups())
    assert m1 < m0 - (c0 + c1)  # meta-training helps beyond the episode noise (seeded: deterministic)


def test_distributed_example_matches_one_process(capsys):
    out = _run("distributed_cg.py", capsys)
    diff = float(re.search(r"= ([\d.e+-]+)", out).group(1))
    assert diff < 1e-12 and "ranks agree: True" in out
    assert "all-reduces: 73," in out  # 50 gradients, (f, ∇f), (g, ∇_y g), 20 H-products, 1 cross


@pytest.mark.compiled
def test_oracle_backends_example(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["oracle_backends.py", "--compile-backend", "aot_eager"])
    old = dict(__import__("bilevel").compiled.settings)
    try:
        out = _run("oracle_backends.py", capsys)
    finally:
        __import__("bilevel").compiled.settings.update(old)
    diffs = [float(m) for m in re.findall(r"max abs difference ([\d.e+-]+)", out)]
    assert len(diffs) == 2 and all(d < 1e-12 for d in diffs)


def test_indefinite_example_minres_and_normal_cg_are_exact_cg_flags_its_breakdown(capsys):
    out = _run("indefinite_lower_level.py", capsys)
    rows = {line[:16].strip(): line[16:].split() for line in out.splitlines() if "relative error" in line}
    assert set(rows) == {"CG", "MINRES", "NormalCG", "CG damping=0.01", "CG damping=4"}
    err = {k: float(v[2]) for k, v in rows.items()}
    assert err["MINRES"] < 1e-10 and err["NormalCG"] < 1e-10
    assert rows["CG"][4] == "negative_curvature" and rows["CG"][6] == "True"
    assert rows["CG damping=4"][4] == "None" and err["CG damping=4"] > 0.1  # stable but biased


def test_multilevel_example_one_outer_step_matches_the_closed_form(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["multilevel.py", "--outer", "1"])
    out = _run("multilevel.py", capsys)
    err = float(re.search(r"relative error vs the closed form ([\d.e+-]+)", out).group(1))
    # the middle level runs 25 κ GD steps (error ~e^-25 ≈ 1e-11 in y*), the backward solves by CG
    assert err < 1e-7
    assert "distance to the closed-form optimum" in out


def test_batchnorm_unroll_example_carries_exact_statistics(capsys):
    out = _run("batchnorm_unroll.py", capsys)
    rev, fwd = map(float, re.search(r"Reverse ([\d.e+-]+), Forward ([\d.e+-]+)", out).groups())
    assert abs(rev - fwd) <= 1e-10 * abs(rev) and rev != 0.0
    assert "max abs difference 0.0e+00; num_batches_tracked 10" in out
    assert "module untouched: True" in out


@pytest.mark.compiled
@pytest.mark.slow  # ~2 min of graph tracing on a loaded 2-core machine (tests/test_compiled_step.py
# covers the same path in the default suite)
@pytest.mark.parametrize("loops, solver", [("unroll", "stocbio"), ("while_loop", "stocbio"),
                                           ("unroll", "saba")])
def test_compiled_solver_example_equals_eager(capsys, monkeypatch, loops, solver):
    import bilevel.compiled_step as CS

    monkeypatch.setattr("sys.argv", ["compiled_solver.py", "12", "aot_eager", loops, solver])
    old, old_step = dict(bl.compiled.settings), dict(CS.settings)
    try:
        out = _run("compiled_solver.py", capsys)
    finally:
        bl.compiled.settings.update(old)
        CS.settings.update(old_step)
    assert "same oracle counts: True" in out
    assert float(re.search(r"max \|x_compiled - x_eager\| = (\S+),", out).group(1)) < 1e-10
    assert "(12 of 12 steps compiled" in out  # the second run: every pattern known

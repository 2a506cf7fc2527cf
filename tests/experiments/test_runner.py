"""The runner: run folder, trace, time accounting, checkpoints and resume, tables, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bilevel.errors import ConfigError
from bilevel.experiments import checkpoint as CK
from bilevel.experiments import config as C
from bilevel.experiments import get, load_trace, run
from bilevel.experiments import runner as R
from bilevel.experiments.plots import plot_runs
from bilevel.sampling import Minibatches
from tests.experiments.conftest import TINY_HC, strip_time

PNG = b"\x89PNG\r\n\x1a\n"
QUIET = {"progress": False, "echo": None}


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


def test_run_folder_and_exact_trace(tmp_path):
    """Toy h(x) = ½‖x − b‖² with GD(0.3) on exact hypergradients: ‖x_t − b‖ = 0.7^t ‖b‖."""
    res = run("test-quad", out=tmp_path / "r", **QUIET)
    p = res.path
    assert res.completed and p == tmp_path / "r"
    for f in ("config.toml", "run.json", "trace.jsonl", "extras.json", "summary.md", "result.json",
              "checkpoints/last.pt"):
        assert (p / f).is_file(), f
    assert get("test-quad").resolve(file=C.read(p / "config.toml")) == C.read(p / "config.toml")
    trace = load_trace(p)
    assert [r["step"] for r in trace] == [0, 2, 4, 6, 8]
    bnorm = math.sqrt(1 + 4 + 9)
    for r in trace:
        assert r["x_err"] == pytest.approx(0.7 ** r["step"] * bnorm, rel=1e-6)
        # y is the lower solution computed at the previous x (HypergradientDescent keeps y_t = y*(x_{t-1}))
        assert r["upper_loss"] == pytest.approx(0.5 * (0.7 ** max(r["step"] - 1, 0) * bnorm) ** 2, rel=1e-6)
        assert {"time", "lower_loss", "calls"} <= set(r)
    assert trace[0]["time"] == 0.0 and trace[0]["calls"] == 0
    assert all(a["time"] <= b["time"] for a, b in zip(trace, trace[1:]))
    # oracle counts: 31 lower gradients (30 GD steps + linearization) per outer step, 1 upper
    assert trace[-1]["lower_grad"] == 8 * 31 and trace[-1]["upper_grad"] == 8
    assert json.loads((p / "extras.json").read_text()) == {"optimum": 0.0}
    assert "| quantity" in (p / "summary.md").read_text()
    for name in ("metrics_vs_step.png", "metrics_vs_time.png"):
        assert _png_ok(p / "plots" / name)


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('steps = 4\neval_every = 4\n[upper]\nlr = 0.5\noptimizer = "gd"\n')
    res = run("test-quad", config_file=f, overrides=["upper.lr=0.1"], seed=3, out=tmp_path / "r", plots=False,
              **QUIET)
    cfg = C.read(res.path / "config.toml")
    assert (cfg["steps"], cfg["eval_every"], cfg["upper"]["lr"], cfg["seed"]) == (4, 4, 0.1, 3)
    assert res.final["x_err"] == pytest.approx(0.9 ** 4 * math.sqrt(14), rel=1e-6)
    f.write_text("[upper]\nbeta = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'upper.beta'"):
        run("test-quad", config_file=f, **QUIET)


def test_trace_time_excludes_evaluation(tmp_path):
    res = run("test-quad", overrides={"sleep": 0.3}, out=tmp_path / "r", plots=False, **QUIET)
    slept = 5 * 0.3  # 5 evaluations (steps 0, 2, 4, 6, 8), each sleeping 0.3 s
    assert res.info["eval_time_s"] >= slept
    # had the clock included evaluation, the solver time would be >= the time slept; the solver's
    # own work is a few ms, so this holds on a loaded machine too (a wall-time bound did not)
    assert load_trace(res.path)[-1]["time"] < slept and res.info["solver_time_s"] < slept
    assert res.info["wall_time_s"] >= 1.5


@pytest.mark.parametrize("extra", [{}, {"data.batch_size": 16}], ids=["fullbatch-cg-warmstart", "minibatch"])
def test_resume_equals_uninterrupted(tmp_path, extra):
    cfg = {**TINY_HC, **extra}
    full = run("hyperclean", overrides=cfg, out=tmp_path / "full", plots=False, **QUIET)
    part = run("hyperclean", overrides=cfg, out=tmp_path / "part", plots=False, stop_after=3, **QUIET)
    assert full.completed and not part.completed
    assert [r["step"] for r in load_trace(tmp_path / "part")] == [0, 1, 2, 3]
    assert not (tmp_path / "part" / "summary.md").exists()
    done = run("hyperclean", resume=tmp_path / "part", plots=False, **QUIET)
    assert done.completed
    a, b = load_trace(tmp_path / "full"), load_trace(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(7))
    assert strip_time(a) == strip_time(b)


def test_resume_equality_test_is_sensitive(tmp_path, monkeypatch):
    """The equality test above can fail: if the sampler position is not restored, the resumed
    minibatch run sees different batches and its trace differs."""
    cfg = {**TINY_HC, "data.batch_size": 16}
    full = run("hyperclean", overrides=cfg, out=tmp_path / "full", plots=False, **QUIET)
    run("hyperclean", overrides=cfg, out=tmp_path / "part", plots=False, stop_after=3, **QUIET)
    monkeypatch.setattr(Minibatches, "load_state_dict", lambda self, state: None)
    run("hyperclean", resume=tmp_path / "part", plots=False, **QUIET)
    a, b = strip_time(load_trace(full.path)), strip_time(load_trace(tmp_path / "part"))
    assert a[:4] == b[:4] and a[4:] != b[4:]


def test_resume_after_a_crash_drops_records_past_the_checkpoint(tmp_path):
    run("hyperclean", overrides=TINY_HC, out=tmp_path / "full", plots=False, **QUIET)
    p = tmp_path / "part"
    run("hyperclean", overrides=TINY_HC, out=p, plots=False, stop_after=3, **QUIET)
    with open(p / "trace.jsonl", "a") as fh:  # a record written after the checkpoint, then a crash
        fh.write(json.dumps({"step": 4, "bogus": 1}) + "\n")
    run("hyperclean", resume=p, plots=False, **QUIET)
    assert strip_time(load_trace(p)) == strip_time(load_trace(tmp_path / "full"))


def test_resume_extends_a_finished_run(tmp_path):
    run("test-quad", out=tmp_path / "a", plots=False, **QUIET)
    res = run("test-quad", resume=tmp_path / "a", overrides=["steps=12"], plots=False, **QUIET)
    ref = run("test-quad", overrides={"steps": 12}, out=tmp_path / "b", plots=False, **QUIET)
    assert res.completed and [r["step"] for r in load_trace(res.path)][-1] == 12
    assert strip_time(load_trace(res.path)) == strip_time(load_trace(ref.path))
    assert C.read(res.path / "config.toml")["steps"] == 12


def test_threads_setting_is_applied_and_restored(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res = run("test-quad", out=tmp_path / "a", plots=False, **QUIET)  # default threads = 1
        assert {r["threads"] for r in load_trace(res.path)} == {1} and torch.get_num_threads() == 2
        res = run("test-quad", overrides={"threads": 0}, out=tmp_path / "b", plots=False, **QUIET)
        assert {r["threads"] for r in load_trace(res.path)} == {2}
        with pytest.raises(ConfigError, match="threads must be >= 0"):
            run("test-quad", overrides={"threads": -1}, **QUIET)
    finally:
        torch.set_num_threads(before)


def test_resume_and_out_errors(tmp_path):
    run("test-quad", out=tmp_path / "a", plots=False, **QUIET)
    with pytest.raises(ConfigError, match="cannot change upper.lr"):
        run("test-quad", resume=tmp_path / "a", overrides=["upper.lr=0.1"], **QUIET)
    with pytest.raises(ConfigError, match="not 'hyperclean'"):
        run("hyperclean", resume=tmp_path / "a", **QUIET)
    with pytest.raises(ConfigError, match="--seed 5 differs"):
        run("test-quad", resume=tmp_path / "a", seed=5, **QUIET)
    with pytest.raises(ConfigError, match="not a run folder"):
        run("test-quad", resume=tmp_path, **QUIET)
    with pytest.raises(ConfigError, match="already holds a run"):
        run("test-quad", out=tmp_path / "a", **QUIET)
    with pytest.raises(ConfigError, match="unknown experiment"):
        run("no-such-experiment", **QUIET)


def test_checkpoint_holds_state_rng_and_solver_internals(tmp_path):
    res = run("test-quad", out=tmp_path / "a", stop_after=3, plots=False, **QUIET)
    ck = CK.load(res.path / R.CHECKPOINT)
    assert ck["step"] == 3 and ck["state"]["t"] == 3 and len(ck["state"]["x"]) == 1
    assert {"torch", "numpy", "python"} <= set(ck["rng"])
    assert ck["solver"]["estimator"][0] == "obj"  # solver attributes are captured recursively
    assert ck["extras"] == {"optimum": 0.0}


def test_capture_restore_round_trip():
    """Private solver attributes (tensors, generators, nested bilevel objects) survive a checkpoint."""
    from bilevel.hypergrad import ZerothOrder
    from bilevel.inner import GD

    est = ZerothOrder(GD(lr=0.1, steps=2), samples=2, seed=3)
    est.generator = torch.Generator().manual_seed(3)  # an object-held generator (e.g. a user subclass)
    est._buf = (torch.ones(2), 3)
    snap = R._capture(est)
    expected = torch.randn(5, generator=est.generator)
    est._buf = None
    est.inner.lr = 99.0
    R._restore(est, snap)
    assert torch.equal(torch.randn(5, generator=est.generator), expected)
    assert torch.equal(est._buf[0], torch.ones(2)) and est._buf[1] == 3 and est.inner.lr == 0.1


def test_new_run_dir_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = R.new_run_dir("x")
    b = R.new_run_dir("x")
    assert a.parent == b.parent == Path("runs") and a != b and a.name.startswith("x-") and a.is_dir()


def test_table_records_a_failed_sub_run_and_runs_the_others(tmp_path):
    """upper.lr = 1e200 on test-quad overflows x at step 2 (NonFiniteError): the table keeps going,
    summarizes the completed sub-runs, lists the failure, and a resumed table does not rerun it."""
    r = run("test-quad-table", overrides={"lrs": [0.5, 1e200], "seeds": 1}, out=tmp_path / "t",
            plots=False, **QUIET)
    assert r.completed and r.info["runs"] == 1 and r.info["failed"] == 1
    text = (tmp_path / "t" / "summary.md").read_text()
    assert f"{0.5 ** 8 * math.sqrt(14):.4f}" in text
    assert "**1 of 2 sub-runs failed**" in text and "lr=1e+200 (seed 0): NonFiniteError" in text
    res = json.loads((tmp_path / "t" / "result.json").read_text())
    assert [f["label"] for f in res["failed"]] == ["lr=1e+200"]
    with pytest.raises(ConfigError):  # a bad setting is still an error, not a failed sub-run
        run("test-quad-table", overrides={"lrs": [0.5, "x"]}, out=tmp_path / "bad", **QUIET)


def test_table_summary_and_resume(tmp_path):
    full = run("test-quad-table", out=tmp_path / "t", **QUIET)
    assert full.completed
    subs = sorted(p.name for p in (tmp_path / "t" / "runs").iterdir())
    assert subs == ["lr_0.1-seed0", "lr_0.1-seed1", "lr_0.5-seed0", "lr_0.5-seed1"]
    text = (tmp_path / "t" / "summary.md").read_text()
    bnorm = math.sqrt(14)
    assert f"{0.9 ** 8 * bnorm:.4f} ± 0.0000" in text and f"{0.5 ** 8 * bnorm:.4f} ± 0.0000" in text
    assert _png_ok(tmp_path / "t" / "plots" / "compare_vs_step.png")
    part = run("test-quad-table", out=tmp_path / "u", stop_after=3, plots=False, **QUIET)
    assert not part.completed
    done = run("test-quad-table", resume=tmp_path / "u", plots=False, **QUIET)
    assert done.completed
    ra = json.loads((tmp_path / "t" / "result.json").read_text())["runs"]
    rb = json.loads((tmp_path / "u" / "result.json").read_text())["runs"]
    assert strip_time([r["final"] for r in ra]) == strip_time([r["final"] for r in rb])


def test_plot_runs_overlay(tmp_path):
    a = run("test-quad", out=tmp_path / "a", plots=False, **QUIET).path
    b = run("test-quad", out=tmp_path / "b", overrides={"upper.lr": 0.1}, plots=False, **QUIET).path
    files = plot_runs([a, b], tmp_path / "cmp", xs=("step", "time", "calls"))
    assert [f.name for f in files] == ["compare_vs_step.png", "compare_vs_time.png", "compare_vs_calls.png"]
    assert all(_png_ok(f) for f in files)
    with pytest.raises(FileNotFoundError):
        plot_runs([tmp_path / "cmp"], tmp_path / "x")

"""``bilevel run fewshot`` / ``sinusoid`` end to end on tiny settings (no accuracy claims), exact
resume, configuration errors, and the ``bilevel bench metalearning`` smoke test."""

from __future__ import annotations

import pytest

from bilevel.bench import metalearning as mb
from bilevel.errors import ConfigError
from bilevel.experiments.runner import run

QUIET = {"progress": False, "echo": None, "plots": False}
TINY = {"steps": 4, "eval_every": 4, "checkpoint_every": 0, "meta_batch": 2, "hidden": 8,
        "inner_steps": 1, "test_inner_steps": 2, "monitor_tasks": 2, "queries": 1, "ways": 2}


def test_fewshot_runs_and_resumes_exactly(tmp_path):
    full = run("fewshot", overrides={**TINY, "method": "metasgd"}, out=tmp_path / "a", **QUIET)
    assert full.completed and 0.0 <= full.final["test_acc"] <= 1.0
    assert full.final["test_acc_ci95"] > 0 and "meta_loss" in full.final
    assert "± " in full.summary and "(600 episodes)" in full.summary
    part = run("fewshot", overrides={**TINY, "method": "metasgd"}, out=tmp_path / "b",
               stop_after=2, **QUIET)
    assert not part.completed
    done = run("fewshot", resume=part.path, **QUIET)
    assert done.completed and done.final["test_acc"] == full.final["test_acc"]
    assert done.final["upper_loss"] == full.final["upper_loss"]


def test_sinusoid_runs(tmp_path):
    res = run("sinusoid", overrides={"steps": 2, "eval_every": 2, "meta_batch": 2, "hidden": 8,
                                     "method": "anil"}, out=tmp_path / "s", **QUIET)
    assert res.completed and res.final["mse_1step"] > 0 and res.final["mse_10step_ci95"] > 0
    assert "init_mse_1step" in res.extras


def test_fewshot_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="test_episodes must be >= 600"):
        run("fewshot", overrides={**TINY, "test_episodes": 100}, out=tmp_path / "e1", **QUIET)
    with pytest.raises(ConfigError, match="ways=6 but the digits meta-train split has only 5"):
        run("fewshot", overrides={**TINY, "ways": 6}, out=tmp_path / "e2", **QUIET)
    with pytest.raises(ConfigError, match="method"):
        run("fewshot", overrides={**TINY, "method": "reptile"}, out=tmp_path / "e3", **QUIET)
    with pytest.raises(ConfigError, match="not one of maml, fomaml, anil, imaml, metasgd"):
        run("sinusoid", overrides={"method": "protonet"}, out=tmp_path / "e4", **QUIET)


def test_bench_metalearning_smoke(capsys):
    assert mb.main(["--tasks", "3", "--steps", "2", "--rounds", "1", "--no-memory"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch.func vmap", "Reverse per task", "plain PyTorch loop", "tasks/s"):
        assert needle in out


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
def test_the_runner_compile_key_runs_meta_training_compiled_and_resumes(tmp_path):
    """``--set compile=step``: the meta-steps after the first run as one graph (``compiled`` in
    the trace, evaluated steps), the results equal the eager run's; a run resumed with
    compile=step equals it too; an unknown value is a ConfigError."""
    from bilevel.experiments.runner import load_trace

    cfg = {**TINY, "method": "fomaml", "steps": 3, "eval_every": 3, "dtype": "float64"}
    eager = run("fewshot", overrides=cfg, out=tmp_path / "e", **QUIET)
    comp = run("fewshot", overrides={**cfg, "compile": "step"}, out=tmp_path / "c", **QUIET)
    assert load_trace(comp.path)[-1]["compiled"] is True  # (the trace records evaluated steps)
    for key in ("test_acc", "upper_loss", "meta_loss"):
        assert comp.final[key] == pytest.approx(eager.final[key], rel=1e-10), key
    part = run("fewshot", overrides=cfg, out=tmp_path / "p", stop_after=1, **QUIET)
    done = run("fewshot", resume=part.path, overrides={"compile": "step"}, **QUIET)
    assert done.final["upper_loss"] == pytest.approx(eager.final["upper_loss"], rel=1e-10)
    with pytest.raises(ConfigError, match="compile"):
        run("fewshot", overrides={**cfg, "compile": "yes"}, out=tmp_path / "x", **QUIET)


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
def test_bench_metalearning_compiled_smoke(capsys):
    assert mb.main(["--compiled", "--tasks", "2", "--steps", "1", "--rounds", "2", "--reps", "2"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.endswith("| True |")  # every timed step ran as the compiled graph


def test_fewshot_and_sinusoid_honour_dtype(tmp_path):
    """dtype=float64 reaches data, tasks and meta-parameters (the runner rejects a run whose
    variables do not follow it); also runs IAPTT-GM's few-shot variant and vmapped iMAML."""
    res = run("fewshot", overrides={**TINY, "steps": 1, "eval_every": 1, "method": "iaptt",
                                    "dtype": "float64"}, out=tmp_path / "f", **QUIET)
    assert res.completed and 0.0 <= res.final["test_acc"] <= 1.0
    res = run("sinusoid", overrides={"steps": 1, "eval_every": 1, "meta_batch": 2, "hidden": 4,
                                     "method": "imaml", "imaml_inner_steps": 2, "cg_iters": 2,
                                     "dtype": "float64"}, out=tmp_path / "s", **QUIET)
    assert res.completed and res.final["mse_1step"] > 0 and "inner_grad_norm" in res.final

"""Every setting is used or rejected; the summary says what ran; lower-level optimality is reported."""

from __future__ import annotations

import json

import pytest

from bilevel.cli import main
from bilevel.errors import ConfigError
from bilevel.experiments import factory as Fa
from bilevel.experiments import get, load_trace, run
from bilevel.experiments.runner import lower_verdict
from tests.experiments.conftest import TINY_HC

QUIET = {"progress": False, "echo": None, "plots": False}
TINY_SOBA = {k: v for k, v in TINY_HC.items() if k != "lower.steps"}  # SOBA has a single loop
SOBA = {**TINY_SOBA, "steps": 3, "solver": "SOBA", "upper.lr": 10.0, "lower.lr": 0.01}


def test_unused_key_is_rejected_naming_the_solver(tmp_path):
    """The issue's command: hypergrad.iters means nothing to SOBA, so the run must not start."""
    with pytest.raises(ConfigError, match=r"hypergrad.iters is not used by SOBA\(lr_x=10, lr_y=0.01\)"):
        run("hyperclean", overrides={**SOBA, "hypergrad.iters": 50}, out=tmp_path / "r", **QUIET)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="upper.optimizer is not used by SOBA"):
        run("hyperclean", overrides={**SOBA, "upper.optimizer": "sgd"}, out=tmp_path / "r", **QUIET)
    # a key of the config file counts as set explicitly too
    f = tmp_path / "c.toml"
    f.write_text('solver = "SOBA"\n[hypergrad]\ntruncate = 3\n')
    with pytest.raises(ConfigError, match="hypergrad.truncate is not used"):
        run("hyperclean", config_file=f, overrides=TINY_SOBA, out=tmp_path / "r", **QUIET)


def test_stochastic_step_sizes_are_used_and_reported(tmp_path):
    a = run("hyperclean", overrides=SOBA, out=tmp_path / "a", **QUIET)
    b = run("hyperclean", overrides={**SOBA, "upper.lr": 0.1, "lower.lr": 0.5}, out=tmp_path / "b", **QUIET)
    assert a.final["upper_loss"] != b.final["upper_loss"]  # the step sizes reach the solver
    line = a.summary.split("solver: ")[1].split("\n")[0]
    assert line == "SOBA(lr_x=10, lr_y=0.01)"  # not "estimator cg ... upper adam lr 0.1"
    assert "config keys not used by this solver: hypergrad.alpha, hypergrad.damping," in a.summary
    res = json.loads((a.path / "result.json").read_text())
    assert res["info"]["solver"] == "SOBA(lr_x=10, lr_y=0.01)"
    assert "hypergrad.iters" in res["info"]["unused_keys"] and "upper.lr" not in res["info"]["unused_keys"]
    d = run("hyperclean", overrides={**SOBA, "upper.decay": 0.5}, out=tmp_path / "d", **QUIET)
    assert "lr_x=Schedule(10.0, e=0.5" in d.summary


def test_deterministic_summary_describes_the_estimator(tmp_path):
    r = run("hyperclean", overrides={**TINY_HC, "steps": 2, "hypergrad.estimator": "neumann",
                                     "hypergrad.iters": 4}, out=tmp_path / "r", **QUIET)
    line = r.summary.split("solver: ")[1].split("\n")[0]
    assert "estimator=Neumann(inner=GD(lr=0.5, steps=3), iters=4" in line and "upper=Adam(lr=0.3)" in line
    with pytest.raises(ConfigError, match="lower.momentum is not used"):  # GD has no momentum
        run("hyperclean", overrides={**TINY_HC, "lower.momentum": 0.5}, out=tmp_path / "m", **QUIET)


def test_factory_build_tracks_keys_and_builds_lazily():
    built = []

    def est():
        built.append(1)
        return Fa.build("estimator", "cg", {"inner": None, "iters": Fa.Arg(3, ("h.iters",))})

    s = Fa.build("solver", "SOBA", {"estimator": Fa.Arg(Fa.Lazy(est)), "lr_x": Fa.Arg(0.5, ("u.lr",)),
                                    "iters": Fa.Arg(9, ("h.iters",))}, keys=("solver",))
    assert not built and s.used == {"u.lr", "solver"} and s.describe() == "SOBA(lr_x=0.5)"
    ls = Fa.build("solver", "LS", {"inner": Fa.make_dynamics("gd", 0.1, 5), "estimator": Fa.Arg(Fa.Lazy(est)),
                                   "linear_solver": Fa.Arg("neumann", ("h.est",))})
    assert type(ls.obj).__name__ == "AID" and ls.obj.linear_solver == "cg"  # the alias fixes it
    assert "h.est" not in ls.used and ls.name == "AID [LS]"
    with pytest.raises(ConfigError, match="does not take bogus"):  # a plain value must be taken
        Fa.build("solver", "SOBA", {"bogus": 1})


def test_set_type_errors_do_not_leak_internal_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "hyperclean", "--set", "steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "steps: expected int, got 'abc' (str)" in err and "_Raw" not in err


def test_plot_unknown_metric_is_an_error(tmp_path, capsys):
    r = run("test-quad", out=tmp_path / "r", **QUIET)
    assert main(["plot", str(r.path), "--out", str(tmp_path / "p"), "--metrics", "nonexistent"]) == 2
    assert "no metric 'nonexistent'" in capsys.readouterr().err


# --- lower-level optimality -------------------------------------------------------------------------
def test_every_record_has_the_lower_stationarity(tmp_path):
    """test-quad: g = ½‖y − x‖², so ‖∇_y g‖ = ‖y − x‖. HypergradientDescent solves the lower level at
    x_{t−1} (y_t by 30 warm-started GD steps of 0.5 from y_{t−1}) and then moves x; the runner judges
    y_t at the x it was solved for (Solver.lower_pair), not at the updated x_t. With
    ‖y_{t−1} − x_{t−1}‖ = ‖x_{t−1} − x_{t−2}‖ = 0.3 · 0.7^(t−2) ‖b‖:  ‖∇_y g‖ = 0.5³⁰ · 0.3 · 0.7^(t−2) ‖b‖
    (at the lagged pair it would be 0.3 · 0.7^(t−1) ‖b‖ ≈ 0.8 and the run would be flagged unsolved)."""
    r = run("test-quad", out=tmp_path / "r", **QUIET)
    tr = load_trace(r.path)
    bnorm = 14 ** 0.5
    assert tr[0]["lower_grad_norm"] == 0.0
    for rec in tr[1:]:
        assert rec["lower_grad_norm"] == pytest.approx(0.5 ** 30 * 0.3 * 0.7 ** (rec["step"] - 2) * bnorm,
                                                       rel=1e-6)
    assert r.info["lower"]["solved"] is True and "— solved (" in r.summary


def test_unsolved_lower_level_is_flagged_from_another_start(tmp_path):
    """IAPTT-GM from x0 = 10 (the upper bound): x stays at the bound and g stays far above g* = −1."""
    r = run("toy", overrides={"x0": 10.0, "y0": 0.0, "steps": 30, "eval_every": 10}, out=tmp_path / "r",
            **QUIET)
    assert r.final["lower_gap"] > 0.3 and r.info["lower"]["solved"] is False
    assert "**NOT SOLVED**" in r.summary
    res = json.loads((r.path / "result.json").read_text())
    assert res["info"]["lower"]["solved"] is False and res["info"]["lower"]["gap"] == pytest.approx(
        r.final["lower_gap"])
    # the quadratic toy's closed-form g*: g − g* = ½ ∇gᵀ H⁻¹ ∇g lies in [½‖∇g‖²/L, ½‖∇g‖²/μ], eig(H) ∈ [1, 2]
    q = run("toy", overrides={"toy": "quadratic", "solver": "LS", "inner.lr": 0.5, "upper.lr": 0.2,
                              "steps": 30, "eval_every": 10, "x0": 0.5, "y0": 0.0},
            out=tmp_path / "q", **QUIET)
    for rec in load_trace(q.path):
        half = 0.5 * rec["lower_grad_norm"] ** 2
        assert half / 2 * (1 - 1e-6) <= rec["lower_gap"] <= half * (1 + 1e-6) + 1e-15
    assert q.final["lower_gap"] < 1e-9 and q.info["lower"]["solved"] is True


def test_lower_verdict_rules():
    tr = [{"lower_grad_norm": 10.0}]
    assert lower_verdict(tr, {"lower_grad_norm": 0.05}, 1e-2)["solved"] is True    # 0.05 <= 1e-2 * 10
    assert lower_verdict(tr, {"lower_grad_norm": 0.2}, 1e-2)["solved"] is False
    v = lower_verdict(tr, {"lower_grad_norm": 9.0, "lower_gap": 0.05}, 1e-2, g_star=-10.0)
    assert v["solved"] is True and v["gap"] == 0.05  # the gap decides where g* is known: 0.05 <= 0.1
    assert lower_verdict([], {}, 1e-2) == {"tol": 1e-2}


def test_toy_defaults_are_the_papers():
    cfg = get("toy").resolve()
    assert (cfg["inner"]["steps"], cfg["inner"]["lr"], cfg["upper"]["lr"]) == (40, 5e-4, 0.1)
    t = get("iaptt-toy").resolve()
    assert (t["inner_steps"], t["inner_lr"], t["upper_lr"]) == (40, 5e-4, 0.1)


def test_lower_level_by_design_gets_no_verdict():
    """Setup.lower_by_design (e.g. T unrolled training steps): the stationarity is recorded, no
    solved / NOT SOLVED verdict is given, and the summary states the reason."""
    from bilevel.experiments.runner import lower_line, lower_verdict

    trace = [{"lower_grad_norm": 1.0}]
    assert lower_verdict(trace, {"lower_grad_norm": 0.5}, 1e-2)["solved"] is False
    v = lower_verdict(trace, {"lower_grad_norm": 0.5}, 1e-2, by_design="T steps, not an argmin")
    assert v["solved"] is None and v["grad_norm"] == 0.5
    line = lower_line(v)
    assert "not judged: T steps, not an argmin" in line and "SOLVED" not in line and "solved" not in line


def test_lower_cell_of_a_table():
    from bilevel.experiments.base import SubResult, SubRun, lower_cell

    def sub(lower):
        return SubResult(SubRun(label="a", experiment="toy", seed=0), None, {}, {}, {"lower": lower})

    assert [lower_cell(sub({"solved": v})) for v in (True, False, None)] == ["yes", "NO", "—"]
    assert lower_cell(sub({})) == "—"

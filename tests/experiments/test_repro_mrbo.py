"""The MRBO/VRBO report reproduction (docs/reproduction.md sec. 1): settings and the fast run."""

from __future__ import annotations

import json
import math
import os

import pytest

from bilevel.experiments import repro_mrbo as RM

#: the report's sec. 6.2 settings table, transcribed independently of the module
REPORT_TABLE = {
    "n_train": 20000,
    "n_test": 500,
    "n_val": 5000,
    "batch_size": 480,
    "outer_epochs": 40,
    "inner_iterations": 200,
    "outer_lr": 0.1,
    "inner_lr": 0.1,
    "corruption": 0.1,
}


def test_settings_are_the_reports():
    for k, v in REPORT_TABLE.items():
        assert RM.REPORT[k] == v, k
    d = RM.DEFAULTS
    # where the report states a value we use it; the data sizes are the bundled sample's (4:1 kept)
    assert (d["corruption"], d["batch_size"], d["outer_lr"], d["inner_lr"], d["inner_steps"]) == (
        0.1,
        480,
        0.1,
        0.1,
        200,
    )
    assert d["n_test"] == RM.REPORT["n_test"] and d["n_train"] == 4 * d["n_val"]
    assert d["n_train"] + d["n_val"] + d["n_test"] <= 5000 and d["seeds"] >= 5
    assert set(RM.REPORT["solvers"]) | {"SUSTAIN"} == set(RM.SOLVERS)
    rows = {r[0]: r for r in RM.settings_rows()}
    assert rows["corruption"][1] == rows["corruption"][2] == "0.1"
    assert rows["inner iterations"][1] == rows["inner iterations"][2] == "200"


def test_solver_settings():
    d = RM.DEFAULTS
    s = RM.make_solver("StocBiO", d)
    assert (s.inner_steps, s.Q, s.eta, s.lr_x(5), s.lr_y(5)) == (200, d["Q"], d["eta"], 0.1, 0.1)
    m = RM.make_solver("MRBO", d)  # η_k = (m/(m+k))^{1/3}: 0.1 at k = 0, decaying like k^{-1/3}
    assert m.lr_x(0) == pytest.approx(0.1) and m.lr_x(7) == pytest.approx(0.1 * (1 / 8) ** (1 / 3))
    assert RM.make_solver("AID-FP", d).estimator.iters == d["Q"]
    assert RM.make_solver("reverse", d).warm_start


def test_fast_run_all_solvers_with_lower_verdict(tmp_path):
    cfg = {**RM.QUICK, "n_train": 200, "n_val": 50, "n_test": 50, "budget": 1.0e4}
    written = RM.run_all(tmp_path, cfg, list(RM.SOLVERS), [0], echo=None)
    assert len(written) == len(RM.SOLVERS)
    RM.run_all(tmp_path, cfg, ["StocBiO"], [1], echo=None)
    res = RM.load_results(tmp_path)
    assert set(res) == set(RM.SOLVERS) and [r["seed"] for r in res["StocBiO"]] == [0, 1]
    for s, rs in res.items():
        for r in rs:
            f = r["final"]
            assert f["calls"] >= cfg["budget"], s  # stopped at the equal sample budget, not before
            assert r["trace"][0]["calls"] == 0 and r["trace"][0]["step"] == 0
            times = [t["time"] for t in r["trace"]]
            assert times == sorted(times)
            assert isinstance(r["lower"]["solved"], bool) and math.isfinite(r["lower"]["gap"]), s
            assert r["lower"]["gap"] >= -1e-6  # g* from L-BFGS is a lower bound up to its tolerance
            assert 0.0 <= f["test_acc"] <= 1.0 and math.isfinite(f["upper_loss"])
    rows = RM.final_rows(res)
    assert len(rows) == len(RM.SOLVERS)
    med = [float(r[2].split()[0]) for r in rows]
    assert med == sorted(med)  # sorted by the median final upper loss
    # resumable: nothing is redone; a dead process's lock is reclaimed
    assert RM.run_all(tmp_path, cfg, ["StocBiO"], [0, 1], echo=None) == []
    (tmp_path / "MRBO_s1.lock").write_text("999999999")
    assert RM._claim(tmp_path / "MRBO_s1.lock")
    assert int((tmp_path / "MRBO_s1.lock").read_text()) == os.getpid()
    # the saved results are plain JSON (re-plotting reads only these files)
    assert json.loads((tmp_path / "VRBO_s0.json").read_text())["solver"] == "VRBO"


@pytest.mark.parametrize("label", ["MRBO", "BSA"])
def test_long_run_contains_the_shorter_budgets_ends(tmp_path, label):
    """The marks at budget/2^j are exactly the end of a run of that budget (same iterates: the stop
    rule only reads the calls), so one long run gives every shorter budget's final values."""
    cfg = {**RM.QUICK, "n_train": 200, "n_val": 50, "n_test": 50, "budget": 1.0e4, "halvings": 2}
    long = RM.run_one(label, 0, cfg)
    short = RM.run_one(label, 0, {**cfg, "budget": 2.5e3})
    end = short["final"]
    assert RM.value_at(long, 2.5e3, "calls") == end["calls"]
    assert RM.value_at(long, 2.5e3) == end["upper_loss"]
    assert RM.value_at(long, 2.5e3, "step") == end["step"]
    assert RM.value_at(long, 1e4) == long["final"]["upper_loss"] and math.isnan(RM.value_at(long, 1e9))
    cut = RM.truncate(long, 2.5e3)  # a long run read as a shorter one: same end, no lower verdict
    assert cut["final"] == {**cut["trace"][-1]} and cut["final"]["calls"] == end["calls"]
    assert cut["final"]["upper_loss"] == end["upper_loss"] and cut["lower"]["solved"] is None
    assert RM.truncate(short, 2.5e3) is short and RM.truncate(long, 1e4) is long
    row = RM.final_rows({label: [cut, short]})[0]
    assert row[7] == f"{int(bool(short['lower']['solved']))}/1"  # judged: the short run only
    rows = RM.budget_rows({label: [long]}, [2.5e3, 5e3, 1e4])
    f5, f10 = RM.value_at(long, 5e3), long["final"]["upper_loss"]
    assert rows[0][-1] == f"{100 * (f5 - f10) / f5:.1f} %"

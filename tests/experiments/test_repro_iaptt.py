"""IAPTT-GM reproduction (docs/reproduction.md sec. 3): settings, batched grid, start weight."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.experiments import repro_iaptt as RI


def test_paper_settings_reach_the_solvers():
    # App. C.1, Table 4: outer 500, inner 40, learning rate 5e-4, meta learning rate 0.1, LS/NS 40
    assert (
        RI.PAPER_TOY["outer"],
        RI.PAPER_TOY["inner"],
        RI.PAPER_TOY["inner_lr"],
        RI.PAPER_TOY["meta_lr"],
        RI.PAPER_TOY["ig_iters"],
    ) == (500, 40, 5e-4, 0.1, 40)
    # App. C.4, Table 7: outer 1000, inner 20, meta learning rate 0.005, SGD
    assert (RI.PAPER_LLC["outer"], RI.PAPER_LLC["inner"], RI.PAPER_LLC["meta_lr"]) == (1000, 20, 0.005)
    s = RI.toy_solver("IAPTTGM")
    assert (s.inner.lr, s.inner.steps, s.upper.lr, s.init_rule.lr) == (5e-4, 40, 0.1, 0.1)
    assert RI.toy_solver("NS").estimator.iters == 40
    assert set(RI.PAPER_STARTS) <= {(a, b) for a in RI.GRID["x0"] for b in RI.GRID["y0"]}


@pytest.mark.parametrize("method", [m for m in RI.METHODS if m not in RI.COUPLED and m != "BA"])
def test_batched_grid_equals_per_start_runs(method):
    starts = [(5.0, 1.0), (7.0, -1.0), (2.0, 0.5)]
    settings = {**RI.PAPER_TOY, "inner": 6, "inner_lr": 5e-3}
    both = RI._solve(method, starts, settings, 12, [0, 1, 2])
    for i, s in enumerate(starts):
        one = RI._solve(method, [s], settings, 12, [0])
        assert both["x"][i] == pytest.approx(one["x"][0], abs=1e-12, rel=0)
        assert both["y"][i] == pytest.approx(one["y"][0], abs=1e-12, rel=0)
        assert [r[i] for r in both["traj"]] == pytest.approx([r[0] for r in one["traj"]], abs=1e-12)


def test_grid_success_criterion_and_rows(tmp_path):
    res = RI.run_grid(
        ["IAGM", "IAPTTGM"],
        settings={**RI.PAPER_TOY, "inner": 4},
        grid={"x0": (1.0, 7.0), "y0": (-1.0, 2.0)},
        steps=3,
        cache=tmp_path,
    )
    assert res["paper_idx"] == [1, 2]  # (1, 2) and (7, −1)
    for r in res["methods"].values():
        for xv, yv, ok in zip(r["x"], r["y"], r["success"]):
            assert 1.0 <= xv <= 10.0 and -2.0 <= yv <= 2.0
            assert ok == (abs(xv - RI.X_STAR) / RI.X_STAR <= 0.02 and 1 - math.sin(xv * yv) <= 0.05)
    assert len(res["methods"]["IAPTTGM"]["k_star"]["1"]) == 3
    assert [row[0] for row in RI.grid_rows(res)] == ["IAGM", "IAPTTGM"]
    # the coupled method's starts are cached one file per start; a held start defers the result
    assert len(list(tmp_path.glob("IAPTTGM_*.json"))) == 4
    (tmp_path / "IAPTTGM_1_-1.json").unlink()
    (tmp_path / "IAPTTGM_1_-1.lock").write_text(str(__import__("os").getpid()))
    assert (
        RI.run_grid(
            ["IAPTTGM"],
            settings={**RI.PAPER_TOY, "inner": 4},
            grid={"x0": (1.0, 7.0), "y0": (-1.0, 2.0)},
            steps=3,
            cache=tmp_path,
        )
        is None
    )
    # the criterion itself: the solution succeeds, the local solution 7π/4 (with y = −2) does not
    toy = RI.grid_toy([(RI.X_STAR, -2.0), (7 * math.pi / 4, -2.0)])
    x, y = toy.x0, toy.y0
    assert float(toy.problem.g(x, y)) == pytest.approx(toy.g_star(x))
    rel = (x - RI.X_STAR).abs() / RI.X_STAR
    assert rel[0] == 0 and rel[1] > 0.3


def test_start_weight_closed_forms():
    # GD on g = ½ y1² − x y1: y_K = (1 − s)^K z + (1 − (1 − s)^K) x
    for s, K in ((0.5, 10), (0.1, 20), (0.01, 20)):
        assert RI.start_weight(bl.inner.GD(lr=s, steps=K)) == pytest.approx((1 - s) ** K, rel=1e-12)
    # FISTA: the same affine map, by its own recursion (Beck & Teboulle 2009)
    s, K = 0.1, 20
    z = w = torch.tensor(1.0, dtype=torch.float64)
    t = 1.0
    for _ in range(K):
        z_new = w - s * w
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        w = z_new + (t - 1) / t_new * (z_new - z)
        z, t = z_new, t_new
    assert RI.start_weight(bl.inner.Nesterov(lr=s, steps=K)) == pytest.approx(float(z), rel=1e-12)


def test_llc_fast_run():
    res = RI.run_llc(lrs=(0.5,), steps=5, variants=("IAGM", "IAGMA"), n=5)
    assert [r["method"] for r in res["runs"]] == ["IAGM", "IAGMA"]
    for r in res["runs"]:
        assert len(r["x_err"]) == 5 and r["x_err"][-1] < 1.0  # from x0 = 0: ‖x − e‖/‖e‖ = 1 at the start
    assert len(RI.llc_rows(res)) == 2


def test_table1_fast_configuration(tmp_path):
    """Table 1's measurement on a tiny setting: every (method, start) probed once and timed once per
    round; IA-GM differentiates all K steps like RHG (same graph), IAPTT-GM at most as many (k* ≤ K);
    the implicit NS holds no trajectory (a smaller graph than RHG's)."""
    settings = {**RI.PAPER_TOY, "inner": 6, "ig_iters": 3}
    res = RI.run_table1(["RHG", "NS", "IAGM", "IAPTTGM"], settings=settings, starts=RI.PAPER_STARTS[:2],
                        rounds=2, steps=11)
    ms = res["methods"]
    for m, r in ms.items():
        assert len(r["probe"]) == 2 and all(len(t) == 2 for t in r["times"]), m
        for p in r["probe"]:
            assert p["graph_bytes"] and p["alloc_bytes"] and p["x_rel"] >= 0
            assert min(p["alloc_bytes"]) >= 0
    graph = {m: max(b for p in r["probe"] for b in p["graph_bytes"]) for m, r in ms.items()}
    assert graph["IAGM"] == graph["RHG"] and graph["IAPTTGM"] <= graph["RHG"] and graph["NS"] < graph["RHG"]
    ks = [k for p in ms["IAPTTGM"]["probe"] for k in p["k_star"]]
    assert ks and all(1 <= k <= 6 for k in ks)
    assert all(k == 6 for p in ms["IAGM"]["probe"] for k in p["k_star"])
    rows = RI.table1_rows(res)
    assert [r[0] for r in rows] == list(ms) and rows[0][6] == "1.00"  # RHG ÷ RHG

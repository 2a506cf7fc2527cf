"""Stackelberg duopoly (issue 13.5): the closed form is checked from first principles, then every
deterministic solver of the toy experiments must reach it (BDA: the closed form of its own K-step
aggregated approximation, whose bias shrinks with K)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.experiments.toy import TOY_SOLVERS
from bilevel.inner import GD
from bilevel.problems import stackelberg_duopoly, stackelberg_equilibrium

TOY = stackelberg_duopoly()
S_L, UL_LR = 0.3, 0.4  # lower curvature 3, upper curvature 7/3: contractions 0.1 and 1/15 per step


def test_closed_form_satisfies_both_first_order_conditions_and_the_textbook_case():
    x = TOY.x_star.clone().requires_grad_(True)
    y_of_x = TOY.extra["y_star_fn"](x)
    assert float(TOY.y_star) == pytest.approx(float(y_of_x.detach()), abs=1e-14)
    # the follower's FOC at y*(x) for any x, and the leader's FOC of x -> f(x, y*(x)) at x*
    yv = y_of_x.detach().requires_grad_(True)
    (gy,) = torch.autograd.grad(TOY.problem.g(x.detach(), yv), yv)
    (hx,) = torch.autograd.grad(TOY.problem.f(x, y_of_x), x)
    assert abs(float(gy)) < 1e-12 and abs(float(hx)) < 1e-12
    # leader moves first and produces more than at the Cournot point, the follower less
    assert TOY.extra["x_star"] > TOY.extra["cournot_x"] > 0 and TOY.extra["y_star"] < TOY.extra["cournot_y"]
    # zero cost curvature, equal unit costs: x* = (a − c)/(2b), y* = (a − c)/(4b)
    eq = stackelberg_equilibrium(a=12.0, b=2.0, c_leader=2.0, c_follower=2.0, d_leader=0.0, d_follower=0.0)
    assert eq["x_star"] == pytest.approx(10 / 4) and eq["y_star"] == pytest.approx(10 / 8)
    with pytest.raises(ConfigError, match="corner"):
        stackelberg_duopoly(a=1.0, c_leader=2.0)
    with pytest.raises(ConfigError, match="slope"):
        stackelberg_duopoly(b=0.0)


def _make(name: str, inner: GD):
    """The solvers of the toy experiments by label (LS / NS / FP = AID with CG / Neumann / fixed point)."""
    S = bl.solvers
    if name in ("LS", "NS", "FP"):
        return S.AID(inner, UL_LR, linear_solver=name.lower(), iters=10)
    if name == "TRHG":
        return S.TRHG(inner, 10, UL_LR)
    if name == "BDA":
        return S.BDA(inner, UL_LR, mu=0.5)
    return getattr(S, name)(inner, UL_LR)


def _solve(name: str, K: int = 14, steps: int = 15):
    solver = _make(name, GD(lr=S_L, steps=K))
    x, y = TOY.start()
    return bl.solve(TOY.problem, x, y, solver=solver, steps=steps, x_projection=TOY.x_projection,
                    y_projection=TOY.y_projection, track=False)


@pytest.mark.parametrize("name", [s for s in TOY_SOLVERS if s != "BDA"])
def test_every_deterministic_solver_reaches_the_closed_form_equilibrium(name):
    res = _solve(name)
    # upper contraction (1/15)^15, lower 0.1^14 (T-RHG: truncation bias 0.1^10 of the Jacobian)
    tol = 1e-8 if name in ("TRHG", "IAGMA") else 1e-10  # FISTA (IAGMA) is not monotone
    assert abs(float(res.x) - TOY.extra["x_star"]) < tol
    assert abs(float(res.y) - TOY.extra["y_star"]) < tol


def bda_reference(K: int, mu: float, s_u: float) -> float:
    """argmin_x f(x, y_K(x)) of BDA's K aggregated steps from y0 = 0: y_K = P x + q is affine."""
    e = TOY.extra
    a, b, cL, cF, dL, dF = (e[k] for k in ("a", "b", "c_leader", "c_follower", "d_leader", "d_follower"))
    P, q = 0.0, 0.0
    for k in range(K):
        al = mu / (k + 1)
        # ∂f/∂y = b x,  ∂g/∂y = (2b + d_F) y + b x − (a − c_F)
        A = 1 - (1 - al) * S_L * (2 * b + dF)
        P = A * P - al * s_u * b - (1 - al) * S_L * b
        q = A * q + (1 - al) * S_L * (a - cF)
    return (a - b * q - cL) / (2 * (b + b * P) + dL)


def test_bda_reaches_its_k_step_approximation_and_its_bias_shrinks_with_k():
    errs = []
    for K in (10, 40):
        res = _solve("BDA", K=K, steps=20)
        assert abs(float(res.x) - bda_reference(K, 0.5, S_L)) < 1e-10
        errs.append(abs(float(res.x) - TOY.extra["x_star"]))
    assert errs[1] < errs[0] / 3 and errs[0] > 1e-3


def test_stackelberg_experiment_table(tmp_path):
    over = {"solvers": ["LS"], "steps": 12, "upper_lr": UL_LR}
    r = bl.experiments.run("stackelberg", overrides=over, out=tmp_path, progress=False, plots=False,
                           echo=None)
    assert r.completed
    assert r.summary.count("| yes ") == 1
    assert (tmp_path / "plots" / "stackelberg_equilibrium.png").is_file()

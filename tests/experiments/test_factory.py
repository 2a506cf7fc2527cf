"""Estimators, dynamics and solvers from strings."""

from __future__ import annotations

import pytest

import bilevel as bl
from bilevel.errors import ConfigError
from bilevel.experiments import factory as Fa


def test_estimator_aliases_and_class_names():
    inner = bl.inner.GD(lr=0.1, steps=5)
    for name, cls in [("cg", bl.hypergrad.CG), ("LS", bl.hypergrad.CG), ("ns", bl.hypergrad.Neumann),
                      ("Neumann", bl.hypergrad.Neumann), ("rhg", bl.hypergrad.Reverse),
                      ("fixed-point", bl.hypergrad.FixedPoint), ("AID-FP", bl.hypergrad.FixedPoint),
                      ("fo", bl.hypergrad.FirstOrder), ("exact", bl.hypergrad.Exact)]:
        assert type(Fa.make_estimator(name, inner)) is cls, name
    t = Fa.make_estimator("trhg", inner, truncate=2)
    assert isinstance(t, bl.hypergrad.Reverse) and t.truncate == 2
    with pytest.raises(ConfigError, match="truncate"):
        Fa.make_estimator("trhg", inner)


def test_estimator_kwargs_strict_and_filtered():
    inner = bl.inner.GD(lr=0.1, steps=5)
    cg = Fa.make_estimator("cg", inner, iters=7, warm_start=True)  # warm_start reaches Implicit via **kw
    assert cg.iters == 7 and cg.warm_start is True
    with pytest.raises(ConfigError, match="does not take truncate"):
        Fa.make_estimator("cg", inner, truncate=3)
    cg = Fa.build("estimator", "cg", {"inner": inner, "truncate": Fa.Arg(3, ("t",)),
                                      "iters": Fa.Arg(4, ("i",))})
    assert cg.obj.iters == 4 and not hasattr(cg.obj, "truncate") and cg.used == {"i"}  # an Arg may go unused
    with pytest.raises(ConfigError, match="available: .*CG"):
        Fa.make_estimator("magic", inner)
    with pytest.raises(ConfigError, match="truncate must be"):
        Fa.make_estimator("rhg", inner, truncate=10)  # constructor ValueError -> ConfigError


def test_dynamics():
    assert type(Fa.make_dynamics("sgd", 0.1)) is bl.inner.GD
    adam = Fa.make_dynamics("Adam", 0.01, 3)
    assert isinstance(adam, bl.inner.Adam) and adam.lr == 0.01 and adam.steps == 3
    m = Fa.make_dynamics("momentum", 0.1, momentum=0.5)
    assert m.momentum == 0.5
    with pytest.raises(ConfigError, match="does not take momentum"):
        Fa.make_dynamics("gd", 0.1, momentum=0.5)
    with pytest.raises(ConfigError, match="lr must be positive"):
        Fa.make_dynamics("gd", -1.0)


def test_solver_lookup_case_insensitive():
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.1, steps=5))
    s = Fa.make_solver("hypergradient_descent", estimator=est, upper=0.2)
    assert isinstance(s, bl.solvers.HypergradientDescent) and s.upper.lr == 0.2
    assert Fa.find_solver("HYPERGRADIENTDESCENT") is bl.solvers.HypergradientDescent
    assert Fa.find_solver("nope") is None
    with pytest.raises(ConfigError, match="needs estimator"):
        Fa.build("solver", "HypergradientDescent", {"unrelated": Fa.Arg(1)})
    with pytest.raises(ConfigError, match="does not take unrelated"):
        Fa.make_solver("HypergradientDescent", estimator=est, unrelated=1)


def test_class_scans_skip_bases_and_templates():
    est = Fa.estimator_classes()
    assert {"CG", "Neumann", "Reverse", "FixedPoint", "Forward", "Exact"} <= set(est)
    assert "Estimator" not in est and "Implicit" not in est
    assert all(getattr(c, "reference", "") for c in est.values())
    sol = Fa.solver_classes()
    assert "HypergradientDescent" in sol and "Solver" not in sol

"""Shared fixtures: reference problems (float64 exact references) and the devices to test on."""

from __future__ import annotations

import pytest
import torch

from tests.reference_problems import REFERENCE_PROBLEMS, RefProblem

#: every estimator test that takes ``device`` runs on CPU, and on CUDA when one is present
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=sorted(REFERENCE_PROBLEMS))
def ref(request) -> RefProblem:
    """Each of the three exact-reference problems (ridge, logreg, mixed) in float64."""
    return REFERENCE_PROBLEMS[request.param]()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def aot_eager():
    """Compiled-mode tests: torch.compile's ``aot_eager`` backend (capture, no code generation)."""
    from bilevel import compiled as C

    old = dict(C.settings)
    C.settings["backend"] = "aot_eager"
    yield
    C.settings.update(old)


@pytest.fixture(scope="module")
def tiny():
    """A tiny stochastic quadratic (float64) for the compiled-mode tests."""
    from bilevel.problems import stochastic_quadratic

    return stochastic_quadratic(dim_x=2, dim_y=3, n_lower=24, n_upper=20, batch_size=4, seed=1)


def pytest_addoption(parser):
    parser.addoption(
        "--solve-compile", default=None, choices=("step", "oracles"),
        help="run every bl.solve(...) that does not pass compile= in that compiled mode (aot_eager "
             "backend): the whole suite as a check of the compiled paths (slow; not run by CI)")
    parser.addoption(
        "--estimator-compile", action="store_true", default=False,
        help="run every hypergradient estimator call as bl.compile(est) would (compiled oracles, "
             "aot_eager backend), the estimator tests as a check of that path (slow; not run by CI)")


@pytest.fixture(autouse=True, scope="session")
def _solve_compile(request):
    mode = request.config.getoption("--solve-compile")
    if mode is None:
        yield
        return
    from bilevel import compiled as C
    from bilevel.solvers import base

    old_default, old_backend = base.solve.__kwdefaults__["compile"], C.settings["backend"]
    base.solve.__kwdefaults__["compile"] = mode
    C.settings["backend"] = "aot_eager"
    yield
    base.solve.__kwdefaults__["compile"] = old_default
    C.settings["backend"] = old_backend


@pytest.fixture(autouse=True, scope="session")
def _estimator_compile(request):
    """``--estimator-compile``: ``Estimator.apply`` (what ``est(...)``, ``bl.compile(est)`` and
    every solver call) runs inside ``bl.compile``'s context, so each estimator test checks the
    compiled oracles against its exact reference."""
    if not request.config.getoption("--estimator-compile"):
        yield
        return
    from bilevel import compiled as C
    from bilevel import oracles as O
    from bilevel.hypergrad.base import Estimator

    plain, old_backend = Estimator.apply, C.settings["backend"]

    def apply(self, *args, **kwargs):
        if O.get_backend() == "func":  # inside hypergrad.vmap: as bl.compile(est) would be (no
            return plain(self, *args, **kwargs)  # kernels under vmap), the functional oracles
        with O.backend("compiled"), C._estimators_on():
            return plain(self, *args, **kwargs)

    Estimator.apply = apply
    C.settings["backend"] = "aot_eager"
    yield
    Estimator.apply = plain
    C.settings["backend"] = old_backend

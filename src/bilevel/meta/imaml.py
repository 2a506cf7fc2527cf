"""iMAML: implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019, Eq. 3–7, Alg. 2).

Each task solves the proximally regularized lower problem

    y_i(x) = argmin_y  g_i(x, y) = L(y; support_i) + (λ/2) ‖y − x‖²,

and the meta-gradient is exact at y_i (Eq. 6, implicit function theorem):

    d y_i / dx = (I + ∇²L(y_i)/λ)^{-1},      ∇h_i = (I + ∇²L(y_i)/λ)^{-1} ∇L(y_i; query_i),

independent of the path the inner solver took. In the library's terms: ∇²_yy g = ∇²L + λI and
∇²_xy g = −λI, so the AID formula ∇_x f − ∇²_xy g · (∇²_yy g)^{-1} ∇_y f is exactly Eq. 6;
``bl.hypergrad.CG`` solves it with conjugate gradient (Alg. 2 uses CG too) after ``inner`` GD
steps on g_i started at x.
"""

from __future__ import annotations

from typing import Any

from .. import _tree as T
from ..hypergrad import CG
from ..inner import GD, Dynamics
from .base import MetaLearner, adapt, task_loss

__all__ = ["IMAML"]


def _sq_dist(a: Any, b: Any):
    return T.sq_norm(T.sub(T.flatten(a)[0], T.flatten(b)[0]))


class IMAML(MetaLearner):
    """``lam`` λ (proximal strength), ``inner`` (default GD, lr 0.05, 20 steps) for the lower
    problem, ``cg_iters`` conjugate-gradient iterations for Eq. 6."""

    reference = "Rajeswaran, Finn, Kakade & Levine 2019, Eq. 3-7, Alg. 2"
    differentiate_start = False

    def __init__(self, model, *, lam: float = 1.0, inner: Dynamics | None = None, cg_iters: int = 10,
                 cg_tol: float = 1e-10, loss: str = "ce", ways: int | None = None):
        super().__init__(model, loss=loss, ways=ways)
        if not lam > 0:
            raise ValueError(f"iMAML needs lam > 0, got {lam}")
        self.lam = float(lam)
        self.inner = inner if inner is not None else GD(lr=0.05, steps=20)
        self.cg_iters, self.cg_tol = int(cg_iters), float(cg_tol)

    def lower(self, task):
        def g(x, y):
            fit = task_loss(self.loss, self.model(y, task["support_x"]), task["support_y"])
            return fit + 0.5 * self.lam * _sq_dist(y, x)

        return g

    def upper(self, task):
        return lambda x, y: task_loss(self.loss, self.model(y, task["query_x"]), task["query_y"])

    def start(self, x: Any) -> Any:
        return x

    def estimator(self):
        return CG(self.inner, iters=self.cg_iters, tol=self.cg_tol)

    def query_outputs(self, x, task):
        """Adaptation (vmappable): the inner steps on the proximal problem, started at x."""
        y = adapt(self.inner, self.lower(task), T.unflatten(T.detach(T.flatten(x)[0]),
                                                            T.flatten(x)[1]), x)
        return self.model(y, task["query_x"])

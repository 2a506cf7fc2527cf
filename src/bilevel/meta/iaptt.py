"""IAPTT-GM for few-shot classification (Liu, Liu, Yuan, Zeng & Zhang 2021, NeurIPS, Sec. 4.2.1,
Eq. 11 and Alg. 1; the solver is :class:`bilevel.solvers.IAPTTGM`).

The model splits into a hyper-representation φ shared by all tasks (the body) and a per-task
classifier y_i (the head). The head starts from the *initialization auxiliary* z, an upper
variable like φ (Sec. 2.1, Eq. 4), and takes K GD steps on the support loss:

    y_{i,0} = z,   y_{i,k+1} = y_{i,k} − s ∇_y L(φ, y_{i,k}; support_i),

and the *pessimistic trajectory truncation* (Sec. 2.2) picks, per task, the step worst for the
leader, k*_i = argmax_{1≤k≤K} L(φ, y_{i,k}; query_i) (first maximiser), and descends

    (1/B) Σ_i L(φ, y_{i,k*_i}(φ, z); query_i)     in x = {"body": φ, "head": z}.

With k* fixed (computed without a graph) this is ANIL's bilevel problem (:class:`ANIL`, whose
head init is exactly the auxiliary z) truncated at k*_i steps, so the loop path reuses the
solver's pieces: :meth:`bilevel.solvers.IAPTTGM.truncation` for k*_i and
``bl.hypergrad.Reverse`` through k*_i steps (its derivative through the start reaches z). The
vmapped path runs all K steps for every task and weights the query losses with the one-hot
vector of k*_i — the same gradient (the other steps get weight 0), as a pure function of (x, task).
At meta-test time the head takes the full K steps (``with_steps`` changes K), as ANIL's.
Not included: the paper's non-convex regularizer of the lower objective (Eq. 11, a smoothed
ℓ_p term); the lower problem here is the plain support loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _tree as T
from .. import oracles as O
from ..formulation import Bound
from ..hypergrad import Reverse
from ..inner import GD, unroll
from ..solvers.ia import IAPTTGM
from .anil import ANIL
from .base import batched_mean_grad, split_tasks, task_loss
from .models import features, linear
from .tasks import index_tasks, num_tasks

__all__ = ["IAPTTFewShot"]


class IAPTTFewShot(ANIL):
    """``lr`` s and ``steps`` K of the head's GD (as :class:`ANIL`)."""

    reference = "Liu, Liu, Yuan, Zeng & Zhang 2021 (NeurIPS), Sec. 4.2.1, Eq. 11, Alg. 1 (IAPTT-GM)"

    def trajectory_losses(self, x: Any, task: Mapping[str, Tensor]) -> Tensor:
        """(L(φ, y_k; query))_{k=1..K} along the head's K steps (pure, vmappable)."""
        y0 = self.start(x)
        ys0, spec = T.flatten(y0)
        low = self.lower(task)
        gfun = O.grad_y_fn(lambda xs_unused, ys: low(x, T.unflatten(ys, spec)))
        d = self.inner.bind(x, y0)
        state = d.init(ys0)
        phi_q = features(x["body"], task["query_x"])
        vals = []
        for k in range(d.steps):
            state, _ = unroll(d, lambda ys, j: gfun((), ys), state, 1, start=k, track=False)
            out = linear(T.unflatten(d.output(state), spec), phi_q)
            vals.append(task_loss(self.loss, out, task["query_y"]))
        return torch.stack(vals)

    def pessimistic_loss(self, x: Any, task: Mapping[str, Tensor]) -> Tensor:
        """L(φ, y_{k*}; query) with k* = the first argmax of the trajectory's query losses."""
        vals = self.trajectory_losses(x, task)
        w = torch.zeros_like(vals).scatter(0, vals.detach().argmax().reshape(1), 1.0)
        return (w * vals).sum()

    def task_sum_grad(self, x: Any, tasks: Mapping[str, Tensor], *, vmap: bool = True):
        B = num_tasks(tasks)
        if vmap:
            g, per_task = batched_mean_grad(self.pessimistic_loss, x, tasks)
            return T.unflatten(T.scale(T.flatten(g)[0], float(B)), T.flatten(x)[1]), per_task, {}
        support, query = split_tasks(tasks)
        problem = self.batched_problem()
        truncation = IAPTTGM(self.inner)  # the solver's pessimistic truncation pass
        total, losses, k_stars = None, [], []
        for i in range(B):
            s_i, q_i = index_tasks(support, i), index_tasks(query, i)
            bound = Bound(problem, x, self.start, upper_batch=q_i, lower_batch=s_i)
            k_star, _ = truncation.truncation(bound, self.inner)
            res = Reverse(GD(lr=self.inner.lr, steps=k_star))(problem, x, self.start,
                                                              upper_batch=q_i, lower_batch=s_i)
            gl = T.flatten(res.grad)[0]
            total = gl if total is None else T.add(total, gl)
            with torch.no_grad():
                losses.append(self.upper(q_i)(x, res.y))
            k_stars.append(k_star)
        diag = {"k_star_mean": sum(k_stars) / B}
        return T.unflatten(total, T.flatten(x)[1]), torch.stack(losses).detach(), diag

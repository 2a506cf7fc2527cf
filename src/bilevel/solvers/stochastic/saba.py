"""SABA — Stochastic Average Bilevel Algorithm (Dagréou, Ablin, Vaiter & Moreau 2022, NeurIPS,
Algorithm 2): SOBA with every oracle replaced by its SAGA estimate (Defazio et al. 2014).

Finite sums over a fixed partition into lower batches i = 1..n and upper batches j = 1..m. One
memory per oracle and batch; for an oracle φ_i drawn at batch i,

    S[φ]_i = φ_i(current point) − m_i + (1/n) Σ_k m_k,    then m_i ← φ_i(current point)

and, with v ≈ H⁻¹ ∇_y f (the paper's v is −v),

    D_y = S[∇_y G]_i,   D_v = S[∇²_yy G v]_i − S[∇_y F]_j,   D_x = S[∇_x F]_j − S[∇²_xy G v]_i
    y ← P_Y(y − ρ D_y),   v ← v − ρ D_v,   x ← P_X(x − γ D_x)      (constant steps)

Needs ``lower_data``/``upper_data`` = :class:`bilevel.sampling.FixedBatches` (the batch index is read
from ``last_index``; a 0-dim tensor in whole-step compiled mode, where the memories are stacked
tensors whose rows are written in place after each step: one graph for every batch,
:class:`~bilevel.estimates.SagaTable`). Memories start at zero
(``init_memory="zero"``, as in benchopt) or are filled by one pass over all batches at the first
iteration (``"full"``, counted and timed).
Per iteration the oracle cost equals SOBA's.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...estimates import SagaTable, Schedule, require_fixed_batches, soba_oracles
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["SABA"]


class SABA(Solver):
    """SABA: SOBA with every oracle replaced by its SAGA estimate over a fixed partition into
    batches; needs :class:`bilevel.sampling.FixedBatches` for both levels (see the module docstring).

    Args:
        lr_x: γ, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict;
            constant in the paper).
        lr_y: ρ, the lower step.
        lr_v: step of v (default ``lr_y``).
        init_memory: ``"zero"`` (memories start at 0) or ``"full"`` (one pass to fill them).

    Reference: Dagréou, Ablin, Vaiter & Moreau 2022 (NeurIPS), Algorithm 2.
    """

    reference = "Dagréou, Ablin, Vaiter & Moreau 2022 (NeurIPS), Algorithm 2 (SABA)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        lr_v: float | Schedule | dict | None = None,
        init_memory: str = "zero",
        upper: Any = None,
    ):
        if init_memory not in ("zero", "full"):
            raise ValueError(f"init_memory must be 'zero' or 'full', got {init_memory!r}")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)
        self.init_memory = init_memory

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        lo = require_fixed_batches(ctx.lower_data, "SABA", "lower")
        up = require_fixed_batches(ctx.upper_data, "SABA", "upper")
        n, m = lo.n_batches, up.n_batches
        return {
            "x": xs, "y": ys, "v": T.zeros_like(ys),
            "memory": {"gy": SagaTable(n, ys), "hv": SagaTable(n, ys), "jv": SagaTable(n, xs),
                       "gxF": SagaTable(m, xs), "gyF": SagaTable(m, ys)},
            "filled": self.init_memory == "zero",
        }

    def _fill(self, ctx: Context, state: dict[str, Any]) -> None:
        """One pass over every batch at the starting point: m_i = φ_i(x0, y0, v0)."""
        lo, up, mem = ctx.lower_data, ctx.upper_data, state["memory"]
        xs, ys, v = state["x"], state["y"], state["v"]
        for i in range(lo.n_batches):
            lin = O.Linearization(ctx.G(lo.batch(i)), xs, ys)
            hv, jv = lin.both(v)
            for key, val in (("gy", lin.grad_y), ("hv", hv), ("jv", jv)):
                mem[key].update(i, val)
        for j in range(up.n_batches):
            _, gx, gyF = O.grads(ctx.F(up.batch(j)), xs, ys)
            mem["gxF"].update(j, gx)
            mem["gyF"].update(j, gyF)
        state["filled"] = True

    def graph_state(self, state: dict[str, Any]) -> None:
        """Compiled steps index the memories with the batch index as a tensor (one graph for
        every batch): the tables in their stacked form (:meth:`SagaTable.stack`)."""
        for table in state["memory"].values():
            table.stack()

    def commit(self, state: dict[str, Any], ok: bool) -> None:
        """Write the rows the compiled step left pending into the stacked memories."""
        for table in state["memory"].values():
            table.commit(ok)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        if not state["filled"]:
            self._fill(ctx, state)
        xs, ys, v, mem = state["x"], state["y"], state["v"], state["memory"]
        G, F = ctx.fresh_G(), ctx.fresh_F()
        i, j = ctx.lower_data.last_index, ctx.upper_data.last_index
        gy, hv, jv, gxF, gyF = soba_oracles(G, F, xs, ys, v)
        d_y = mem["gy"].update(i, gy)
        d_v = T.sub(mem["hv"].update(i, hv), mem["gyF"].update(j, gyF))
        d_x = T.sub(mem["gxF"].update(j, gxF), mem["jv"].update(i, jv))
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), d_y, ys))
        state["v"] = T.axpy(-self.lr_v(t), d_v, v)
        state["x"] = self.step_x(ctx, state, d_x, t)
        return {}

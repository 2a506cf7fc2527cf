"""The toy runner's memory probe (:class:`bilevel.experiments.toy.MemoryProbe`): graph bytes on
plain eager steps; under compiled oracles the steps run unprobed (the hooks see no tensors of a
compiled graph), with the same results, instead of failing."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.experiments.toy import MemoryProbe


def _run(tiny, compile):
    solver = MemoryProbe(bl.solvers.SOBA(), every=2)
    return bl.solve(**tiny.solve_kwargs(batch_size=4, seed=0), solver=solver, steps=4, track=False,
                    compile=compile)


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
def test_probe_measures_eager_steps_and_skips_compiled_ones(tiny):
    eager = _run(tiny, False)
    assert [("graph_bytes" in r) for r in eager.history] == [True, False, True, False]
    assert all(r["graph_bytes"] > 0 for r in eager.history[::2])
    for mode in ("oracles", "step"):
        comp = _run(tiny, mode)
        torch.testing.assert_close(comp.x, eager.x, rtol=1e-12, atol=1e-14)
        # compiled steps carry no graph_bytes (a whole-step run probes its first, eager, step)
        assert not any("graph_bytes" in r for r in comp.history if r.get("compiled", mode == "oracles"))


def test_probe_skips_a_compiled_estimator(tiny):
    """bl.compile(est) differentiates with torch.func, which refuses the hooks (it crashed)."""
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.2, steps=3), iters=3)
    runs = []
    for e in (est, bl.compile(est)):
        solver = MemoryProbe(bl.solvers.HypergradientDescent(e, upper=0.3), every=1)
        runs.append(bl.solve(**tiny.solve_kwargs(batch_size=4, seed=0), solver=solver, steps=3,
                             track=False))
    assert all("graph_bytes" in r for r in runs[0].history)
    assert not any("graph_bytes" in r for r in runs[1].history)
    torch.testing.assert_close(runs[1].x, runs[0].x, rtol=1e-10, atol=1e-12)

"""The upper step of every solver accepts a bl.inner rule, a step size / Schedule, or a torch.optim
optimizer (class, factory, (class, kwargs), TorchOptimizer with an lr scheduler) — issue 10, item 3.

References: torch.optim.SGD / Adam equal bl.inner.GD / Adam (written independently from the papers)
to 1e-12 in float64 on the same run, in a deterministic and in a stochastic solver; an lr schedule
of torch (LambdaLR) equals the bl Schedule with the same formula; resume with a torch optimizer and
scheduler is bit-identical; bad specifications raise a ConfigError naming the argument.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch

import bilevel as bl
from bilevel.errors import ConfigError
from bilevel.estimates import Schedule
from bilevel.hypergrad import CG
from bilevel.solvers import TorchOptimizer
from tests.reference_problems import mixed

F64 = torch.float64
S = bl.solvers


def _hgd(upper):
    ref = mixed()
    return S.HypergradientDescent(CG(bl.inner.GD(lr=ref.lr, steps=5), iters=5), upper=upper)


def _run(solver, steps=6, **kw):
    ref = mixed()
    return bl.solve(ref.problem, ref.x, ref.y0, solver=solver, steps=steps, track=False,
                    x_projection=lambda t: t.clamp(-3, 3), **kw)


def _close(a, b, tol=1e-12):
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("spec", [
    functools.partial(torch.optim.SGD, lr=0.05),
    (torch.optim.SGD, {"lr": 0.05}),
    TorchOptimizer(torch.optim.SGD, lr=0.05),
], ids=["partial", "pair", "TorchOptimizer"])
def test_torch_sgd_equals_bl_gd(spec):
    ref = _run(_hgd(bl.inner.GD(lr=0.05)))
    res = _run(_hgd(spec))
    _close(res.x, ref.x)
    assert float((ref.x - mixed().x).norm()) > 1e-3


def test_torch_adam_equals_bl_adam_in_both_solver_families():
    ours = bl.inner.Adam(lr=0.05, eps=1e-8, eps_root=0.0)
    theirs = (torch.optim.Adam, {"lr": 0.05, "eps": 1e-8})
    _close(_run(_hgd(theirs)).x, _run(_hgd(ours)).x)
    # stochastic family: SOBA with a fixed-batch sampler on the same problem
    ref = mixed()
    a = bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(upper=ours), steps=6, track=False)
    b = bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(upper=theirs), steps=6, track=False)
    _close(b.x, a.x)
    c = bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(), steps=6, track=False)
    assert float((c.x - a.x).abs().max()) > 1e-6  # the rule was used


def test_one_step_size_vocabulary():
    """A Schedule works as upper= in both families; for a stochastic solver upper=Schedule is its
    lr_x; torch's LambdaLR with the same formula gives the same run."""
    ref = mixed()
    sched = Schedule(0.05, e=0.5, t0=1.0)
    a = bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(lr_x=sched), steps=5, track=False)
    b = bl.solve(ref.problem, ref.x, ref.y0, solver=S.SOBA(upper=sched), steps=5, track=False)
    assert torch.equal(a.x, b.x)
    lam = TorchOptimizer(torch.optim.SGD, lr=0.05, scheduler=(
        torch.optim.lr_scheduler.LambdaLR, {"lr_lambda": lambda t: (t + 1.0) ** -0.5}))
    _close(_run(_hgd(lam)).x, _run(_hgd(sched)).x)
    _close(_run(_hgd({"c": 0.05, "e": 0.5})).x, _run(_hgd(sched)).x, tol=0)


def test_resume_with_a_torch_optimizer_and_scheduler_is_exact():
    spec = TorchOptimizer(torch.optim.Adam, lr=0.05,
                          scheduler=(torch.optim.lr_scheduler.StepLR, {"step_size": 2, "gamma": 0.5}))
    full = _run(_hgd(spec), steps=6)
    part = _run(_hgd(spec), steps=3)
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    rest = _run(_hgd(spec), steps=6, state=saved)
    assert torch.equal(rest.x, full.x)
    meta = full.state["upper"][-1]
    assert meta["scheduler"]["last_epoch"] == 6
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    # the partial state was not written into by the resumed run (optimizer moments are cloned)
    again = _run(_hgd(spec), steps=6, state=saved)
    assert torch.equal(again.x, full.x)


def test_bad_upper_rules_are_rejected_naming_the_argument():
    with pytest.raises(ConfigError, match=r"upper=: Linear is neither a bl.inner update rule nor"):
        _hgd(torch.nn.Linear)
    with pytest.raises(ConfigError, match=r"pass an instance, e.g. bl.inner.Adam"):
        _hgd(bl.inner.Adam)
    with pytest.raises(ConfigError, match="upper= must be a step size"):
        _hgd("adam")
    with pytest.raises(ConfigError, match="returned list, not a torch.optim.Optimizer"):
        _hgd(lambda params: list(params))
    with pytest.raises(ConfigError, match="step size must be positive"):
        S.SOBA(upper=-1.0)
    with pytest.raises(ConfigError, match="SOBA: pass either lr_x= .* or upper="):
        S.SOBA(lr_x=0.5, upper=bl.inner.Adam(lr=0.1))
    with pytest.raises(ConfigError, match="MRBOZO: pass either lr_x="):
        S.MRBOZO(lr_x=0.5, upper=torch.optim.Adam)
    with pytest.raises(ConfigError, match="init_rule=: Linear"):
        S.IAGM(bl.inner.GD(lr=0.1, steps=2), init_rule=torch.nn.Linear)
    with pytest.raises(ConfigError, match="estimator must be a bilevel.hypergrad estimator"):
        S.HypergradientDescent(torch.optim.Adam)
    S.HypergradientDescent(CG(None), upper=torch.optim.Adam)  # a bare optimizer class is fine

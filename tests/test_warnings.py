"""Strict warning filters (``-W error``): torch's own warnings do not break bilevel's calls
(:mod:`bilevel._warnings`), and every other warning still obeys the user's filters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from bilevel import _warnings as W

#: run in a fresh process: torch emits its jvp-decomposition warning once per process
SCRIPT = textwrap.dedent("""
    import torch, bilevel as bl
    from bilevel import compiled as C
    C.settings["backend"] = "aot_eager"
    F64 = torch.float64
    problem = bl.Problem(lambda x, y: ((y - 1) ** 2).sum() + (x * y).sum(),
                         lambda x, y: 0.5 * ((y - 2.0 * x) ** 2).sum())
    inner = bl.inner.GD(lr=0.5, steps=12)
    x, y0 = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    H = bl.hypergrad
    unrolled, implicit = H.Reverse(inner)(problem, x, y0).grad, H.Exact(inner)(problem, x, y0).grad
    for est, ref in ((H.Forward(inner), unrolled), (bl.compile(H.Reverse(inner)), unrolled),
                     (bl.compile(H.Forward(inner)), unrolled),
                     (bl.compile(H.CG(inner, iters=2)), implicit)):  # (2 CG steps: exact in 2-D)
        g = est(problem, x, y0).grad
        assert torch.allclose(g, ref, rtol=1e-10), (est, g, ref)
    # a start that depends on x (MAML-style): the unrolled state is a non-leaf from step 0
    a = bl.compile(H.Reverse(inner))(problem, x, lambda x: 0.5 * x).grad
    b = H.Reverse(inner)(problem, x, lambda x: 0.5 * x).grad
    assert torch.allclose(a, b, rtol=1e-12), (a, b)
    print("ok")
""")


@pytest.mark.compiled
def test_estimators_run_under_warnings_as_errors():
    """Without :mod:`bilevel._warnings`, eager ``Forward`` and ``Exact`` fail on torch's
    DeprecationWarning from its first jvp, and compiled ``Reverse`` on dynamo's non-leaf ``.grad``
    warning (then on the fallback warning, itself an error)."""
    out = subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def _raise_wrapped(warning: Warning) -> None:
    try:
        raise warning
    except Warning:
        raise RuntimeError("tracing failed")  # noqa: B904 - the warning is the context, as in dynamo


def test_only_torch_noise_is_retried():
    noise = UserWarning("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. ...")
    other = UserWarning("your objective is odd")
    calls = []

    def flaky(warning):
        calls.append(warning)
        if len(calls) == 1:
            _raise_wrapped(warning)
        return "done"

    with pytest.raises(RuntimeError) as err:
        _raise_wrapped(noise)
    assert W.is_noise(err.value)
    assert W.retry_quietly(flaky, noise) == "done" and len(calls) == 2
    calls.clear()
    with pytest.raises(RuntimeError):  # any other failure is not retried
        W.retry_quietly(flaky, other)
    assert len(calls) == 1
    assert not W.is_noise(ValueError("x"))


def test_quiet_ignores_only_the_noise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with W.quiet():
            warnings.warn("`torch.jit.script` is deprecated. Please switch", DeprecationWarning, stacklevel=1)
            with pytest.raises(UserWarning):
                warnings.warn("your objective is odd", UserWarning, stacklevel=1)

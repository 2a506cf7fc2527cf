"""Timing and memory helpers shared by the benchmarks.

* :func:`median_time` — median wall time of ``reps`` calls after ``warmup`` calls.
* :func:`peak_rss` — peak resident memory of a computation *above a post-setup baseline*: the
  kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the
  call (Linux); elsewhere it falls back to the ``ru_maxrss`` delta. Measure it on the first call in a
  fresh process (:func:`run_isolated`), before warm-up: memory freed by earlier calls stays resident
  in the allocator and would hide the peak.
* :func:`saved_bytes` — peak bytes of the tensors autograd holds for backward during a call
  (re-exported from :mod:`bilevel._memory`, the one saved-tensor probe of the package).
* :func:`run_isolated` — run ``module:function(payload)`` in a fresh Python process with one
  thread and return its JSON-able result.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .._memory import saved_bytes

__all__ = ["one_thread", "median", "median_time", "peak_rss", "saved_bytes", "run_isolated", "MB"]

MB = float(1 << 20)
_CLEAR_REFS = "/proc/self/clear_refs"


def one_thread() -> None:
    """Pin torch (intra- and inter-op) to a single thread."""
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set / parallel work started
        torch.set_num_interop_threads(1)


def median_time(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all timings) of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    gc.collect()
    gc.disable()  # as timeit does
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return median(times), times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss(fn: Callable[[], Any], collect: bool = True) -> tuple[Any, float, str]:
    """Run ``fn`` once; return (its result, peak RSS above the pre-call level in bytes, method).

    ``collect``: run the garbage collector first (takes ~0.2 s with torch imported)."""
    if collect:
        gc.collect()
    if _reset_hwm() and (base := _status_kb("VmRSS")) is not None:
        out = fn()
        peak = _status_kb("VmHWM") or base
        return out, max(0, peak - base) * 1024.0, "VmHWM"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return out, max(0, peak - base) * scale, "ru_maxrss"


def run_isolated(target: str, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Call ``target`` (``"pkg.module:function"``) on ``payload`` in a fresh single-threaded process.

    The function receives the payload dict and returns a JSON-able dict. Stdout of the child is
    left to the function's result only (printed as the last line).
    """
    mod, func = target.split(":")
    code = (
        "import json, sys\n"
        f"from {mod} import {func} as _f\n"
        "res = _f(json.loads(sys.stdin.read()))\n"
        "sys.stdout.write('\\n@@RESULT@@' + json.dumps(res) + '\\n')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    marker = "@@RESULT@@"
    if proc.returncode != 0 or marker not in proc.stdout:
        raise RuntimeError(
            f"benchmark child {target} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.rsplit(marker, 1)[1].strip())

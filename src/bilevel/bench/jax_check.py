"""Same batches, same iterates: our stochastic solvers against their plain-JAX references.

    python -m bilevel.bench.jax_check --jax-python /path/to/jaxvenv/bin/python [--only saba,fsla]

For each stochastic row of :mod:`bilevel.bench.jax_compare` (SOBA, stocBiO, MRBO, BSA, SABA, VRBO,
TTSA, AmIGO, FSLA, SUSTAIN, with the same settings), :func:`record` runs our eager solver on
hyper-cleaning for a few outer iterations with samplers that log the rows of every batch they hand out
(an index column appended to the data and stripped again). :data:`LAYOUTS` turns one iteration's
draws into the index arrays of the JAX core (:func:`bilevel.bench.jax_ref.stochastic_cores`) — this
fails if the solver draws another number of batches than the reference consumes, so the JAX-free
half is a check of the oracle/batch structure too. The JAX core then runs on exactly those batches
from the same initial state (in the ``--jax-python`` interpreter, ``jax_ref.py --check``) and the
final iterates are compared: the relative error of x − x₀ and of y should be float32 rounding. VRBO
runs 12 iterations so that the large-batch restart (period 10) happens twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import bilevel as bl
from bilevel.sampling import FixedBatches, Minibatches

from .jax_compare import JAX_REF, ST, stochastic_data, stochastic_solvers

__all__ = ["SOLVERS", "STEPS", "LAYOUTS", "record", "indices", "compare", "main"]


SOLVERS = stochastic_solvers()  # the benchmark's rows (jax_compare)
#: outer iterations compared per solver (VRBO: past its second large-batch restart; SABA: long
#: enough for batches to be drawn again, so that stored memories are read back)
STEPS = {"soba": 3, "stocbio": 3, "mrbo": 4, "bsa": 4, "saba": 12, "vrbo": 12, "ttsa": 4, "amigo": 3,
         "fsla": 3, "sustain": 4}


def _recording(base: type) -> type:
    """``base`` (a sampler class) over the data plus a row-index column that is logged and
    stripped from every batch it hands out."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *tensors: torch.Tensor, log: list, **kw: Any):
            super().__init__(*tensors, torch.arange(tensors[0].shape[0]), **kw)
            self.log = log

        def next(self):
            b = super().next()
            self.log.append((b[-1].numpy().copy(), getattr(self, "last_index", -1)))
            return b[:-1]

        def full(self):
            return super().full()[:-1]

        def batch(self, i: int):
            return super().batch(i)[:-1]

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


RecordingMinibatches = _recording(Minibatches)
RecordingFixedBatches = _recording(FixedBatches)


def record(name: str, steps: int | None = None, p: Any = None) -> dict[str, Any]:
    """Run our solver ``name`` eagerly for ``steps`` iterations on hyper-cleaning (the
    jax_compare data) and return its draws per iteration (lists of (rows, batch index) for the
    lower and upper samplers), the SABA partitions and the final iterates."""
    p = stochastic_data()[0] if p is None else p
    steps = STEPS[name] if steps is None else steps
    cls = RecordingFixedBatches if name == "saba" else RecordingMinibatches
    lo_log: list = []
    up_log: list = []
    lo = cls(*p.lower_tensors, log=lo_log, batch_size=ST["batch"], seed=1)
    up = cls(*p.upper_tensors, log=up_log, batch_size=ST["batch"], seed=2)
    marks = [(0, 0)]
    res = bl.solve(p.problem, p.x0, p.y0, solver=SOLVERS[name](), steps=steps, lower_data=lo,
                   upper_data=up, track=False,
                   callback=lambda t, x, y, rec: marks.append((len(lo_log), len(up_log))) and None)
    iters = [(lo_log[a0:a1], up_log[b0:b1]) for (a0, b0), (a1, b1) in zip(marks, marks[1:])]
    out = {"iters": iters, "x0": p.x0.numpy(), "y0": p.y0.numpy(), "x": res.x.numpy(),
           "y": res.y.numpy()}
    if name == "saba":
        out["lpart"] = np.stack([lo._batches[k][-1].numpy() for k in range(lo.n_batches)])
        out["upart"] = np.stack([up._batches[k][-1].numpy() for k in range(up.n_batches)])
    return out


def _expect(name: str, got: int, want: int, what: str) -> None:
    if got != want:
        raise AssertionError(f"{name}: {got} {what} batches drawn in one iteration, the JAX reference "
                             f"consumes {want}")


def _padded(rows: list[np.ndarray], Q: int) -> np.ndarray:
    """p ≤ Q−1 HVP batches as a (Q, b) array (unused rows: zeros; the core reads the first p)."""
    out = np.zeros((Q, ST["batch"]), np.int64)
    if rows:
        out[: len(rows)] = np.stack(rows)
    return out


def _saba(lo: list, up: list) -> dict[str, np.ndarray]:
    _expect("saba", len(lo), 1, "lower")
    _expect("saba", len(up), 1, "upper")
    return {"i": np.asarray(lo[0][1]), "j": np.asarray(up[0][1])}


def _vrbo(lo: list, up: list) -> dict[str, np.ndarray]:
    T, Q = ST["inner"], ST["Q"]
    _expect("vrbo", len(lo), T * (Q + 2), "lower")  # per inner step: cross, Q HVPs, ∇_y G
    _expect("vrbo", len(up), T, "upper")
    return {"F": np.stack([r for r, _ in up]),
            "G": np.stack([r for r, _ in lo]).reshape(T, Q + 2, -1)}


def _sampled(name: str, hvp_first: bool) -> Callable[[list, list], dict[str, np.ndarray]]:
    """TTSA: [∇_y G, p HVPs, cross]; SUSTAIN: [∇_y G, cross, p HVPs] (p from the draw count)."""

    def layout(lo: list, up: list) -> dict[str, np.ndarray]:
        Q = ST["Q"]
        p = len(lo) - 2
        if not 0 <= p < Q:
            raise AssertionError(f"{name}: {len(lo)} lower batches in one iteration, expected 2 + p, p < {Q}")
        _expect(name, len(up), 1, "upper")
        rows = [r for r, _ in lo]
        hv, cr = (rows[1:1 + p], rows[1 + p]) if hvp_first else (rows[2:], rows[1])
        return {"y": rows[0], "F": up[0][0], "hvp": _padded(hv, Q), "cross": cr, "p": np.asarray(p)}

    return layout


def _double(name: str, sampled: bool) -> Callable[[list, list], dict[str, np.ndarray]]:
    """stocBiO, AmIGO: [T SGD steps, Q HVPs, cross]; BSA: [T SGD steps, p HVPs, cross]."""

    def layout(lo: list, up: list) -> dict[str, np.ndarray]:
        T, Q = ST["inner"], ST["Q"]
        p = len(lo) - T - 1 if sampled else Q
        if sampled and not 0 <= p < Q:
            raise AssertionError(f"{name}: {len(lo)} lower batches in one iteration, expected {T} + p + 1")
        _expect(name, len(lo), T + p + 1, "lower")
        _expect(name, len(up), 1, "upper")
        rows = [r for r, _ in lo]
        return {"sgd": np.stack(rows[:T]), "F": up[0][0], "hvp": _padded(rows[T:T + p], Q),
                "cross": rows[-1], "p": np.asarray(p)}

    return layout


def _soba(lo: list, up: list) -> dict[str, np.ndarray]:
    _expect("soba", len(lo), 1, "lower")
    _expect("soba", len(up), 1, "upper")
    return {"i": lo[0][0], "j": up[0][0]}


def _mrbo(lo: list, up: list) -> dict[str, np.ndarray]:
    Q = ST["Q"]
    _expect("mrbo", len(lo), Q + 2, "lower")  # ∇_y G, cross, Q HVPs (drawn even at t = 0)
    _expect("mrbo", len(up), 1, "upper")
    rows = [r for r, _ in lo]
    return {"y": rows[0], "F": up[0][0], "cross": rows[1], "hvp": np.stack(rows[2:]), "p": np.asarray(Q)}


def _fsla(lo: list, up: list) -> dict[str, np.ndarray]:
    _expect("fsla", len(lo), 2, "lower")
    _expect("fsla", len(up), 1, "upper")
    return {"y1": lo[0][0], "y2": lo[1][0], "F": up[0][0]}


#: name -> (lower draws, upper draws of one iteration) -> the index arrays of the JAX core
LAYOUTS: dict[str, Callable[[list, list], dict[str, np.ndarray]]] = {
    "soba": _soba, "stocbio": _double("stocbio", False), "mrbo": _mrbo, "bsa": _double("bsa", True),
    "saba": _saba, "vrbo": _vrbo, "ttsa": _sampled("ttsa", True), "amigo": _double("amigo", False),
    "fsla": _fsla, "sustain": _sampled("sustain", False),
}


def indices(name: str, rec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The recorded draws as the JAX core's inputs: one array per index name with a leading
    iteration axis (plus SABA's partitions)."""
    per = [LAYOUTS[name](lo, up) for lo, up in rec["iters"]]
    out = {k: np.stack([d[k] for d in per]) for k in per[0]}
    if name == "saba":
        out["lpart"], out["upart"] = rec["lpart"], rec["upart"]
    return out


def compare(name: str, rec: dict[str, Any], jax_python: str, data: str, tmp: str) -> dict[str, float]:
    """Run the JAX core on the recorded batches and compare its final (x, y) with ours."""
    idx, out = f"{tmp}/{name}-idx.npz", f"{tmp}/{name}-out.npz"
    np.savez(idx, **indices(name, rec))
    r = subprocess.run([jax_python, str(JAX_REF), data, name, "--check", idx, out],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"jax_ref --check {name} failed:\n{r.stderr[-2000:]}")
    j = np.load(out)
    got = np.load(idx)
    extra: dict[str, Any] = {}
    if name in ("bsa", "ttsa", "sustain"):  # the truncation indices drawn (p > 0 exercises the HVP chain)
        extra["p"] = [int(v) for v in got["p"]]
    if name == "saba":  # SAGA memories read back: batches drawn a second time
        extra["repeats"] = {"lower": int(len(got["i"]) - len(set(got["i"].tolist()))),
                            "upper": int(len(got["j"]) - len(set(got["j"].tolist())))}
    dx_ours, dx_jax = rec["x"] - rec["x0"], j["x"] - rec["x0"]
    return {"iters": len(rec["iters"]),
            "x_rel": float(np.linalg.norm(dx_jax - dx_ours) / np.linalg.norm(dx_ours)),
            "y_rel": float(np.linalg.norm(j["y"] - rec["y"]) / np.linalg.norm(rec["y"])),
            "x_moved": float(np.linalg.norm(dx_ours)), "y_norm": float(np.linalg.norm(rec["y"])), **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jax-python", required=True, help="interpreter with jax installed")
    ap.add_argument("--only", default="", help="comma list (default: all ten)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error accepted")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = a.only.split(",") if a.only else list(SOLVERS)
    p, sd = stochastic_data()
    tmp = tempfile.mkdtemp(prefix="bilevel-jaxcheck-")
    np.savez(f"{tmp}/st.npz", **sd)
    results, bad = {}, []
    for name in names:
        results[name] = compare(name, record(name, p=p), a.jax_python, f"{tmp}/st.npz", tmp)
        print(f"{name:8s} {json.dumps(results[name])}", flush=True)
        if max(results[name]["x_rel"], results[name]["y_rel"]) > a.tol:
            bad.append(name)
    if bad:
        print(f"MISMATCH (> {a.tol:g}): {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(names)} agree to {a.tol:g}")


if __name__ == "__main__":
    main()


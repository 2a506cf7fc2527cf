"""Stochastic benchmark, the problems: the per-problem TOML configurations (load, select,
dump), the solvers they name and the problem builders they call.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import bilevel as bl
import bilevel.problems  # noqa: F401  (registers bl.problems)

from ...errors import BilevelError

CONFIG_DIR = Path(__file__).parent.parent / "configs" / "stochastic"
PROBLEMS = ("quadratic", "regsel", "hyperclean")

#: single- or double-loop structure (a double loop runs an inner solver / estimator loop per outer step)
LOOP = {
    "AlternatingSGD": "single", "AlternatingSGD-double": "double", "BSA": "double", "TTSA": "single",
    "StocBiO": "double", "AmIGO": "double", "STABLE": "single", "MSTSA": "single", "SUSTAIN": "single",
    "MRBO": "single", "VRBO": "double", "SOBA": "single", "SABA": "single", "MASOBA": "single",
    "SRBA": "single", "FSLA": "single", "F2SA": "double", "BOME": "double", "PZOBO": "double",
    "MRBOZO": "single",
}
#: benchopt's jitted JAX implementation, ms per outer iteration on hyper-cleaning (issue 5)
JAX_MS = {"SOBA": 0.54, "FSLA": 0.93, "SABA": 1.17, "TTSA": 1.43, "SUSTAIN": 1.55, "BSA": 1.84,
          "StocBiO": 3.57, "MRBO": 3.85, "AmIGO": 3.95, "VRBO": 38.9}
#: the reproduction report's claims (sec. 6): these should beat those on hyper-cleaning
CLAIM_FAST, CLAIM_SLOW = ("VRBO", "MRBO"), ("StocBiO", "BSA", "MSTSA")
BENCH_KEYS = ("class", "sampler", "batch_size", "grid")


# --- configuration ---------------------------------------------------------------------------------
def load_config(problem: str, path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path is not None else CONFIG_DIR / f"{problem}.toml"
    with open(p, "rb") as fh:
        return tomllib.load(fh)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for k in parts[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {"c": d[k]} if isinstance(d.get(k), (int, float)) else {}
        d = d[k]
    d[parts[-1]] = value


def solver_from_config(name: str, cfg: dict[str, Any]) -> bl.solvers.Solver:
    cls_name = cfg.get("class", name)
    cls = getattr(bl.solvers, cls_name, None)
    if cls is None:
        raise BilevelError(f"unknown solver class {cls_name!r} in the stochastic bench config")
    kwargs = {k: v for k, v in cfg.items() if k not in BENCH_KEYS}
    return cls(**kwargs)


def build_problem(cfg: dict[str, Any]) -> bl.problems.StochasticProblem:
    builder = cfg["bench"]["builder"]
    kw = dict(cfg.get("problem", {}))
    fn = {"quadratic": bl.problems.stochastic_quadratic, "regsel": bl.problems.regularization_selection,
          "hyperclean": bl.problems.hyperclean}[builder]
    return fn(**kw)


def _describe(c: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items() if k != "grid")


def dump_config(cfg: dict[str, Any], header: str = "") -> str:
    """TOML text of a bench config (:func:`bilevel.experiments.config.dumps`): top-level tables,
    ``[solvers.NAME]`` with schedules as inline tables, and ``[solvers.NAME.grid]``."""
    from ...experiments.config import dumps

    def inline(path: tuple[str, ...]) -> bool:  # schedules {c, e, t0} inside [solvers.NAME]
        return len(path) >= 3 and path[0] == "solvers" and path[2] != "grid"

    return dumps(cfg, header, inline=inline)

def _problem_config(name: str, quick: bool, config_dir: Path | None) -> dict[str, Any]:
    cfg = load_config(name, None if config_dir is None else config_dir / f"{name}.toml")
    if quick and "quick" in cfg:
        q = cfg["quick"]
        cfg["problem"] = {**cfg.get("problem", {}), **q.get("problem", {})}
        cfg["bench"] = {**cfg["bench"], **q.get("bench", {})}
        if "solvers" in q:
            cfg["solvers"] = {s: cfg["solvers"][s] for s in q["solvers"] if s in cfg["solvers"]}
        if "timing" in q:
            cfg["timing"] = {**cfg.get("timing", {}), **q["timing"]}
    return cfg


def _select(cfg: dict[str, Any], only: list[str] | None) -> dict[str, dict[str, Any]]:
    sol = cfg.get("solvers", {})
    if only:
        missing = [s for s in only if s not in sol]
        if missing and len(missing) == len(only):
            return {}
        sol = {s: sol[s] for s in only if s in sol}
    return sol



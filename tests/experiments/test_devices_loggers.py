"""device / dtype config keys, CSV and TensorBoard loggers, user callbacks."""

from __future__ import annotations

import csv

import pytest
import torch

from bilevel.errors import ConfigError
from bilevel.experiments import get, load_trace, run
from bilevel.experiments.trace import Callback
from tests.experiments.conftest import TINY_HC, strip_time

QUIET = {"progress": False, "echo": None, "plots": False}
QUAD = {"toy": "quadratic", "solver": "LS", "inner.lr": 0.5, "inner.steps": 10, "upper.lr": 0.2, "steps": 6,
        "eval_every": 2, "x0": 0.5, "y0": 0.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_fails_clearly_when_unavailable(tmp_path):
    with pytest.raises(ConfigError, match="device=cuda: CUDA is not available"):
        run("hyperclean", overrides={**TINY_HC, "device": "cuda", "dtype": "float64"}, out=tmp_path / "r",
            **QUIET)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="not a torch device"):
        get("toy").resolve(overrides={"device": "gpu0"})
    with pytest.raises(ConfigError, match="dtype: 'double' is not one of float32, float64"):
        get("toy").resolve(overrides={"dtype": "double"})


def test_dtype_reaches_data_and_variables(tmp_path):
    seen = {}

    class Grab(Callback):
        def on_start(self, run_dir, config, records):
            seen["cfg"] = config

    exp = get("hyperclean")
    s = exp.build(exp.resolve(overrides={**TINY_HC, "dtype": "float64"}))
    assert s.x0.dtype == torch.float64 and all(v.dtype == torch.float64 for v in s.y0.values())
    assert s.lower_data.full()[0].dtype == torch.float64 and s.upper_data.full()[0].dtype == torch.float64
    t = get("toy")
    q = t.build(t.resolve(overrides={**QUAD, "dtype": "float32"}))
    assert q.x0.dtype == torch.float32
    r = run("toy", overrides={**QUAD, "dtype": "float32"}, out=tmp_path / "r", callbacks=[Grab()], **QUIET)
    assert r.completed and seen["cfg"]["dtype"] == "float32"


def test_an_experiment_that_ignores_dtype_is_rejected(tmp_path):
    """test-quad builds float64 variables whatever the config says: dtype=float32 must not pass silently."""
    with pytest.raises(ConfigError, match="dtype=float32 is not applied by this experiment"):
        run("test-quad", overrides={"dtype": "float32"}, out=tmp_path / "r", **QUIET)


def test_csv_logger_and_callbacks_see_every_record_also_after_resume(tmp_path):
    got: list[dict] = []

    class Collect(Callback):
        def on_record(self, record):
            got.append(record)

        def on_end(self, result):
            got.append({"end": result is not None and result.completed})

    out = tmp_path / "r"
    r = run("toy", overrides={**QUAD, "loggers": "csv", "checkpoint_every": 2}, out=out, stop_after=3,
            callbacks=[Collect()], **QUIET)
    assert not r.completed and got[-1] == {"end": False}
    r = run("toy", resume=out, callbacks=[Collect()], **QUIET)
    assert r.completed and got[-1] == {"end": True}
    trace = load_trace(out)
    with open(out / "trace.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["step"]) for row in rows] == [rec["step"] for rec in trace] == [0, 2, 4, 6]
    assert all(float(row["x_err"]) == rec["x_err"] for row, rec in zip(rows, trace))  # repr round-trips
    assert "lower_gap" in rows[0] and rows[-1]["f_err"] != ""
    # the callback saw steps 0 and 2, then (after the resume from the step-2 checkpoint) 4 and 6
    assert [g["step"] for g in got if "step" in g] == [0, 2, 4, 6]
    with pytest.raises(ConfigError, match="loggers: unknown wandb"):
        run("toy", overrides={**QUAD, "loggers": "csv,wandb"}, out=tmp_path / "w", **QUIET)


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run("toy", overrides={**QUAD, "loggers": "tensorboard"}, out=tmp_path / "r", **QUIET)
    acc = EventAccumulator(str(r.path / "tensorboard"))
    acc.Reload()
    xs = acc.Scalars("x_err")
    assert [e.step for e in xs] == [0, 2, 4, 6]
    ref = strip_time(load_trace(r.path))
    assert [pytest.approx(e.value, rel=1e-6) for e in xs] == [rec["x_err"] for rec in ref]

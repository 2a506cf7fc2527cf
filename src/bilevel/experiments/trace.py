"""Run traces: ``trace.jsonl`` (one JSON record per evaluation) and the loggers beside it.

:func:`load_trace` reads a trace; a torn last line (a run killed while appending) is dropped.
Used by the runner, the plots and the tables, so none of them imports another for it.

Loggers: the config key ``loggers`` (``--set loggers=csv,tensorboard``) adds :class:`CSVLogger`
(``trace.csv``) and :class:`TensorBoardLogger` (``tensorboard/``, optional dependency); any
:class:`Callback` passed as ``run(..., callbacks=[...])`` receives the same records (e.g. a
Weights & Biases logger, see :class:`Callback`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["load_trace", "TRACE", "Callback", "CSVLogger", "TensorBoardLogger", "LOGGERS", "make_loggers"]

TRACE = "trace.jsonl"


def load_trace(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``path`` (a run folder or a ``trace.jsonl``); ``[]`` if there is none."""
    p = Path(path)
    p = p / TRACE if p.is_dir() else p
    if not p.is_file():
        return []
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn last line of a killed run
                break
            raise
    return out


# --- loggers and callbacks ---------------------------------------------------------------------------
class Callback:
    """What the runner calls during a single run; subclass and override what you need.

    ``on_start(run_dir, config, records)``: before the first step of this session; ``records`` are
    the trace records already written (empty for a fresh run, the kept ones after ``--resume``).
    ``on_record(record)``: after every evaluation, with the record just appended to
    ``trace.jsonl``. ``on_end(result)``: once at the end of the session (``result`` is the
    :class:`~bilevel.experiments.RunResult`, or None when the session failed).

    A Weights & Biases logger, for instance::

        class WandbLogger(Callback):
            def on_start(self, run_dir, config, records):
                import wandb
                self.run = wandb.init(project="bilevel", config=config, dir=str(run_dir),
                                      resume="allow", id=run_dir.name)
            def on_record(self, record):
                self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             step=record["step"])
            def on_end(self, result):
                self.run.finish()

        bilevel.experiments.run("hyperclean", callbacks=[WandbLogger()])
    """

    def on_start(self, run_dir: Path, config: dict[str, Any], records: list[dict[str, Any]]) -> None:
        pass

    def on_record(self, record: dict[str, Any]) -> None:
        pass

    def on_end(self, result: Any) -> None:
        pass


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CSVLogger(Callback):
    """``trace.csv`` beside ``trace.jsonl``: one row per record, one column per key seen so far
    (the file is rewritten when a new key appears, so every row has every column)."""

    def __init__(self, name: str = "trace.csv"):
        self.name = name

    def on_start(self, run_dir, config, records):
        self.path = Path(run_dir) / self.name
        self.rows: list[dict[str, Any]] = [dict(r) for r in records]
        self.columns: list[str] = []
        for r in self.rows:
            self.columns += [k for k in r if k not in self.columns]
        self._rewrite()

    def _line(self, row: dict[str, Any]) -> str:
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c)
                                                       for c in self.columns])
        return buf.getvalue()

    def _rewrite(self) -> None:
        from .checkpoint import write_text

        header = self._line({c: c for c in self.columns}) if self.columns else ""
        write_text(self.path, header + "".join(self._line(r) for r in self.rows))

    def on_record(self, record):
        self.rows.append(dict(record))
        new = [k for k in record if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(self._line(record))


class TensorBoardLogger(Callback):
    """Scalars of every record in ``tensorboard/`` (``torch.utils.tensorboard``; needs the optional
    ``tensorboard`` package). After ``--resume`` the events past the checkpoint are purged."""

    def __init__(self, folder: str = "tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            from ..errors import ConfigError

            raise ConfigError("loggers=tensorboard needs the tensorboard package (pip install tensorboard)") \
                from e
        self.folder = folder

    def on_start(self, run_dir, config, records):
        from torch.utils.tensorboard import SummaryWriter

        last = records[-1]["step"] if records else -1
        self.writer = SummaryWriter(str(Path(run_dir) / self.folder), purge_step=last + 1)
        if not records:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def on_record(self, record):
        step = int(record["step"])
        for k, v in _numbers(record).items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def on_end(self, result):
        if hasattr(self, "writer"):  # on_start ran
            self.writer.close()


#: ``loggers`` config values -> classes
LOGGERS: dict[str, type[Callback]] = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}


def make_loggers(spec: str) -> list[Callback]:
    """``"csv,tensorboard"`` -> logger instances (``""``: none beyond ``trace.jsonl``)."""
    names = [s.strip().lower() for s in str(spec or "").split(",") if s.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        from ..errors import ConfigError

        raise ConfigError(f"loggers: unknown {', '.join(bad)}; available: {', '.join(LOGGERS)} "
                          "(comma-separated; pass other Callback objects to run(..., callbacks=[...]))")
    return [LOGGERS[n]() for n in names]

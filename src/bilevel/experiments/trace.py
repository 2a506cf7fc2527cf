"""Run traces: ``trace.jsonl`` (one JSON record per evaluation) and the loggers beside it.

:func:`load_trace` reads a trace; a torn last line (a run killed while appending) is dropped.
Used by the runner, the plots and the tables, so none of them imports another for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["load_trace", "TRACE"]

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

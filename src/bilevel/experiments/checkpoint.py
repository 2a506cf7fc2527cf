"""Crash-safe files of a run folder: atomic writes and checksummed checkpoints with a fallback.

A checkpoint file is ``MAGIC``, the SHA-256 of the payload in hex, a newline, then the payload
(:func:`torch.save` bytes). :func:`save` writes a temporary file, flushes and fsyncs it, moves
the current ``last.pt`` to ``prev.pt`` and renames the temporary file to ``last.pt`` (then fsyncs
the folder), so a process killed at any point (``kill -9``, power loss) leaves at least one
complete checkpoint. :func:`load_latest` verifies the checksum of ``last.pt`` and falls back to
``prev.pt`` when it is missing, truncated or corrupted — never a pickle traceback.

:func:`write_text` is the same temp + fsync + rename for the small text files (config, trace,
summary, JSON results).

Fault injection for the tests: ``BILEVEL_CRASH_AT=checkpoint:N`` kills the process (SIGKILL)
half-way through writing the N-th checkpoint of the process, ``rename:N`` between the two
renames of the N-th one.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import torch

__all__ = ["save", "load", "load_latest", "write_text", "CorruptCheckpoint", "LAST", "PREV"]

MAGIC = b"BILEVEL-CHECKPOINT-1\n"
LAST, PREV = "last.pt", "prev.pt"
_count = {"checkpoint": 0, "rename": 0}


class CorruptCheckpoint(Exception):
    """A checkpoint file that is missing, truncated or fails its checksum."""


def _crash(point: str) -> None:
    spec = os.environ.get("BILEVEL_CRASH_AT", "")
    if not spec.startswith(point + ":"):
        return
    _count[point] += 1
    if _count[point] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` by ``text`` (temp file + fsync + rename)."""
    _write_bytes(Path(path), text.encode("utf-8"))


def save(folder: str | Path, blob: Any) -> Path:
    """Write ``blob`` as ``folder/last.pt``, keeping the previous one as ``prev.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(blob, buf)
    payload = buf.getvalue()
    data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    last, prev, tmp = folder / LAST, folder / PREV, folder / (LAST + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        _crash("checkpoint")
        fh.write(data[len(data) // 2:])
        fh.flush()
        os.fsync(fh.fileno())
    if last.exists():
        os.replace(last, prev)
        _crash("rename")
    os.replace(tmp, last)
    _fsync_dir(folder)
    return last


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """The blob of one checkpoint file; :class:`CorruptCheckpoint` if it does not verify."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: {e}") from e
    head = len(MAGIC) + 64 + 1
    if not data.startswith(MAGIC) or len(data) < head or data[head - 1:head] != b"\n":
        raise CorruptCheckpoint(f"{path}: not a bilevel checkpoint (bad header or truncated)")
    digest, payload = data[len(MAGIC):head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (truncated or corrupted)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=False, map_location=map_location)
    except Exception as e:  # a verified payload that does not unpickle: written by another version
        raise CorruptCheckpoint(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def load_latest(folder: str | Path, map_location: Any = "cpu") -> tuple[Any, Path | None, list[str]]:
    """(blob, file, problems): ``last.pt`` if it verifies, else ``prev.pt``; ``(None, None, ...)``
    when neither does. ``problems`` says what was wrong with the files that were skipped."""
    folder = Path(folder)
    problems: list[str] = []
    for name in (LAST, PREV):
        p = folder / name
        if not p.exists():
            continue
        try:
            return load(p, map_location), p, problems
        except CorruptCheckpoint as e:
            problems.append(str(e))
    return None, None, problems

"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015) for few-shot episodes, read from local files.

Layout (the official release): ``ROOT/images_background/<alphabet>/<character>/<id>_<drawer>.png``
(964 characters, meta-training) and ``ROOT/images_evaluation/...`` (659 characters, meta-test),
20 drawings (drawers) per character, 105 × 105 binary PNGs — either extracted folders or the
``images_background.zip`` / ``images_evaluation.zip`` archives (read in place). Following Santoro
et al. 2016 / Finn et al. 2017, each rotation by a multiple of 90° is a new class and images are
resized (default 28 × 28).

Nothing is downloaded. Checksums: pass ``sha256=`` (the archive's SHA-256) to verify a zip; the
structure is always checked (every character must have exactly 20 drawings; every PNG must
decode), with :class:`bilevel.datasets.DatasetError` naming the file otherwise.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..datasets.base import LabeledImages
from ..datasets.download import sha256_file
from ..datasets.errors import ChecksumError, DatasetError

__all__ = ["omniglot", "DRAWERS", "SPLITS"]

DRAWERS = 20
SPLITS = {"background": "images_background", "evaluation": "images_evaluation"}


def _decode(data: bytes, where: str, size: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetError("reading Omniglot needs Pillow: pip install pillow") from e
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt files
        raise DatasetError(f"{where}: not a readable PNG ({e})") from e
    img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _entries(root: Path, folder: str, sha256: str | None) -> list[tuple[str, str, str, bytes]]:
    """(alphabet, character, file name, bytes) of every PNG, from the folder or the zip."""
    out = []
    d = root / folder
    z = root / f"{folder}.zip"
    if d.is_dir():
        for p in sorted(d.glob("*/*/*.png")):
            out.append((p.parent.parent.name, p.parent.name, str(p), p.read_bytes()))
        return out
    if z.is_file():
        if sha256 is not None and sha256_file(z) != sha256.lower():
            raise ChecksumError(f"{z}: SHA-256 {sha256_file(z)} differs from the expected {sha256} "
                                "(corrupt or different file)")
        try:
            with zipfile.ZipFile(z) as zf:
                for name in sorted(zf.namelist()):
                    parts = name.split("/")
                    if len(parts) == 4 and parts[0] == folder and parts[3].endswith(".png"):
                        out.append((parts[1], parts[2], f"{z}:{name}", zf.read(name)))
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{z}: not a valid zip archive ({e})") from e
        return out
    raise DatasetError(f"Omniglot {folder!r} not found: expected the folder {d} or the archive {z} "
                       "(download images_background.zip / images_evaluation.zip from the official "
                       "release; nothing is downloaded at run time)")


def omniglot(root: str | Path, split: str = "background", *, size: int = 28,
             rotations: Sequence[int] = (0, 90, 180, 270), sha256: str | None = None) -> LabeledImages:
    """Omniglot ``split`` ("background" = meta-train, "evaluation" = meta-test) as flattened uint8
    images ``(n, size²)``; class = (character, rotation), ``n = 20 · characters · len(rotations)``."""
    if split not in SPLITS:
        raise DatasetError(f"unknown Omniglot split {split!r}; valid: {', '.join(SPLITS)}")
    rots = [int(r) for r in rotations]
    if not rots or any(r % 90 for r in rots):
        raise DatasetError(f"rotations must be multiples of 90 degrees, got {rotations}")
    folder = SPLITS[split]
    by_char: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for alpha, char, where, data in _entries(Path(root), folder, sha256):
        by_char.setdefault((alpha, char), []).append((where, data))
    if not by_char:
        raise DatasetError(f"no PNG files under {Path(root) / folder} (expected "
                           "<alphabet>/<character>/<id>_<drawer>.png)")
    images, labels = [], []
    for c, key in enumerate(sorted(by_char)):
        files = by_char[key]
        if len(files) != DRAWERS:
            raise DatasetError(f"Omniglot character {key[0]}/{key[1]} has {len(files)} drawings, "
                               f"expected {DRAWERS} (incomplete or corrupt copy)")
        for where, data in files:
            img = _decode(data, where, size)
            for r, deg in enumerate(rots):
                images.append(np.rot90(img, k=deg // 90).reshape(-1))
                labels.append(c * len(rots) + r)
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64),
                         len(by_char) * len(rots), 255.0, f"omniglot-{split}")

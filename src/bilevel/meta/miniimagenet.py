"""mini-ImageNet (Vinyals et al. 2016; the class split of Ravi & Larochelle 2017: 64 meta-train,
16 meta-validation, 20 meta-test classes of 600 images each), read from local files.

Format: the widely used pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict
``{"image_data": uint8 array (N, H, W, 3), "class_dict": {wnid: [row indices]}}`` (84 × 84 images in
the standard release). The loader checks the class counts of the split (64/16/20), that the rows
of ``class_dict`` cover ``image_data`` without overlap, and — with ``sha256=`` — the file's
SHA-256; errors name the file. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..datasets.base import LabeledImages
from ..datasets.download import sha256_file
from ..datasets.errors import ChecksumError, DatasetError

__all__ = ["mini_imagenet", "CLASSES", "FILES"]

CLASSES = {"train": 64, "val": 16, "test": 20}
FILES = {s: f"mini-imagenet-cache-{s}.pkl" for s in CLASSES}


def mini_imagenet(root: str | Path, split: str = "train", *, sha256: str | None = None,
                  check_classes: bool = True) -> LabeledImages:
    """One split as flattened uint8 images ``(N, H·W·3)`` with labels 0..C−1 (classes sorted by
    WordNet id)."""
    if split not in CLASSES:
        raise DatasetError(f"unknown mini-ImageNet split {split!r}; valid: {', '.join(CLASSES)}")
    path = Path(root) / FILES[split]
    if not path.is_file():
        raise DatasetError(f"mini-ImageNet {split!r} not found: expected {path} (the pickle cache "
                           "of the Ravi & Larochelle split; nothing is downloaded at run time)")
    if sha256 is not None and sha256_file(path) != sha256.lower():
        raise ChecksumError(f"{path}: SHA-256 {sha256_file(path)} differs from the expected {sha256}")
    try:
        with open(path, "rb") as fh:
            blob = pickle.load(fh)  # noqa: S301 - a local file the user points to
    except Exception as e:
        raise DatasetError(f"{path}: not a readable pickle ({e})") from e
    if not isinstance(blob, dict) or "image_data" not in blob or "class_dict" not in blob:
        raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    data, classes = np.asarray(blob["image_data"]), blob["class_dict"]
    if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: image_data must be uint8 (N, H, W, 3), got {data.dtype} "
                           f"{data.shape}")
    if check_classes and len(classes) != CLASSES[split]:
        raise DatasetError(f"{path}: {len(classes)} classes, the standard {split} split has "
                           f"{CLASSES[split]}")
    labels = np.full(len(data), -1, dtype=np.int64)
    for c, wnid in enumerate(sorted(classes)):
        idx = np.asarray(classes[wnid], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
            raise DatasetError(f"{path}: class {wnid} lists rows outside image_data")
        if (labels[idx] >= 0).any():
            raise DatasetError(f"{path}: class {wnid} shares rows with another class")
        labels[idx] = c
    if (labels < 0).any():
        raise DatasetError(f"{path}: {int((labels < 0).sum())} images belong to no class")
    return LabeledImages(data.reshape(len(data), -1), labels, len(classes), 255.0,
                         f"mini-imagenet-{split}")

"""Omniglot and mini-ImageNet loaders on tiny files generated in the official formats."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

import bilevel.meta as M
from bilevel.datasets import ChecksumError, DatasetError, sha256_file
from bilevel.meta.miniimagenet import mini_imagenet
from bilevel.meta.omniglot import omniglot

PIL = pytest.importorskip("PIL.Image")


def _png(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) > 0.5).astype(np.uint8) * 255
    buf = io.BytesIO()
    PIL.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_tree(root, folder="images_background", chars=(("Greek", "c01"), ("Greek", "c02"),
                                                            ("Latin", "c01")), drawers=20):
    for a, c in chars:
        d = root / folder / a / c
        d.mkdir(parents=True)
        for k in range(drawers):
            (d / f"{hash((a, c)) % 1000:04d}_{k + 1:02d}.png").write_bytes(_png(k))


def test_omniglot_folder_rotations_as_classes_and_episodes(tmp_path):
    _omniglot_tree(tmp_path)
    data = omniglot(tmp_path, "background", size=12)
    assert data.n_classes == 3 * 4 and len(data) == 3 * 20 * 4 and data.dim == 144
    img0 = data.images[data.labels == 0][0].reshape(12, 12)
    img1 = data.images[data.labels == 1][0].reshape(12, 12)
    assert np.array_equal(np.rot90(img0), img1)  # class 1 = character 0 rotated by 90°
    ep = M.Episodes(data.features(), data.labels, range(data.n_classes), ways=5, shots=1,
                    queries=19, seed=0)
    assert ep.next(2)["query_x"].shape == (2, 95, 144)


def test_omniglot_zip_checksum_and_bad_files(tmp_path):
    _omniglot_tree(tmp_path / "src", folder="images_evaluation", chars=(("A", "c1"),))
    z = tmp_path / "images_evaluation.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
    data = omniglot(tmp_path, "evaluation", size=12, rotations=(0,), sha256=sha256_file(z))
    assert data.n_classes == 1 and len(data) == 20
    with pytest.raises(ChecksumError, match="SHA-256"):
        omniglot(tmp_path, "evaluation", sha256="0" * 64)
    with pytest.raises(DatasetError, match="images_background"):
        omniglot(tmp_path, "background")
    _omniglot_tree(tmp_path / "few", chars=(("A", "c1"),), drawers=19)
    with pytest.raises(DatasetError, match="A/c1 has 19 drawings, expected 20"):
        omniglot(tmp_path / "few")
    _omniglot_tree(tmp_path / "bad", chars=(("A", "c1"),))
    next((tmp_path / "bad").rglob("*.png")).write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a readable PNG"):
        omniglot(tmp_path / "bad")


def _mini(root, split, n_classes, per=2, hw=4):
    data = np.arange(n_classes * per * hw * hw * 3, dtype=np.int64).astype(np.uint8)
    data = data.reshape(n_classes * per, hw, hw, 3)
    classes = {f"n{c:08d}": list(range(c * per, (c + 1) * per)) for c in range(n_classes)}
    path = root / f"mini-imagenet-cache-{split}.pkl"
    path.write_bytes(pickle.dumps({"image_data": data, "class_dict": classes}))
    return path


def test_mini_imagenet_standard_split_checks(tmp_path):
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        p = _mini(tmp_path, split, n)
        d = mini_imagenet(tmp_path, split, sha256=sha256_file(p))
        assert d.n_classes == n and len(d) == 2 * n and d.dim == 48
        assert list(d.labels[:4]) == [0, 0, 1, 1]
    with pytest.raises(ChecksumError):
        mini_imagenet(tmp_path, "test", sha256="f" * 64)
    _mini(tmp_path / "x", "train", 10) if (tmp_path / "x").mkdir() is None else None
    with pytest.raises(DatasetError, match="10 classes, the standard train split has 64"):
        mini_imagenet(tmp_path / "x", "train")
    with pytest.raises(DatasetError, match="not found"):
        mini_imagenet(tmp_path / "x", "val")
    (tmp_path / "x" / "mini-imagenet-cache-val.pkl").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        mini_imagenet(tmp_path / "x", "val")

"""``bench gemm``: one row per shape and operand layout, a time for each way of
:mod:`bilevel._gemm` and the way its timing picks."""

from __future__ import annotations

import json

import pytest

from bilevel import _gemm
from bilevel.bench import gemm


@pytest.mark.skipif(_gemm._LINEAR is None, reason="torch built without oneDNN")
def test_rows_cover_every_layout(tmp_path):
    out = tmp_path / "gemm.json"
    assert gemm.main(["--shapes", "3x5x2,4x6x7", "--rounds", "1", "--reps", "1",
                      "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted(rows) == sorted(f"{s} {a} {b}" for s in ("3x5x2", "4x6x7")
                                  for a in "NT" for b in "NT")
    for row in rows.values():
        assert sorted(row["us"]) == sorted(_gemm._WAYS) and row["chosen"] in _gemm._WAYS
        assert all(t > 0 for t in row["us"].values())

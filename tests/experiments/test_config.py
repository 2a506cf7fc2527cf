"""Config files, --set parsing and validation."""

from __future__ import annotations

import math
import tomllib

import pytest

from bilevel.errors import ConfigError
from bilevel.experiments import config as C

DEFAULTS = {
    "seed": 0, "steps": 10, "name": "cg", "flag": True, "lr": 0.1, "tags": ["a", "b"], "sizes": [1, 2],
    "data": {"n": 5, "frac": 0.5, "dataset": "mnist5k"},
}


def test_dumps_round_trip():
    cfg = {"s": 'quote " back \\ tab\t ü', "i": -3, "f": 1e-05, "g": 0.1, "big": 1e300, "inf": math.inf,
           "b": False, "l": [1, 2.5, "x"], "empty": [],
           "sec": {"k": 1, "odd key": "v", "x.y": 2.0}}
    back = tomllib.loads(C.dumps(cfg))
    assert back == cfg
    assert C.loads(C.dumps(DEFAULTS)) == DEFAULTS


def test_dumps_nested_tables_round_trip_and_rejects_objects():
    cfg = {"x": 1, "a": {"b": {"c": 1, "d": {"e": [1.5, "é"]}}, "f": {"c": 2.0, "e": 0.5}, "g": True},
           "z": "top"}
    assert C.loads(C.dumps(cfg)) == cfg
    text = C.dumps(cfg, header="one\ntwo", inline=lambda path: path[-1] == "f")
    assert text.startswith("# one\n# two\n") and "f = {c = 2.0, e = 0.5}" in text and "[a.b.d]" in text
    assert C.loads(text) == cfg
    with pytest.raises(ConfigError, match="cannot write"):
        C.dumps({"a": object()})


def test_resolve_layers_and_types():
    cfg = C.resolve(DEFAULTS, file={"steps": 20, "data": {"n": 7}},
                    overrides=C.parse_sets(["lr=1", "data.frac=0.25", "name=123", "flag=false",
                                            "tags=['z']", "data.dataset=digits"]))
    assert cfg["steps"] == 20 and cfg["data"]["n"] == 7
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)  # int accepted for a float key
    assert cfg["name"] == "123"  # a string key keeps the typed text
    assert cfg["flag"] is False and cfg["tags"] == ["z"] and cfg["data"]["dataset"] == "digits"
    assert DEFAULTS["steps"] == 10 and DEFAULTS["data"]["n"] == 5  # defaults untouched


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        C.resolve(DEFAULTS, overrides={"data.nn": 3})
    msg = str(e.value)
    assert "data.nn" in msg and "did you mean data.n" in msg
    for k in ("seed", "steps", "data.frac", "data.dataset"):
        assert k in msg
    with pytest.raises(ConfigError, match="valid keys"):
        C.resolve(DEFAULTS, file={"model": {"kind": "mlp"}})


@pytest.mark.parametrize("item, pattern", [
    ("steps=abc", "steps: expected int"),
    ("steps=1.5", "steps: expected int"),
    ("lr=true", "lr: expected float"),
    ("flag=1", "flag: expected bool"),
    ("sizes=[1, 'x']", r"sizes\[1\]: expected int"),
    ("tags=a", "tags: expected list"),
])
def test_bad_values(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        C.resolve(DEFAULTS, overrides=C.parse_sets([item]))


def test_file_type_errors_and_table_misuse():
    with pytest.raises(ConfigError, match="expected str"):
        C.resolve(DEFAULTS, file={"name": 3})  # in a file, a string must be quoted
    with pytest.raises(ConfigError, match="is a table"):
        C.resolve(DEFAULTS, file={"data": 3})


def test_choices_are_checked_case_insensitively():
    ch = {"data.dataset": ("mnist5k", "digits")}
    cfg = C.resolve(DEFAULTS, overrides={"data.dataset": "DIGITS"}, choices=ch)
    assert cfg["data"]["dataset"] == "digits"
    with pytest.raises(ConfigError, match="not one of mnist5k, digits"):
        C.resolve(DEFAULTS, overrides={"data.dataset": "cifar"}, choices=ch)


def test_parse_sets_errors_and_values():
    with pytest.raises(ConfigError, match="key=value"):
        C.parse_sets(["novalue"])
    with pytest.raises(ConfigError, match="key=value"):
        C.parse_sets(["=3"])
    assert C.parse_value("[1, 2]") == [1, 2] and C.parse_value("x y") == "x y" and C.parse_value("'q'") == "q"


def test_read_reports_invalid_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("a = = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        C.read(p)
    with pytest.raises(ConfigError, match="not found"):
        C.read(tmp_path / "missing.toml")

"""Typed configs: YAML + overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from system.config import ConfigError, dump_yaml, load_config, markdown_table, option, parse_cli


@dataclasses.dataclass
class Inner:
    size: int = option(4, "a size")
    scales: tuple[float, ...] = option((1.0, 0.5), "scales")


@dataclasses.dataclass
class Outer:
    name: str = option("x", "a name")
    mode: Literal["seg", "cam"] = option("seg", "what to write")
    ratio: float = option(0.5, "a ratio")
    uri: str | None = option(None, "an optional URI")
    inner: Inner = option(factory=Inner, doc="nested")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  size: 8\n")
    cfg = load_config(Outer, path, ["inner.scales=[1, 2]", "ratio=1", "uri=s3://b/p", "mode=cam"])
    assert cfg == Outer(name="y", mode="cam", ratio=1.0, uri="s3://b/p", inner=Inner(size=8, scales=(1.0, 2.0)))
    assert isinstance(cfg.ratio, float)
    assert load_config(Outer, None, ["name=123"]).name == "123"
    assert load_config(Outer, None, ["ratio=1e-8"]).ratio == 1e-8


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.sise=3", r"unknown config key\(s\): inner.sise"),
        ("inner.size=big", "inner.size: expected an integer"),
        ("mode=both", "mode: 'both' is not one of 'seg' | 'cam'"),
        ("inner=3", "inner: expected a mapping"),
        ("inner.scales=1.0", r"inner.scales: expected a list"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, bad)


def test_cli_exits_with_the_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Outer, ["nmae=3"], prog="prog")
    assert exc.value.code == 2
    assert "unknown config key(s): nmae" in capsys.readouterr().err
    assert parse_cli(Outer, ["inner.size=2"]).inner.size == 2


def test_dump_roundtrip_and_reference(tmp_path):
    cfg = load_config(Outer, None, ["inner.size=9"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg
    table = markdown_table(Outer)
    assert "| `inner.size` | int | `4` | a size |" in table

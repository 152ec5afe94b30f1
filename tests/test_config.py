"""Strict YAML -> dataclass configs: unknown and mistyped keys are errors naming the key and file."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mpo_data.config import apply_overrides, build, load_yaml
from mpo_data.errors import InputError


@dataclass
class Inner:
    x: int
    y: float = 1.0
    z: str | None = None


@dataclass
class Outer:
    inner: Inner
    items: list[Inner] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    span: tuple[float, float] | None = None


def test_nested_build_converts_and_defaults():
    got = build(Outer, {"inner": {"x": 1}, "items": [{"x": 2, "y": 3}], "weights": {"a": 1}}, "c.yaml")
    assert got == Outer(Inner(1), [Inner(2, 3.0)], {"a": 1.0})
    assert isinstance(got.items[0].y, float)
    assert build(Outer, {"inner": {"x": 1}, "span": [0, 0.8]}, "c.yaml").span == (0.0, 0.8)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"inner": {"x": 1, "q": 2}}, "c.yaml: inner: unknown key 'q' (known: x, y, z)"),
        ({"inner": {"x": "s"}}, "c.yaml: inner.x: expected int, got str 's'"),
        ({"inner": {"x": True}}, "c.yaml: inner.x: expected int, got bool True"),
        ({"inner": {"x": 1}, "items": [{"y": 1}]}, "c.yaml: items[0]: missing key 'x'"),
        ({"inner": {"x": 1}, "items": {"x": 1}}, "c.yaml: items: expected a list, got dict"),
        ({"inner": {"x": 1, "z": 3}}, "c.yaml: inner.z: expected str, got int 3"),
        ({}, "c.yaml: missing key 'inner'"),
        ({"inner": {"x": 1}, "span": [0.2]}, "c.yaml: span: expected 2 values, got 1"),
        ({"inner": {"x": 1}, "span": [0.2, "a"]}, "c.yaml: span[1]: expected float, got str 'a'"),
    ],
)
def test_build_errors_name_file_and_key(data, message):
    with pytest.raises(InputError) as err:
        build(Outer, data, "c.yaml")
    assert str(err.value) == message


def test_load_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  x: 1\n")
    data = apply_overrides(load_yaml(path), ["inner.y=2.5", "weights.a=3"])
    assert build(Outer, data, str(path)) == Outer(Inner(1, 2.5), [], {"a": 3.0})
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    path.write_text("inner: [1,\n")
    with pytest.raises(InputError, match=rf"{path}:\d+: invalid YAML"):
        load_yaml(path)
    path.write_text("- 1\n")
    with pytest.raises(InputError, match="expected a mapping at the top level"):
        load_yaml(path)


def test_exponent_floats_read_as_floats_in_files_and_overrides(tmp_path):
    """PyYAML's YAML 1.1 reads `1e-4` as text; a learning rate given so reached AdamW as a string."""
    path = tmp_path / "c.yaml"
    path.write_text("dpo:\n  learning_rate: 1e-4\n  beta: 5E+1\n  name: 1e-4x\n")
    data = apply_overrides(load_yaml(path), ["dpo.lr=-2e-5", "dpo.steps=10", "dpo.tag=e5"])
    assert data["dpo"] == {"learning_rate": 1e-4, "beta": 50.0, "name": "1e-4x", "lr": -2e-5, "steps": 10, "tag": "e5"}
    assert all(type(data["dpo"][k]) is float for k in ("learning_rate", "beta", "lr"))
    assert type(data["dpo"]["steps"]) is int

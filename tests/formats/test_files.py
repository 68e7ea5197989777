"""File primitives: plain names, bounded JSON, safetensors headers, dtype and schema checks."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save_file

import adapter_composer.formats.files as files
from adapter_composer.errors import AdapterFileError, UnsafePathError
from adapter_composer.formats.files import (
    check_dtypes,
    check_finite,
    member,
    parse_json,
    strict_problems,
    tensor_headers,
)


@pytest.mark.parametrize("name", ["a.safetensors", "adapter.x-1.0123abcd.safetensors", "composition.json", "A_b"])
def test_plain_names_pass(tmp_path, name):
    assert member(tmp_path, name, "test") == tmp_path / name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "../x", "a/b", "a\\b", "/abs", "x\x00y", "é.safetensors", "a" * 201, 5, None, ["a"]]
)
def test_anything_else_is_refused_before_the_file_system_is_asked(tmp_path, name):
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        member(tmp_path, name, "test")


@pytest.mark.parametrize(
    "text, needle",
    [
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b'{"a": NaN}', "not a number JSON allows"),
        (b'{"a": -Infinity}', "not a number JSON allows"),
        (b'{"a": 1e999}', "overflows to infinity"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"a": [' + b"[" * 100 + b"]" * 100 + b"]}", "nests more than"),
        (b"[" * 100000 + b"]" * 100000, "nests"),
        (b'{"a": 1' , "not valid JSON"),
    ],
)
def test_json_limits(text, needle):
    with pytest.raises(AdapterFileError, match=needle):
        parse_json(text, "x.json")


def test_json_size_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 10)
    (tmp_path / "x.json").write_text('{"a": "0123456789"}')
    with pytest.raises(AdapterFileError, match="larger than"):
        files.read_json(tmp_path / "x.json", "test")


def test_headers_give_dtypes_and_shapes(tmp_path):
    save_file({"a": torch.zeros(3, 4), "codes": torch.zeros(5, dtype=torch.uint8)}, str(tmp_path / "t.safetensors"))
    assert tensor_headers(tmp_path / "t.safetensors", "t") == {"a": (torch.float32, (3, 4)), "codes": (torch.uint8, (5,))}


def test_dtype_rules():
    f32, f16 = torch.zeros(2), torch.zeros(2, dtype=torch.float16)
    assert check_dtypes("w", {"a": f16}, {"a": torch.float32}) == []  # floats are cast
    assert check_dtypes("w", {"a": torch.zeros(2, dtype=torch.uint8)}, {"a": torch.uint8}) == []
    [problem] = check_dtypes("w", {"a": torch.zeros(2, dtype=torch.int64)}, {"a": torch.float32})
    assert "a (int64 for a float32 tensor)" in problem and "not floating point" in problem
    [problem] = check_dtypes("w", {"a": f32}, {"a": torch.uint8})
    assert "not of the module's dtype" in problem
    [problem] = check_finite("w", {"a": torch.tensor([1.0, float("inf"), float("nan")])})
    assert "a (2 of 3 values)" in problem


class Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    r: int = 8
    alpha: float = 8.0
    flag: bool = False
    names: tuple[str, ...] = ()


@pytest.mark.parametrize(
    "values, refused",
    [
        ({"r": 4, "alpha": 16, "flag": True, "names": ["a"]}, False),  # ints fit floats, lists fit tuples
        ({"flag": "false"}, True),  # lax pydantic reads "false" as False: still a coercion
        ({"flag": 1}, True),
        ({"r": 8.0}, True),
        ({"r": "8"}, True),
        ({"alpha": "8"}, True),
        ({"r": -1.5}, False),  # refused anyway: left to validation, which names it as bad-config
    ],
)
def test_strict_problems(values, refused):
    assert bool(strict_problems(Schema, values, "cfg")) == refused

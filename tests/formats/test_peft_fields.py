"""The typed readers PEFT codecs use: only what PEFT itself writes is accepted."""

from __future__ import annotations

import pytest

from adapter_composer.formats.peft_fields import (
    peft_bool,
    peft_dict,
    peft_float,
    peft_int,
    peft_str,
    peft_strings,
)


@pytest.mark.parametrize(
    "read, doc, expected",
    [
        (lambda d: peft_int(d, "r", 8), {}, 8),
        (lambda d: peft_int(d, "r", 8), {"r": 16}, 16),
        (lambda d: peft_int(d, "r", None, nullable=True), {"r": None}, None),
        (lambda d: peft_float(d, "a", 8.0), {"a": 16}, 16.0),
        (lambda d: peft_float(d, "a", 8.0), {"a": 0.5}, 0.5),
        (lambda d: peft_bool(d, "b", False), {"b": True}, True),
        (lambda d: peft_str(d, "s", None), {"s": None}, None),
        (lambda d: peft_strings(d, "t", None), {"t": ["q", "v"]}, ["q", "v"]),
        (lambda d: peft_strings(d, "t", None), {"t": ".*q"}, ".*q"),
        (lambda d: peft_dict(d, "p", int), {"p": None}, {}),
        (lambda d: peft_dict(d, "p", float), {"p": {"q": 2}}, {"q": 2.0}),
    ],
)
def test_accepted(read, doc, expected):
    value = read(doc)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "read, doc, needle",
    [
        (lambda d: peft_int(d, "r"), {}, "r is missing"),
        (lambda d: peft_int(d, "r", 8), {"r": None}, "r is null"),
        (lambda d: peft_int(d, "r", 8), {"r": 8.0}, "r must be an integer"),
        (lambda d: peft_int(d, "r", 8), {"r": True}, "r must be an integer"),
        (lambda d: peft_int(d, "r", 8), {"r": "8"}, "r must be an integer"),
        (lambda d: peft_int(d, "r", 8, minimum=1), {"r": 0}, "r must be >= 1"),
        (lambda d: peft_float(d, "a", 8.0), {"a": False}, "a must be a finite number"),
        (lambda d: peft_float(d, "a", 8.0), {"a": float("inf")}, "a must be a finite number"),
        (lambda d: peft_float(d, "a", 0.0, below=1.0), {"a": 1.0}, "a must be < 1.0"),
        (lambda d: peft_bool(d, "b", False), {"b": "false"}, "b must be true or false"),
        (lambda d: peft_bool(d, "b", False), {"b": -1}, "b must be true or false"),
        (lambda d: peft_bool(d, "b", False), {"b": 0}, "b must be true or false"),
        (lambda d: peft_str(d, "s", "x", choices=("x", "y")), {"s": "z"}, "s must be one of"),
        (lambda d: peft_strings(d, "t", None), {"t": ["q", 1]}, "t must be a string or a list of strings"),
        (lambda d: peft_dict(d, "p", int), {"p": []}, "p must be an object"),
        (lambda d: peft_dict(d, "p", int), {"p": {"q": 2.0}}, r"p\['q'\] must be int"),
        (lambda d: peft_dict(d, "p", float), {"p": {"q": "2"}}, r"p\['q'\] must be a finite number"),
    ],
)
def test_refused(read, doc, needle):
    with pytest.raises(ValueError, match=needle):
        read(doc)

"""Node specs of a composition graph: what an adapter or an operator node declares.

Specs are frozen pydantic models with unknown keys refused. Config and option values must
be finite (``alpha=inf`` or ``weights=[nan, 1]`` would give NaN outputs or a silently wrong
model) and nest at most :data:`MAX_DEPTH` deep. :func:`node_from_dict` reads a node of a
graph file strictly: every field has its declared JSON type and nothing is coerced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapter_composer.errors import CompositionError
from adapter_composer.registry import Diagnostic

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$"
MAX_DEPTH = 16  # how deeply a config or options value may nest lists and dicts


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """Refuse NaN/±Inf anywhere in a config or options dict (``alpha=inf``, ``weights=[nan, 1]``
    would give NaN outputs or a silently wrong model), and values nested too deeply."""
    stack: list[tuple[str, Any, int]] = [(k, v, 1) for k, v in values.items()]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{where} nests more than {MAX_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} is {value}; values must be finite numbers")
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))
    return values


class AdapterSpec(BaseModel):
    """A named adapter: a method, where it acts, and the method's configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["adapter"] = "adapter"
    name: str = Field(pattern=NAME_PATTERN, description="unique name: letters, digits, '_' and '-'")
    method: str = Field(min_length=1, description="registered method name, e.g. 'lora'")
    targets: tuple[str, ...] | None = Field(
        None,
        description="roles ('attn.q'), module names ('q_proj') or regexes ('re:...'); None: the method's default",
    )
    layers: tuple[int, ...] | None = Field(
        None, description="layer indices to act on; None: all layers"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="the method's configuration")

    @field_validator("config")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_values(v)


class OperatorSpec(BaseModel):
    """A composition node: an operator over child nodes (adapters or operators)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["operator"] = "operator"
    name: str = Field(pattern=NAME_PATTERN, description="unique name: letters, digits, '_' and '-'")
    operator: str = Field(min_length=1, description="registered operator name, e.g. 'stack'")
    children: tuple[str, ...] = Field(description="child node names, in order")
    keys: tuple[str, ...] | None = Field(
        None, description="routing keys, one per child (route only)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="the operator's options")

    @field_validator("options")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_values(v)


Spec = AdapterSpec | OperatorSpec


def _as_tuple(value: Any) -> Any:
    """``tuple(value)`` for an iterable (not a string), else ``value`` itself for the schema to refuse."""
    if value is None or isinstance(value, str | bytes):
        return value
    try:
        return tuple(value)
    except TypeError:
        return value


def node_from_dict(i: int, raw: Any, problems: list[Diagnostic]) -> Spec | None:
    kind = raw.get("type") if isinstance(raw, dict) else None
    model = AdapterSpec if kind == "adapter" else OperatorSpec if kind == "operator" else None
    if model is None:
        problems.append(
            Diagnostic(
                code="bad-graph-file",
                message=f"node #{i} has type {kind!r:.40}; expected 'adapter' or 'operator'",
            )
        )
        return None
    name = raw.get("name")
    nodes = (name,) if isinstance(name, str) and len(name) <= 100 else ()
    try:
        text = json.dumps(raw, allow_nan=False)
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:6]
        )
    except (TypeError, ValueError, RecursionError) as exc:
        detail = f"not plain JSON values (NaN and Infinity are refused): {exc}"
    problems.append(Diagnostic(code="bad-graph-file", message=f"node #{i}: {detail}", nodes=nodes))
    return None


def adapter_spec(
    name: str,
    method: str,
    targets: Sequence[str] | str | None = None,
    layers: Iterable[int] | None = None,
    config: Mapping[str, Any] | None = None,
) -> AdapterSpec:
    """An :class:`AdapterSpec`, or a :class:`CompositionError` (``bad-node``, ``bad-config``)
    naming what does not fit; what :meth:`Graph.adapter` declares."""
    if isinstance(targets, str):
        targets = [targets]
    return _spec(
        AdapterSpec,
        name=name,
        method=method,
        targets=_as_tuple(targets),
        layers=_as_tuple(layers),
        config=dict(config or {}),
    )


def _spec(model: type, **fields: Any) -> Spec:
    try:
        return model(**fields)
    except ValidationError as exc:
        errors = exc.errors()
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        first = errors[0]["loc"][0] if errors and errors[0]["loc"] else None
        code = {"config": "bad-config", "options": "bad-options"}.get(first, "bad-node")
        raise CompositionError(
            [
                Diagnostic(
                    code=code,
                    message=f"cannot declare {fields.get('name')!r}: {detail}",
                    nodes=(str(fields.get("name")),),
                    rule="names use letters, digits, '_' and '-'; targets are strings; layers are "
                    "integers; config and option values are finite",
                )
            ]
        ) from None


def duplicate_diagnostic(name: str, existing: Spec) -> Diagnostic:
    what = (
        f"adapter of method {existing.method!r}"
        if isinstance(existing, AdapterSpec)
        else f"{existing.operator} node"
    )
    return Diagnostic(
        code="duplicate-name",
        message=f"the name {name!r} is already used by an {what}",
        nodes=(name,),
        rule="node names are unique within a graph",
        fix=f"choose another name, or Graph.remove({name!r}) first",
    )


__all__ = [
    "MAX_DEPTH",
    "NAME_PATTERN",
    "AdapterSpec",
    "OperatorSpec",
    "Spec",
    "adapter_spec",
    "check_values",
    "duplicate_diagnostic",
    "node_from_dict",
]

"""Typed configs: YAML in, validated, with `key=value` overrides from the command line.

Every stage's config is a pydantic model deriving from `Strict`, which rejects unknown keys and
wrong types; `load_config` turns any validation failure into one `UserError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from smallscale.errors import UserError

C = TypeVar("C", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config section: unknown keys and type mismatches are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "model.preset=cpu-2m"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} sets a key below {part!r}, which is not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (update wins)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate `data` as `cls`; on failure raise one UserError naming the first bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"{source}: unknown key {key!r}; check its spelling against the documented options"
        else:
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            msg = f"{source}: invalid value for {key!r}{shown}: {err['msg']}"
        raise UserError(msg) from None


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML (optional), apply `key=value` overrides, validate as `cls`."""
    data = read_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what a run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

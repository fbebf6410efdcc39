"""Typed configs: YAML in, validated, with `key=value` overrides from the command line.

Every stage's config is a pydantic model deriving from `Strict`, which rejects unknown keys and
wrong types; `load_config` turns any validation failure into one `UserError` naming the key.

Config and study files may come from anyone, so YAML is read within bounds: at most
`MAX_YAML_BYTES`, `MAX_YAML_NODES` nodes once every alias is expanded (an 860-byte "billion
laughs" file otherwise expands to gigabytes), `MAX_YAML_DEPTH` levels of nesting, only JSON-like
values (no dates, sets or binary), and numbers of at most `MAX_NUMBER_CHARS` characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from smallscale.errors import UserError

C = TypeVar("C", bound=BaseModel)

MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # counted with every alias expanded: what the loaded data will hold
MAX_YAML_DEPTH = 64
MAX_NUMBER_CHARS = 100  # PyYAML's base-60 integers (1:2:3) cost quadratic time in their length
MAX_KEY_PARTS = 16  # `a.b.c=...` overrides and dotted study keys


class Strict(BaseModel):
    """Base for every config section: unknown keys and type mismatches are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------- reading YAML
_TAG = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}


class _Refused(Exception):
    """A YAML document over one of the bounds; the message completes "<source> ..."."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_YAML_DEPTH levels (PyYAML's composer recurses)
    and reads unquoted dates as text (no config value is a date)."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, Any]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TAG + "timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(f"nests more than {MAX_YAML_DEPTH} levels deep (line {line})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_bounds(root: yaml.Node) -> None:
    """Refuse a composed document whose expansion would exceed MAX_YAML_NODES nodes or
    MAX_YAML_DEPTH levels, that refers to itself, or holds a non-JSON value.

    An anchored node reused by aliases is one object here but a copy per use once a config is
    merged and validated, so sizes are counted expanded: each node's size (and height) is computed
    once (post-order, memoised by identity), which keeps the check linear in the file size."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_nodes: set[int] = set()  # the ancestors of the node being visited: meeting one is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise _Refused(f"expands to more than {MAX_YAML_NODES:,} values (through its aliases, line {node.start_mark.line + 1})")
            if height[key] > MAX_YAML_DEPTH:
                raise _Refused(f"nests more than {MAX_YAML_DEPTH} levels deep through its aliases (line {node.start_mark.line + 1})")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise _Refused(f"has an alias inside its own anchor (line {node.start_mark.line + 1})")
        if node.tag not in _ALLOWED_TAGS:
            raise _Refused(f"uses the tag {node.tag!r} (line {node.start_mark.line + 1}); configs hold only text, numbers, booleans, lists and mappings")
        if node.tag in (_TAG + "int", _TAG + "float") and len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(f"has a number of more than {MAX_NUMBER_CHARS} characters (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def load_yaml_text(text: str, source: str) -> Any:
    """Parse one YAML document within the module's bounds; any problem is a UserError that
    starts with `source` (e.g. "config file 'run.yaml'")."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{source} is longer than {MAX_YAML_BYTES:,} characters; configs are small text files")
    try:
        return _load_bounded(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    except _Refused as exc:
        raise UserError(f"{source} {exc}") from None
    except (ValueError, IndexError, KeyError, OverflowError, RecursionError) as exc:
        # PyYAML's own constructors fail so on explicit tags it cannot apply: `!!int ""`, `!!bool maybe`
        raise UserError(f"{source} holds a value that cannot be read ({type(exc).__name__}: {exc})") from None


def _load_bounded(text: str) -> Any:
    loader = _BoundedLoader(text)  # reads the text at once: a control character is a YAMLError here
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_bounds(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)  # never more than the bound, whatever the file's size
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(f"config file {str(path)!r} is larger than {MAX_YAML_BYTES:,} bytes; configs are small text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    data = load_yaml_text(text, f"config file {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


# ----------------------------------------------------------------------------- overrides and merging
def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "model.preset=cpu-2m"]` -> nested dict; values are parsed as YAML scalars
    (or flow lists and mappings), within the same bounds as config files."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        parts = key.split(".")
        if "" in parts or len(parts) > MAX_KEY_PARTS:
            raise UserError(f"override {item!r}: the key must be dotted names such as optim.lr (at most {MAX_KEY_PARTS} parts)")
        value = load_yaml_text(raw, f"override {key!r}") if raw != "" else ""
        node = nested
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


# ----------------------------------------------------------------------------- validation
MAX_ERRORS_READ = 100
# Errors that mean "the input is not of this type", as opposed to "of this type, but wrong".
_TYPE_ERRORS = {"bool_parsing", "int_parsing", "float_parsing", "int_from_float", "literal_error", "enum", "none_required"}


@dataclass
class _Issue:
    """One pydantic error, its location split into the user's keys and pydantic's union tags."""

    path: tuple[Any, ...]  # keys and indices into the user's data
    unions: list[tuple[tuple[Any, ...], int, str]]  # (path at the union, nesting, member tag)
    of_key: bool  # the error is about a mapping key, not its value
    type: str
    msg: str
    input: Any

    def mismatch_at(self, path: tuple[Any, ...]) -> bool:
        return self.path == path and (self.type.endswith("_type") or self.type in _TYPE_ERRORS)


def _issue(err: dict[str, Any], data: Any) -> _Issue:
    """Walk the error's location through the data: a part the data has is a key (or index); one it
    does not have is a union member tag ('str', 'EvalSpec', "literal['auto']", ...), except the last
    part of a 'missing' error, which names the missing key."""
    node, path, unions, of_key = data, [], [], False
    loc = err["loc"]
    for i, part in enumerate(loc):
        child = _child(node, part)
        if child is not _ABSENT:
            path.append(part)
            node = child[0]
        elif part == "[key]":
            of_key = True
        elif i == len(loc) - 1 and err["type"] == "missing":
            path.append(part)
        else:
            nesting = sum(1 for p, _, _ in unions if p == tuple(path))
            unions.append((tuple(path), nesting, str(part)))
    return _Issue(tuple(path), unions, of_key, err["type"], err["msg"], err.get("input"))


_ABSENT = object()


def _child(node: Any, part: Any) -> Any:
    """(value,) of `node[part]` as the user wrote it, or _ABSENT (pydantic writes odd keys as text)."""
    if isinstance(node, dict):
        if part in node:
            return (node[part],)
        return next(((v,) for k, v in node.items() if str(k) == str(part)), _ABSENT)
    if isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
        return (node[part],)
    return _ABSENT


def _relevant(issues: list[_Issue]) -> list[_Issue]:
    """Keep, for every union, only the errors of the members the input's type matched (a mapping
    given to `str | EvalSpec` is judged as an EvalSpec); if no member matched, keep them all."""
    matched: dict[tuple[tuple[Any, ...], int], set[str]] = {}
    for issue in issues:
        for path, nesting, tag in issue.unions:
            if not issue.mismatch_at(path):
                matched.setdefault((path, nesting), set()).add(tag)
    return [i for i in issues if all(tag in matched.get((p, n), {tag}) for p, n, tag in i.unions)]


def _message(issue: _Issue, issues: list[_Issue]) -> str:
    """pydantic's message; for a value no union member accepted, all the members' wants in one."""
    msgs = [issue.msg]
    if issue.unions and issue.mismatch_at(issue.unions[-1][0]):
        msgs = list(dict.fromkeys(i.msg for i in issues if i.path == issue.path and i.unions and i.of_key == issue.of_key))
    msgs = [m.removeprefix("Value error, ") for m in msgs]
    prefix = "Input should be "
    if len(msgs) > 1 and all(m.startswith(prefix) for m in msgs):
        wants = [m.removeprefix(prefix).split(", unable to")[0] for m in msgs]
        return prefix + ", ".join(wants[:-1]) + " or " + wants[-1]
    return "; ".join(msgs)


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate `data` as `cls`; on failure raise one UserError naming the first bad key.

    The key is the user's (`evals.0.limit`), never pydantic's union tags (`evals.0.EvalSpec.limit`),
    and a bad value given is reported before a key left out."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        # The first bad key is among the first errors, and a union's members report side by side;
        # the rest could be 100,000 (a long list of bad values) and each costs a walk.
        issues = _relevant([_issue(err, data) for err in exc.errors()[:MAX_ERRORS_READ]])
        assert issues, "every pydantic error survives for at least one union member"
        issue = next((i for i in issues if i.type != "missing"), issues[0])
        key = ".".join(str(p) for p in issue.path) or "(top level)"
        if issue.type == "extra_forbidden":
            msg = f"{source}: unknown key {_shown(key)}; check its spelling against the documented options"
        else:
            shown = "" if isinstance(issue.input, dict) else f" (got {_shown(issue.input)})"
            what = "key" if issue.of_key else "value for"
            msg = f"{source}: invalid {what} {_shown(key)}{shown}: {_message(issue, issues)}"
        raise UserError(msg.replace("\n", " ")) from None


def _shown(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML (optional), apply `key=value` overrides, validate as `cls`."""
    data = read_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what a run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

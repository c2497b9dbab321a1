"""Every key of a settings dataclass with its default, type and meaning, for `sere config --list`.

The meanings are the comments written next to each field in the dataclass's source (one source
of truth: `src/sere/config.py`): a comment at the end of the field's line, and/or a block of
whole-line comments directly above it. A field without either has no meaning, which
tests/test_config_command.py refuses.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from sere.config import _yaml_key


@dataclass
class ConfigKey:
    """One leaf setting: its dotted key, default (as plain YAML data), type and meaning."""

    key: str  # e.g. "optim.lr"; `init.from`, not the field name `from_`
    default: Any
    type: str  # e.g. "float", "int | null", "one of 'cls', 'cls_avgpool'"
    meaning: str


def yaml_value(value: Any) -> str:
    """`value` as one line of YAML flow style, as an override would write it (`[0.4, 1.0]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def type_name(annotation: Any) -> str:
    """A short readable name of a field's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} {type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments next to it in `cls`'s source (block above, then end of line)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line -> comment text
    whole_line: set[int] = set()  # lines that hold only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                whole_line.add(line)
    (class_def,) = ast.parse(source).body
    found = {}
    for node in class_def.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in whole_line:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and n not in whole_line]
        found[node.target.id] = "; ".join(filter(None, (" ".join(above), " ".join(trailing))))
    return found


def config_keys(settings: Any, prefix: str = "") -> list[ConfigKey]:
    """Every leaf setting of a (nested) settings dataclass instance, in declaration order."""
    hints = typing.get_type_hints(type(settings))
    meanings = field_comments(type(settings))
    keys = []
    for f in dataclasses.fields(settings):
        key = f"{prefix}{_yaml_key(f.name)}"
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, prefix=f"{key}.")
            continue
        plain = list(value) if isinstance(value, tuple) else value
        keys.append(ConfigKey(key, plain, type_name(hints[f.name]), meanings.get(f.name, "")))
    return keys


def section_titles(settings: Any) -> dict[str, str]:
    """Section key -> the first line of its dataclass's docstring (`model` -> "The backbone...")."""
    titles = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            titles[_yaml_key(f.name)] = (inspect.getdoc(type(value)) or "").splitlines()[0]
    return titles


def listing(settings: Any) -> str:
    """The text of `sere config --list`: per section its title, then per key
    `key = default  (type)` and the meaning indented below it."""
    titles = section_titles(settings)
    lines: list[str] = []
    section = None
    for item in config_keys(settings):
        head = item.key.split(".")[0]
        if head != section:
            section = head
            lines += ([""] if lines else []) + [f"{head}: {titles.get(head, '')}".rstrip()]
        lines.append(f"  {item.key} = {yaml_value(item.default)}  ({item.type})")
        lines.append(f"      {item.meaning}")
    return "\n".join(lines)

"""Recipe mistakes in the user's words: RecipeError (what, and where: file, line, dotted key) and pydantic's
complaints translated into it. It knows no recipe key: it walks whatever pydantic dataclasses it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from typing import Annotated, Any, Literal, NoReturn

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

INTERNAL = ("source_file",)  # fields of the recipe that are not recipe keys (set by the loader)
# pydantic's range complaints: the name of the bound in their context and how to say it
_RANGES = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


class RecipeError(ValueError):
    """A recipe problem the user can fix: says where (file, key, line) and what to do."""

    def __init__(self, message: str, file: str | None = None, key: str | None = None,
                 line: int | None = None):
        self.file, self.key, self.line = file, key, line
        where = [f"{file}, line {line}" if file and line else file, key]
        super().__init__("".join(f"{part}: " for part in where if part) + message)



_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 80, 80


def short_repr(value: Any) -> str:
    """A rejected value as a message shows it: nested and long values are cut (`[1, 2, ...]`), so a value
    from a YAML bomb (aliases nested to billions of items) is described in microseconds, not forever."""
    text = _REPR.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."

def fail(key: str, message: str) -> NoReturn:
    """A check between keys of one section failed at `key` (of that section); `recipe_error` adds where."""
    raise PydanticCustomError("recipe", "{message}", {"key": key, "message": message})


def leaves(tp: Any) -> list[Any]:
    """The plain types a field annotation accepts (Annotated, unions and Literals unwrapped)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return leaves(args[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in args for leaf in leaves(arg)]
    if origin is Literal:
        return [type(arg) for arg in args]
    return [tp]


def where(key: str, file: str | None, origins: dict[str, tuple]) -> dict[str, Any]:
    origin_file, line = origins.get(key, (file, None))
    return {"file": origin_file, "key": key, "line": line}


def number_hint(value: Any) -> str:
    """YAML 1.1 reads 1e-3 (no dot) as text: say so next to the complaint."""
    try:
        return f" (YAML reads it as text: write {float(value):.1e})" if "e" in str(value).lower() else ""
    except ValueError:
        return ""


def _type_name(tp: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0], plural)
    if origin in (typing.Union, types.UnionType):
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return names + (" or null" if type(None) in args else "")
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0], plural=True)}"
    if origin is dict:
        return "a mapping"
    if plural:
        return {int: "integers", float: "numbers", bool: "true or false", str: "strings"}.get(tp, str(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def recipe_error(exc: ValidationError, root: type, data: dict[str, Any], file: str | None,
                 origins: dict[str, tuple]) -> RecipeError:
    """pydantic's first complaint about `data` (validated as the pydantic dataclass `root`) as a
    RecipeError: the dotted key, its file and line, and what was expected in words (a union type
    makes one complaint per member: they are read together)."""
    errors = exc.errors()
    first = errors[0]
    cls: Any = root
    path: list[str] = []
    annotation: Any = None
    value: Any = data
    for part in first["loc"]:  # sections down to the field; then list indexes and union members
        if part not in cls.__pydantic_fields__:
            path += [str(part)] if annotation is None else []  # an unknown key
            break
        path.append(str(part))
        annotation = cls.__pydantic_fields__[part].annotation
        value = value.get(part) if isinstance(value, dict) else None
        # a section, or an optional one (optim.sam: null or a mapping of its keys)
        sections = [leaf for leaf in leaves(annotation) if dataclasses.is_dataclass(leaf)]
        if not sections or not isinstance(value, dict):
            break
        cls, annotation = sections[0], None
    key = ".".join(path)
    kind = first["type"]
    if kind == "unexpected_keyword_argument":
        prefix = key.rpartition(".")[0] + "." if "." in key else ""
        fields = [name for name in cls.__pydantic_fields__ if name not in INTERNAL]
        close = difflib.get_close_matches(key, [prefix + name for name in fields], n=1, cutoff=0.5)
        hint = f", did you mean {close[0]}?" if close else f" (valid keys: {', '.join(fields)})"
        return RecipeError(f"unknown key{hint}", **where(key, file, origins))
    if kind == "recipe":
        key = ".".join(path + [first["ctx"]["key"]] if "key" in first["ctx"] else path)
        return RecipeError(first["ctx"]["message"], **where(key, file, origins))
    if kind in ("dataclass_type", "dataclass_args_type"):
        sections = [leaf for leaf in leaves(annotation) if dataclasses.is_dataclass(leaf)]
        if sections:  # name the keys it takes; an optional section may also be null
            keys = ", ".join(f.name for f in dataclasses.fields(sections[0]) if f.name not in INTERNAL)
            off = ", or null (off)" if type(None) in leaves(annotation) else ""
            return RecipeError(f"expected a mapping of its keys ({keys}), e.g. {{}} for the defaults{off}; got "
                               f"{short_repr(value)}", **where(key, file, origins))
        return RecipeError(f"expected a mapping of keys, got {type(value).__name__}", **where(key, file, origins))
    same = [e for e in errors if e["loc"][:len(path)] == first["loc"][:len(path)]]
    ranged = next((e for e in same if e["type"] in _RANGES), None)
    if ranged is not None:
        bound_name, op = _RANGES[ranged["type"]]
        bound, got = ranged["ctx"][bound_name], ranged["input"]
        got = float(got) if isinstance(bound, float) else got  # an integer given for a number reads as one
        return RecipeError(f"{got} is out of range: expected a value {op} {bound}", **where(key, file, origins))
    if kind == "literal_error" and len(same) == 1:
        choices = [str(arg) for arg in _literal_args(annotation)]
        close = difflib.get_close_matches(str(first["input"]), choices, n=1)
        hint = f", did you mean {close[0]}?" if close else ""
        return RecipeError(f"{short_repr(first['input'])} is not one of {', '.join(choices)}{hint}",
                           **where(key, file, origins))
    return RecipeError(f"expected {_type_name(annotation)}, got {short_repr(value)}{number_hint(value)}",
                       **where(key, file, origins))


def _literal_args(tp: Any) -> list[Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return list(args)
    # a list of choices (output.trackers) names the choices of its items
    return [a for arg in args for a in _literal_args(arg)] if origin in (typing.Union, types.UnionType, list) else []

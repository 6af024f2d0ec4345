"""Reading recipe files: YAML with the line of every key, `extends:` (paths, built-in recipes and parts
such as `data/digits`), dotted overrides. It knows no recipe key: config.py checks what this reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imgtrain.recipe_errors import RecipeError

BUILTIN_RECIPES = Path(__file__).parent / "configs"


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every key, for error messages."""


def _load_yaml_with_lines(text: str, file: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        # the context mark is where the broken construct starts (an unclosed bracket, say),
        # which is the line to fix; the problem mark can be the end of the file
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        context = getattr(exc, "context", None)
        what = f"{context}: {exc.problem}" if context else getattr(exc, "problem", str(exc))
        raise RecipeError(f"not valid YAML ({what})", file=file, line=line) from None
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    if node is not None:
        walk(node, "")
    data = (yaml.load(text, Loader=yaml.SafeLoader) if node is not None else None) or {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of sections (data:, model:, train: ...)", file=file)
    return data, lines


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes (`quickstart`) and of the parts to compose (`data/digits`)."""
    files = sorted(BUILTIN_RECIPES.glob("*.yaml")) + sorted(BUILTIN_RECIPES.glob("*/*.yaml"))
    return [path.relative_to(BUILTIN_RECIPES).with_suffix("").as_posix() for path in files]


def resolve_recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """A recipe path (`.yaml` optional when relative to a recipe), or the name of a built-in recipe
    (`quickstart`) or part (`data/fashion_mnist`): the recipe's folder first, then the built-ins."""
    path = Path(name)
    with_suffix = path if name.endswith((".yaml", ".yml")) else path.with_name(path.name + ".yaml")
    candidates = [relative_to / path, relative_to / with_suffix] if relative_to and not path.is_absolute() else []
    candidates.append(path)
    if not path.is_absolute():
        candidates.append(BUILTIN_RECIPES / with_suffix)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = builtin_recipes()
    recipes, parts = [n for n in names if "/" not in n], [n for n in names if "/" in n]
    raise RecipeError(f"recipe not found: {name} (built-in recipes: {', '.join(recipes)}; "
                      f"parts for extends: {', '.join(parts)})")


def read_recipe_file(path: Path, chain: tuple = ()) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Read a recipe and everything it extends; returns merged data and key -> (file, line)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise RecipeError(f"`extends:` makes a cycle: {cycle}", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe ({exc.strerror})", file=str(path)) from None
    data, lines = _load_yaml_with_lines(text, str(path))
    origins = {key: (str(path), line) for key, line in lines.items()}
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    merged: dict[str, Any] = {}
    merged_origins: dict[str, tuple] = {}
    for p in parent if isinstance(parent, list) else [parent]:  # later parents win, this file over all
        if not isinstance(p, str):
            raise RecipeError("`extends:` takes a recipe path or name (or a list of them)",
                              file=str(path), key="extends", line=lines.get("extends"))
        try:
            parent_path = resolve_recipe_path(p, relative_to=path.parent)
        except RecipeError as exc:
            raise RecipeError(str(exc), file=str(path), key="extends", line=lines.get("extends")) from None
        parent_data, parent_origins = read_recipe_file(parent_path, chain + (resolved,))
        merged = _deep_merge(merged, parent_data)
        merged_origins.update(parent_origins)
    merged_origins.update(origins)
    return _deep_merge(merged, data), merged_origins


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"override `{text}` must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise RecipeError(f"override `{text}` must name a section and a key, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_recipe(path: str | Path | None, overrides: list[str]) -> tuple[dict[str, Any], dict[str, tuple], str | None]:
    """A recipe file (None: no file) and what it extends, with the overrides applied: the data,
    key -> (file, line) (("command line", None) for an override) and the file's path."""
    data: dict[str, Any] = {}
    origins: dict[str, tuple] = {}
    file = None
    if path is not None:
        recipe_path = resolve_recipe_path(str(path))
        data, origins = read_recipe_file(recipe_path)
        file = str(recipe_path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        origins[key] = ("command line", None)
    return data, origins, file


def key_origin(recipe: Any, key: str) -> dict[str, Any]:
    """Where a loaded recipe's dotted `key` was written (RecipeError's file/key/line), for checks after
    loading: the recipe's file (or one it extends) when that holds the value, else "command line"."""
    where: dict[str, Any] = {"file": recipe.source_file, "key": key, "line": None}
    if recipe.source_file is None:
        return where
    where["file"] = "command line"
    data, origins = read_recipe_file(Path(recipe.source_file))
    written: Any = data
    actual: Any = recipe
    for part in key.split("."):
        written = written.get(part) if isinstance(written, dict) else None
        actual = getattr(actual, part)
    if key in origins and written == actual:  # 2 == 2.0: YAML's int where a float goes still matches
        where["file"], where["line"] = origins[key]
    return where



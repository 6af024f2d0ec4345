"""The README stays true: every recipe key is documented with its real default, and the
commands it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgtrain.config import Recipe, recipe_keys

README = Path(__file__).resolve().parents[1] / "README.md"


def _documented_defaults() -> dict[str, str]:
    """dotted key -> default as written, from every `| key | default | ... |` table row.

    Rows name a key in full (`mix.prob`) or, in the recipe reference, relative to the section
    named on the line before the table (`data.shapes`, then `| `num_classes` | ...`)."""
    found: dict[str, str] = {}
    section = ""
    for line in README.read_text().splitlines():
        heading = re.fullmatch(r"`([a-z_.]+)`", line.strip())
        if heading:
            section = heading.group(1)
            continue
        if line.startswith("#"):
            section = ""
        row = re.match(r"\|\s*`([a-z_.0-9]+)`\s*\|\s*`([^`]*)`\s*\|", line)
        if row:
            key, default = row.groups()
            if "." not in key and section:
                key = f"{section}.{key}"
            found[key] = default
    return found


def _yaml_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _same(documented: str, actual) -> bool:
    text = _yaml_text(actual)
    if documented == text:
        return True
    try:  # numbers written another way: 1e-8, 0.0005, 4/3 rounded
        numbers = [float(x) for x in re.findall(r"-?[\d.]+(?:e-?\d+)?", documented)]
        values = actual if isinstance(actual, list) else [actual]
        return len(numbers) == len(values) and all(abs(n - float(v)) <= 1e-3 * max(1.0, abs(float(v)))
                                                   for n, v in zip(numbers, values))
    except (TypeError, ValueError):
        return False


def _default(recipe: Recipe, key: str):
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_every_recipe_key_is_in_the_readme_with_its_default():
    documented = _documented_defaults()
    recipe = Recipe()
    missing = [key for key in recipe_keys() if key not in documented]
    assert not missing, f"recipe keys missing from the README's tables: {missing}"
    wrong = {key: (documented[key], _yaml_text(_default(recipe, key))) for key in recipe_keys()
             if not _same(documented[key], _default(recipe, key))}
    assert not wrong, f"README default differs from config.py (README, actual): {wrong}"
    unknown = [key for key in documented if key.split(".")[0] in {f.split(".")[0] for f in recipe_keys()}
               and key not in recipe_keys()]
    assert not unknown, f"README tables name keys that do not exist: {unknown}"


def test_the_readme_starts_with_the_install_and_test_commands_ci_runs():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0] == 'pip install -e . -c constraints.txt && imgtrain quickstart'
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands[1] == ci


@pytest.mark.parametrize("command", sorted(set(re.findall(r"`imgtrain ([a-z-]+)", README.read_text()))))
def test_every_subcommand_the_readme_names_exists(command):
    from imgtrain.cli import build_parser
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert command in subcommands


def test_the_recipes_section_lists_every_recipe_section():
    import dataclasses
    text = README.read_text(encoding="utf-8")
    sentence = text[text.index("A recipe is YAML with these sections:"):]
    sentence = sentence[:sentence.index("Everything has a default")]
    listed = re.findall(r"`([a-z_]+)`", sentence)
    sections = [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
    assert listed == sections

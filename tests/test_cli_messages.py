"""What the messages tell a user to type exists: every `imgtrain COMMAND` named in a message string
of the package or in the README is a subcommand, and every `section.key` named in a message is a
recipe key (or a section of them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from imgtrain.cli import build_parser
from imgtrain.config import recipe_keys

PACKAGE = Path(__file__).resolve().parents[1] / "imgtrain"
README = PACKAGE.parent / "README.md"

# words that follow "imgtrain " in prose, not commands
NOT_COMMANDS = {
    "run": "an imgtrain run (folder)",
    "metadata": "has no imgtrain metadata",
    "reads": "a format this imgtrain reads",
    "never": "imgtrain never unpickles",
    "or": "written by imgtrain or a .safetensors file",
}
# dotted words in messages that start like a recipe section but are not recipe keys
NOT_KEYS = {
    "model.state_dict": "PyTorch's Module.state_dict(), in a message about checkpoint containers",
}
FILE_SUFFIXES = ("png", "csv", "log", "json", "jsonl", "yaml", "yml", "safetensors", "pt", "pth", "html")


def _message_strings(path: Path) -> list[str]:
    """The string literals of a module, docstrings left out; an f-string's fields read as {}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)):
            skip.add(id(body[0].value))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
            skip.update(id(v) for v in node.values)
    texts += [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
              and isinstance(node.value, str) and id(node) not in skip]
    return texts


def _package_messages() -> list[tuple[str, str]]:
    return [(str(path.relative_to(PACKAGE.parent)), text) for path in sorted(PACKAGE.rglob("*.py"))
            for text in _message_strings(path)]


def _readme_commands() -> set[str]:
    """`imgtrain X` in inline code, and command lines in code blocks (at a line start, after $ or &&)."""
    text = README.read_text(encoding="utf-8")
    found = set(re.findall(r"`imgtrain ([a-z][a-z-]*)", text))
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        found |= set(re.findall(r"(?:^|\$ |&& )imgtrain ([a-z][a-z-]*)", block, re.M))
    return found


def _subcommands() -> set[str]:
    parser = build_parser()
    return set(next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices)


def test_the_collectors_find_what_they_should():
    """The regexes are not vacuous: known mentions are found."""
    package = {m for _, text in _package_messages() for m in re.findall(r"\bimgtrain ([a-z][a-z-]*)", text)}
    assert {"train", "scan", "doctor", "explain", "evaluate"} <= package
    assert {"quickstart", "train", "finetune", "scan", "evaluate", "predict"} <= _readme_commands()


def test_every_command_a_message_or_the_readme_names_exists():
    subcommands = _subcommands()
    named = {}
    for where, text in _package_messages():
        for command in re.findall(r"\bimgtrain ([a-z][a-z-]*)", text):
            if command not in NOT_COMMANDS:
                named.setdefault(command, where)
    for command in _readme_commands():
        named.setdefault(command, "README.md")
    missing = {command: where for command, where in named.items() if command not in subcommands}
    assert not missing, f"messages name commands the CLI does not have (command: file): {missing}"


def test_every_recipe_key_a_message_names_exists():
    keys = set(recipe_keys())
    sections = {key.rsplit(".", 1)[0] for key in keys}  # data, data.shapes ...
    tops = {key.split(".")[0] for key in keys}
    unknown = {}
    for where, text in _package_messages():
        for key in re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z_]+)+)\b", text):
            if (key.split(".")[0] in tops and key not in keys and key not in sections and key not in NOT_KEYS
                    and key.rsplit(".", 1)[1] not in FILE_SUFFIXES):
                unknown.setdefault(key, where)
    assert not unknown, f"messages name recipe keys that do not exist (key: file): {unknown}"
    assert "data.on_bad_image" in {k for _, t in _package_messages() for k in re.findall(r"data\.[a-z_]+", t)}


@pytest.mark.parametrize("command", sorted(NOT_COMMANDS))
def test_exceptions_are_still_needed(command):
    """An exception that no message uses any more goes."""
    assert any(f"imgtrain {command}" in text for _, text in _package_messages()), command

"""The search space grammar of a recipe's `search.params` (`imgtrain tune`): the words of Hydra's Optuna
sweeper, so a value reads the same to someone who knows it.

    optim.lr: tag(log, interval(1e-4, 1e-1))      # a number, sampled on a log scale
    model.drop_rate: interval(0, 0.5)             # a number in [0, 0.5]
    augment.magnitude: int(interval(5, 15))       # a whole number in [5, 15]
    data.batch_size: choice(64, 128, 256)         # one of these values (numbers, words, true/false/null)
    train.epochs: range(2, 10, 2)                 # 2, 4, 6, 8: Python's range, the stop left out

An expression is parsed as a Python call expression (never evaluated): only these five words and plain
values are accepted. The result is a neutral description (SearchParam) that tuning.py turns into an
Optuna distribution, so this module stays at the recipe's layer and needs no Optuna.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

GRAMMAR = ("choice(a, b, ...), interval(low, high), int(interval(low, high)), tag(log, interval(low, high)), "
           "range(start, stop[, step])")


@dataclass(frozen=True)
class SearchParam:
    """One searched recipe key: `kind` float or int (low..high, both included; `step` a grid, `log` a log
    scale) or choice (`choices`)."""
    kind: str                       # "float" | "int" | "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        """Whether `value` (a recipe's own value) is a point of this space."""
        if self.kind == "choice":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is not None:
            steps = (value - self.low) / self.step
            return abs(steps - round(steps)) < 1e-9
        return True

    def grid(self) -> list[Any] | None:
        """Every point of the space when it is finite (choice, range, int interval), else None."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is not None:
            count = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(count + 1)]
        return None

    def bounds(self) -> list[Any]:
        """The space's extreme points: a recipe is checked with each before the first trial runs."""
        return list(self.choices) if self.kind == "choice" else [self._typed(self.low), self._typed(self.high)]

    def _typed(self, value: float) -> Any:
        return int(value) if self.kind == "int" else float(value)


class SearchSpaceError(ValueError):
    """A search expression that does not follow the grammar; the message says what and how to write it."""


def parse_search_param(text: Any) -> SearchParam:
    """`tag(log, interval(1e-4, 0.1))` -> SearchParam; raises SearchSpaceError with the reason."""
    if not isinstance(text, str):
        raise SearchSpaceError(f"expected a search expression as text, got {text!r}; write one of {GRAMMAR}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise SearchSpaceError(f"{text!r} is not a search expression; write one of {GRAMMAR}") from None
    return _expression(tree, text)


def _call(node: ast.expr, text: str) -> tuple[str, list[ast.expr]]:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.keywords:
        raise SearchSpaceError(f"{text!r}: expected one of {GRAMMAR}")
    return node.func.id, node.args


def _expression(node: ast.expr, text: str, log: bool = False, integer: bool = False) -> SearchParam:
    name, args = _call(node, text)
    if name == "tag":
        if len(args) != 2 or _word(args[0]) != "log":
            raise SearchSpaceError(f"{text!r}: tag takes the tag `log` and an interval, e.g. "
                                   "tag(log, interval(1e-4, 1e-1))")
        return _expression(args[1], text, log=True, integer=integer)
    if name == "int":
        if len(args) != 1:
            raise SearchSpaceError(f"{text!r}: int takes one interval, e.g. int(interval(5, 15))")
        return _expression(args[0], text, log=log, integer=True)
    if name == "interval":
        if len(args) != 2:
            raise SearchSpaceError(f"{text!r}: interval takes two numbers, low and high, e.g. interval(0, 0.5)")
        low, high = (_number(arg, text) for arg in args)
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise SearchSpaceError(f"{text!r}: int(interval(low, high)) needs whole numbers, got {low} and {high}")
        return _bounded("int" if integer else "float", low, high, log, None, text)
    if name == "range":
        if log or integer:
            raise SearchSpaceError(f"{text!r}: range is already a grid: write it without tag(log, ...) or int(...)")
        if len(args) not in (2, 3):
            raise SearchSpaceError(f"{text!r}: range takes start, stop and an optional step, e.g. range(2, 10, 2)")
        start, stop, *rest = (_number(arg, text) for arg in args)
        step = rest[0] if rest else 1
        if step <= 0:
            raise SearchSpaceError(f"{text!r}: the step must be > 0, got {step}")
        count = math.ceil((stop - start) / step - 1e-9)  # Python's range: stop itself is left out
        if count < 1:
            raise SearchSpaceError(f"{text!r}: the range is empty (stop {stop} is not above start {start})")
        whole = all(isinstance(v, int) for v in (start, stop, step))
        return _bounded("int" if whole else "float", start, start + (count - 1) * step, False, step, text)
    if name == "choice":
        if not args:
            raise SearchSpaceError(f"{text!r}: choice needs at least one value, e.g. choice(64, 128, 256)")
        values = tuple(_value(arg, text) for arg in args)
        if len(set(map(repr, values))) != len(values):
            raise SearchSpaceError(f"{text!r}: a value appears twice")
        return SearchParam("choice", choices=values)
    raise SearchSpaceError(f"{text!r}: unknown word {name!r}; expected one of {GRAMMAR}")


def _bounded(kind: str, low: float, high: float, log: bool, step: float | None, text: str) -> SearchParam:
    if low > high:
        raise SearchSpaceError(f"{text!r}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise SearchSpaceError(f"{text!r}: a log scale needs low > 0, got {low}")
    return SearchParam(kind, low=low, high=high, log=log, step=step)


def _word(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def _number(node: ast.expr, text: str) -> int | float:
    value = _value(node, text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchSpaceError(f"{text!r}: expected a number, got {value!r}")
    return value


def _value(node: ast.expr, text: str) -> Any:
    """A plain value: a number (a leading minus too), a quoted or bare word, true/false/null."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return node.value
    word = _word(node)
    if word is not None:
        return {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}.get(word, word)
    raise SearchSpaceError(f"{text!r}: {ast.unparse(node)!r} is not a plain value (a number, a word, "
                           "true/false or null)")

"""The one error type of the data package: a problem with the user's data they can fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class DataError(ValueError):
    """Bad or missing data: the message says what is wrong, where, and what to do."""


def format_list(items: Sequence[str], limit: int = 20, indent: str = "  ") -> str:
    """One item a line, cut after `limit` with "... and N more" so a huge list stays readable."""
    lines = [f"{indent}{item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"{indent}... and {len(items) - limit} more")
    return "\n".join(lines)


def format_bad_files(bad: Iterable[tuple[str, str]], limit: int = 20) -> str:
    """`path: reason` lines for a list of (path, reason) pairs, capped like `format_list`."""
    return format_list([f"{path}: {reason}" for path, reason in bad], limit=limit)

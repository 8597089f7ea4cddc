"""Markdown tables: the one place their rows are written (reports, sweep tables, leave-one-task-out)."""

from __future__ import annotations

from typing import Iterable


def row(cells: Iterable[str]) -> str:
    """``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def head(header: Iterable[str]) -> list[str]:
    """The header row and its ``|---|---|`` rule."""
    header = list(header)
    return [row(header), "|" + "|".join("---" for _ in header) + "|"]


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    """A whole table, one line a row."""
    return head(header) + [row(r) for r in rows]

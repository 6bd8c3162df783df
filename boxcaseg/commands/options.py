"""What the commands share: how a command is registered and its docstring becomes its help."""

from __future__ import annotations

import inspect
from typing import Callable

import typer

# ---------------------------------------------------------------- help layout

def prose(doc: str | None) -> str:
    """A docstring as command help: each paragraph on one line, for the terminal to wrap.

    Docstrings are wrapped to fit the source; left as they are, the terminal wraps those
    lines again at its own width and a sentence breaks in the middle. A paragraph that
    starts with ``\\b`` keeps its line breaks (a list, a block of commands).
    """
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(p.lstrip("\b").strip("\n") if p.startswith("\b") else " ".join(p.split())
                       for p in paragraphs)


def add_command(app: typer.Typer, name: str, fn: Callable) -> None:
    """Register ``fn`` as command ``name`` of ``app``, its docstring as its help."""
    app.command(name, help=prose(fn.__doc__))(fn)


def command_group(app: typer.Typer, name: str, help: str, commands: dict[str, Callable]) -> None:
    """Add the group ``name`` (``boxcaseg NAME SUB``) with ``commands`` (sub-command name -> function)."""
    group = typer.Typer(help=help, no_args_is_help=True)
    for sub, fn in commands.items():
        add_command(group, sub, fn)
    app.add_typer(group, name=name)

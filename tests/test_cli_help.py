"""Every command's ``--help`` reads well in an 80-column terminal.

A help paragraph is written for the terminal to wrap: no rendered line is wider than 80
columns, and no line is broken before the terminal needed to break it (a hard newline from
a docstring wrapped at another width leaves a short line ending mid-sentence, then the
sentence going on below: "sigmoid at" / "the end. Input ...").
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from boxcaseg.cli import app

WIDTH = 80
END_OF_LINE = tuple(".:;!?)")  # a line may end there and the next start anew


def _command_paths(cmd, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The argv prefix of every command and group: (), ("segment",), ("config", "list"), ..."""
    paths = [path]
    for name, sub in getattr(cmd, "commands", {}).items():  # a group (typer's own click)
        if not sub.hidden:
            paths += _command_paths(sub, path + (name,))
    return paths


ROOT = typer.main.get_command(app)
COMMANDS = _command_paths(ROOT)


def _help(path: tuple[str, ...]) -> str:
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)})
    assert res.exit_code == 0, res.output
    return res.output


def _description(text: str) -> list[str]:
    """The help's prose: the lines between the usage line and the first panel (╭)."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("Usage:")) + 1
    end = next((i for i, l in enumerate(lines) if l.lstrip().startswith("╭")), len(lines))
    return [l.rstrip() for l in lines[start:end]]


def _cells(text: str) -> list[tuple[int, list[str]]]:
    """The help cells of every panel (options, arguments, commands): (the help column's width,
    each entry's lines of help text). The help column starts where continuation lines start."""
    cells: list[tuple[int, list[str]]] = []
    for panel in re.findall(r"╭[^\n]*\n(.*?)\n\s*╰", text, flags=re.S):
        rows = [r.rstrip().rstrip("│").rstrip() for r in panel.splitlines() if r.lstrip().startswith("│")]
        rows = [r[r.index("│") + 1:] for r in rows]
        indents = [len(r) - len(r.lstrip()) for r in rows if r.strip()]
        deep = [i for i in indents if i > min(indents) + 3]  # deeper than the entries' first lines
        if not deep:  # no entry wraps
            continue
        col = max(set(deep), key=deep.count)
        for r in rows:
            if r[:col].strip():  # a new entry
                cells.append((WIDTH - 2 - col, []))
            if cells and r[col:].strip():
                cells[-1][1].append(r[col:].rstrip())
    return cells


def hard_breaks(prose: list[str], width: int = WIDTH) -> list[tuple[str, str]]:
    """(line, next line) pairs of one paragraph where the line stops short for no reason: the
    next line's first word would have fitted (with room to spare) and the line does not end
    a sentence or a clause."""
    bad = []
    for a, b in zip(prose, prose[1:]):
        if not a.strip() or not b.strip():
            continue  # a paragraph ends
        if b.lstrip().startswith("["):
            continue  # typer's [default: ...] / [required] markers go on a line of their own
        first_word = b.split()[0]
        fits = len(a.strip()) + 1 + len(first_word) <= width - 4  # with room for rich's padding
        if fits and not a.endswith(END_OF_LINE):
            bad.append((a.strip(), b.strip()))
    return bad


def test_every_command_is_checked():
    names = {" ".join(p) for p in COMMANDS}
    for expected in ("segment", "proxy", "train", "export", "evaluate masks", "maskrcnn predict", "data yolo-to-coco",
                     "config show", "model pack", "visualize", "demo"):
        assert expected in names


def test_the_check_sees_a_docstring_wrapped_at_another_width():
    old = [" Weak head dropped, transferred weights baked in, BN folded, alpha applied,",
           " sigmoid at",
           " the end. Input [B, 3, S, S] float32 RGB 0..255 (S = the checkpoint's"]
    assert hard_breaks(old) == [("sigmoid at", "the end. Input [B, 3, S, S] float32 RGB 0..255 (S = the checkpoint's")]
    wrapped = [" Weak head dropped, transferred weights baked in, BN folded, alpha applied,",
               " sigmoid at the end. Input [B, 3, S, S] float32 RGB 0..255 (S = the",
               " checkpoint's model.infer_size, dynamic B)."]
    assert hard_breaks(wrapped) == []


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "boxcaseg")
def test_help_fits_80_columns_and_breaks_only_where_it_must(path):
    text = _help(path)
    too_wide = [l for l in text.splitlines() if len(l.rstrip()) > WIDTH]
    assert not too_wide, f"lines over {WIDTH} columns: {too_wide}"
    prose = _description(text)
    assert any(re.search(r"\w", l) for l in prose), "no description"
    assert not hard_breaks(prose), f"paragraph broken mid-sentence: {hard_breaks(prose)}"
    for width, cell in _cells(text):  # a panel's help column is narrower than the terminal
        assert not hard_breaks(cell, width), f"help cell broken mid-sentence: {cell}"


def test_square_brackets_in_help_are_shown():
    """Help text is rich markup: a literal [model] must not be taken for a style and vanish."""
    assert "[model]" in _help(("train",))


def test_segment_and_proxy_declare_their_inference_options_once():
    """The same spelling, default and help in both commands (commands/options.py)."""
    def options(name: str) -> dict:
        return {tuple(p.opts + p.secondary_opts): (p.help, p.default) for p in ROOT.commands[name].params}

    segment, proxy = options("segment"), options("proxy")
    inference = [("--model",), ("--engine",), ("--context",), ("--threshold",), ("--prior-weight",),
                 ("--merge", "--no-merge"), ("--drop-thresh",), ("--drop-slack",), ("--device",), ("--precision",)]
    for opt in inference:
        assert segment[opt] == proxy[opt], opt

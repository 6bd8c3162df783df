"""The one exception type for errors a user can cause.

Its message names the file, image id or annotation id at fault. The CLI prints it on
one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class BoxcasegError(Exception):
    """A user-caused error (bad path, corrupt image, malformed annotation ...)."""

    def one_line(self) -> str:
        return " ".join(str(self).split())


class Interrupted(Exception):
    """Ctrl-C during a command, carried past typer (which turns a KeyboardInterrupt into a
    silent exit): its message says where the run stopped and how to go on; the CLI prints
    it in one line and exits with status 130."""


def one_line_from_worker(exc: BaseException) -> str:
    """Extract the one-line message of a BoxcasegError re-raised by a DataLoader worker.

    torch re-raises worker exceptions with the worker traceback folded into the message;
    its last line is ``boxcaseg.errors.BoxcasegError: <message>``.
    """
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else ""
    prefix = "BoxcasegError: "
    if prefix in last:
        return last.split(prefix, 1)[1].strip()
    return " ".join(text.split())

"""How both command-line tools talk to their terminal. When standard output fails they end as Unix tools end: a
reader that closed the pipe (``| head``) ends the command quietly; a full or broken output (``> /dev/full``) is one
line on standard error, never a traceback, and never blamed on the files the command reads or writes. Any path the
OS gives can be printed."""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

import click

#: The exit status of a command whose reader went away: what a shell reports for a process ended by SIGPIPE.
CLOSED_PIPE_STATUS = 128 + signal.SIGPIPE


#: What a failed write raises; any other OSError is not standard output's.
_WRITE_ERRORS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def standard_output_failed(error: OSError) -> bool:
    """Whether ``error`` came from writing standard output: a write error, while standard output fails a write now
    too (a newline probe: Python drops the bytes of a failed write, so only a new write can tell; files are never
    written this way, their write errors are ``OutputError``s)."""
    if error.errno not in _WRITE_ERRORS:
        return False
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
    except OSError:
        return True
    return False


def _silence_standard_output() -> None:
    """Standard output onto /dev/null, so that Python's flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class Commands(click.Group):
    """A click group whose commands end as Unix tools do when standard output fails, and print any path the OS
    gives (a name that is not UTF-8 is shown with backslash escapes, never a UnicodeEncodeError)."""

    def invoke(self, ctx: click.Context) -> Any:
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return super().invoke(ctx)
        except OSError as error:
            if not standard_output_failed(error):
                raise
            _silence_standard_output()
            if error.errno == errno.EPIPE:
                sys.exit(CLOSED_PIPE_STATUS)
            click.echo(f"Error: standard output could not be written ({error.strerror or error}); what the "
                       "command printed is lost; files are written whole or not at all", err=True)
            sys.exit(1)

"""What both command-line tools share (``smartmi-agent``, ``smartmi-sim``): a global
option that may come before or after the verb, and a quiet end when the reader of
the output goes away."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def anywhere(flag: str, *, help: str) -> argparse.ArgumentParser:  # argparse's name
    """A parent parser with a global option, for every verb's parser: the option may
    come before or after the verb. Its default is left to the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(flag, default=argparse.SUPPRESS, help=help)
    return common


def quiet_pipe() -> int:
    """The reader of our output went away (``| head``): stop without a traceback, as
    the shell's own tools do, and say so by the exit status."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it

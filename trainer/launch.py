"""The ``brats-train`` command as installed: load the trainer, and say in one line why it could not be loaded (torch
needs memory to load: under a memory cap, ``import torch`` itself fails) instead of a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from trainer.cli import main as commands
    except (ImportError, MemoryError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        sys.exit(f"Error: brats-train could not start: loading torch failed ({reason}). Under a memory limit "
                 "(ulimit -v, a container's cap) allow at least 4 GB; otherwise reinstall: pip install "
                 "'brats2d[trainer]'")
    commands()

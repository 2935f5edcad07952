"""Processes on this machine, by pid: whether one lives (the owner of a partial file or a run's lock), and the tree
below this one (a build's workers). Standard library only: the trainer uses it too."""

from __future__ import annotations

import os
import signal


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def kill_descendants() -> None:
    """SIGKILL every process below this one (joblib's loky workers, a local Dask cluster), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

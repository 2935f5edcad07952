"""A run folder: made without races, held by one live ``fit`` at a time, and read back (its configuration, what a
resume continues from).

- ``new_run_dir``: one ``mkdir`` that fails when the folder exists, so two runs started together with the same
  ``--out`` and ``--name`` get two folders (a check-then-create would give them one).
- ``held``: a lock file with the process id; a second ``fit --resume`` of a folder in use is refused, a lock left by
  a process that died is taken over.
- ``read_config``: a saved ``config.json``, checked (a brats2d run configuration, a version this trainer reads,
  every field by type and range).
- ``resume_point``: what ``--resume`` continues from: the resume state, or (a run killed before its first
  checkpoint) the run's configuration alone, from the start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from builder.processes import process_alive
from trainer.config import CONFIG_VERSION, FitConfig
from trainer.errors import CommandError, OutputError

CONFIG_FILE = "config.json"
LOCK_FILE = ".fit.lock"


def new_run_dir(out: Path, prefix: str) -> Path:
    """A new, empty folder ``<out>/<prefix>-<time>`` (``-1``, ``-2``... when taken), created atomically."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            candidate = out / f"{prefix}-{stamp}{f'-{n}' if n else ''}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
    except OSError as error:
        raise OutputError(f"{out}: the run folder could not be created ({error.strerror or error}): choose a writable "
                          "--out") from None
    raise OutputError(f"{out}: 10,000 runs named {prefix}-{stamp} already; choose another --name")


@contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process while the block runs (a lock file with the pid)."""
    lock = run_dir / LOCK_FILE
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and owner != os.getpid() and process_alive(owner):
                raise CommandError(f"{run_dir}: in use by a live fit (process {owner}); wait for it to end or stop it, "
                               "then resume") from None
            lock.unlink(missing_ok=True)  # left by a process that died: take it over
            continue
        except OSError as error:
            raise OutputError(f"{lock}: could not be written ({error.strerror or error}); choose a writable folder"
                              ) from None
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        break
    else:
        raise CommandError(f"{run_dir}: its lock {lock.name} keeps coming back; is another fit starting on it?")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _owner(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_config(path: Path) -> dict[str, Any]:
    """The saved options of a run (its config.json), checked; CommandError in one line when they are not usable."""
    try:
        values = json.loads(path.read_text())
    except OSError as error:
        raise CommandError(f"{path}: cannot be read ({error.strerror or error})") from None
    except ValueError:
        raise CommandError(f"{path}: not JSON; give a run's config.json") from None
    if not isinstance(values, dict) or "modality" not in values or "artifact" not in values:
        raise CommandError(f"{path}: not a brats2d run configuration; give the config.json of a run folder")
    version = values.get("config_version", 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise CommandError(f"{path}: a run configuration of version {str(version)[:20]}, this brats2d reads versions 1 to "
                       f"{CONFIG_VERSION}; use the brats2d that wrote it, or start the run anew")
    try:
        FitConfig.from_dict(values, str(path))
    except ValueError as error:
        raise CommandError(str(error)) from None
    return values


def resume_point(run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """What ``--resume run_dir`` continues from: (saved options, its last.pt), or (options, None) for a run killed
    before its first checkpoint, which then starts again from its first epoch in the same folder."""
    from trainer.training.model import read_checkpoint

    if not run_dir.is_dir():
        raise CommandError(f"{run_dir}: no such run folder")
    state = run_dir / "last.pt"
    if state.is_file():
        return read_checkpoint(state, resume=True)["config"], state
    if (run_dir / "best.pt").is_file():
        raise CommandError(f"{run_dir}: this run finished and kept no resume state (last.pt); runs trained with "
                       f"--keep-last can be extended; train a new one with its options: brats-train fit --config "
                       f"{run_dir / CONFIG_FILE}")
    if (run_dir / CONFIG_FILE).is_file():
        return read_config(run_dir / CONFIG_FILE), None
    raise CommandError(f"{run_dir}: nothing to resume (no config.json, no checkpoint): the run died before it started; "
                   f"delete {run_dir} and start it again")

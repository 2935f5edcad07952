"""Outputs written whole or not at all: a killed or failed run never leaves a half-written table, checkpoint or
mask, and a failed write (full disk, read-only folder) is one line naming the output, not the input."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.errors import OutputError


@contextmanager
def atomic_outputs(*paths: Path, suffixes: Sequence[str] = ()) -> Iterator[list[Path]]:
    """Yield a hidden partial path for each of ``paths`` to write; they replace ``paths`` only when the block ends
    without error (every write done before the first rename, so a full disk leaves neither), and are removed
    otherwise. A partial's name is this writer's own (pid and a random part) and short whatever the output is called
    (``.partial-<pid>-<hex>`` and its suffix, by default the output's own last one, which some writers need: an
    output name near the file system's 255 bytes still has room for its partial): two writers of one output never
    touch each other's partial, and the last complete write wins whole. OSErrors (no space, read-only, permissions)
    become OutputError naming the outputs."""
    for path in paths:
        if path.is_dir():  # a rename onto it would fail after the others were made
            raise OutputError(f"{path}: is a folder; remove it or write the output elsewhere")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    partials = [path.with_name(f".partial-{token}-{i}{suffix or path.suffix}")
                for i, (path, suffix) in enumerate(zip(paths, [*suffixes, *[""] * len(paths)]))]
    try:
        yield partials
        for partial, path in zip(partials, paths):
            os.replace(partial, path)
    except OSError as error:
        names = " and ".join(str(path) for path in paths)
        raise OutputError(f"{names}: could not be written ({error.strerror or error}); nothing partial was left: "
                          "free some space or choose a writable folder") from None
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: Path, suffix: str = "") -> Iterator[Path]:
    """``atomic_outputs`` of one output."""
    with atomic_outputs(path, suffixes=(suffix,)) as (partial,):
        yield partial


def write_text(path: Path, text: str) -> None:
    """UTF-8, a path's bytes that are not UTF-8 written back as the OS gave them (surrogate escapes)."""
    with atomic_output(path) as partial:
        partial.write_text(text, encoding="utf-8", errors="surrogateescape")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV; the columns are every key in order of first appearance."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def strict(value: Any) -> Any:
    """``value`` with every NaN and infinity as None (JSON's null): strict readers (jq, JavaScript) refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return strict(value.item())
    return value


def json_text(value: Any) -> str:
    """Strict JSON (no NaN or Infinity: null, with the reason beside it where the writer knows one)."""
    return json.dumps(strict(value), indent=2, allow_nan=False, default=str)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json_text(value))


class BackgroundWriter:
    """Writes outputs (checkpoints, plots) on one background thread, in order, while training goes on: on a GPU an
    epoch can take about as long as writing a checkpoint. At most one write is in flight; a failed write is
    raised (e.g. as OutputError) at the next ``submit`` or at ``wait``. As a context manager it finishes the last
    write on leaving, and lets an error already on its way out win over the write's."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brats2d-writer")
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(write, *args)

    def wait(self) -> None:
        """Block until the last write is done; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failing=kind is not None)

    def close(self, failing: bool = False) -> None:
        """Finish the last write; when the caller is already ``failing``, its error matters more than the write's."""
        try:
            self.wait()
        except Exception:
            if not failing:
                raise
        finally:
            self._pool.shutdown(wait=True)

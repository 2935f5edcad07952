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
def atomic_output(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden partial path to write; it replaces ``path`` only when the block ends without error, and is
    removed otherwise. The partial's name is this writer's own (pid and a random part) and short whatever the
    output is called (``.partial-<pid>-<hex>`` and ``suffix``, by default the output's own last one, which some
    writers need: an output name near the file system's 255 bytes still has room for its partial): two writers of
    one output never touch each other's partial, and the last complete write wins whole. OSErrors (no space,
    read-only, permissions) become OutputError naming the output."""
    partial = path.with_name(f".partial-{os.getpid()}-{secrets.token_hex(4)}{suffix or path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    except OSError as error:
        raise OutputError(f"{path}: could not be written ({error.strerror or error}); nothing partial was left: "
                          "free some space or choose a writable folder") from None
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_output(path) as partial:
        partial.write_text(text)


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


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (no NaN or Infinity: null, with the reason beside it where the writer knows one)."""
    write_text(path, json.dumps(strict(value), indent=2, allow_nan=False, default=str))


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

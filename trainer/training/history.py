"""What a run says and records as it goes: RUN/log.txt (every line a run prints, so a batch job's log is never the
only copy) and RUN/metrics.csv (one row per epoch, rewritten whole, read back on resume)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from trainer.errors import OutputError
from trainer.outputs import write_csv

LOG_FILE = "log.txt"


class RunLog:
    """What a run says: printed (unless quiet) and appended to RUN/log.txt, so a batch job's log is never the only
    copy. Ranks other than 0 say nothing."""

    def __init__(self, path: Path | None, quiet: bool) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, text: str) -> None:
        if self.path is None:
            return
        if not self.quiet:
            print(text, flush=True)
        try:
            with open(self.path, "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError as error:
            raise OutputError(f"{self.path}: could not be written ({error.strerror or error}); free some space or "
                              "choose a writable --out") from None

    def stopped(self, error: BaseException) -> None:
        """Record why the run ended early (the command line shows it too)."""
        if self.path is not None and self.path.parent.is_dir():
            try:
                with open(self.path, "a") as handle:
                    handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stopped: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}\n")
            except OSError:
                pass  # the error being reported matters more


class History:
    """metrics.csv: one row per epoch, every metric for train and val (rewritten whole each epoch)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.damaged: int | None = None  # the first line that could not be read back, if any
        if path.is_file():
            self._read()

    def _read(self) -> None:
        """Read the rows back, numbers as they were written (an epoch stays an integer); reading stops at a damaged
        line (a file cut mid-row by hand or a failing disk), which ``damaged`` names."""
        try:
            with open(self.path, newline="") as handle:
                for line, row in enumerate(csv.DictReader(handle), start=2):
                    try:
                        self.rows.append({k: _number(v) for k, v in row.items()})
                    except (TypeError, ValueError):
                        self.damaged = line
                        return
        except (OSError, UnicodeDecodeError, csv.Error):
            self.damaged = 1

    def truncate(self, last_epoch: int) -> None:
        """Keep the rows up to ``last_epoch`` (those the resume state goes with)."""
        self.rows = [row for row in self.rows if row["epoch"] <= last_epoch]
        self._write()

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write()

    def amend_last(self, **values: float) -> None:
        """Fill in what is known only after the row was logged (the epoch's checkpoint and plot time)."""
        self.rows[-1] |= values
        self._write()

    def _write(self) -> None:
        if self.rows:
            write_csv(self.path, self.rows)
        else:
            self.path.unlink(missing_ok=True)


def _number(text: str | None) -> float | int:
    """A metrics.csv cell: an integer when it was written as one, else a float (nan included)."""
    if text is None or text == "":
        raise ValueError("a missing cell")
    return int(text) if text.lstrip("-").isdigit() else float(text)

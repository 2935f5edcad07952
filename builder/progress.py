"""Progress on long work, in a terminal and outside one (a batch job, CI, a notebook's captured log).

In a terminal: a tqdm bar. Elsewhere tqdm stays silent (it would fill a log with carriage returns), so ``Progress``
prints a plain line instead at least every ``EVERY_SECONDS`` and when work that took a while ends, so that nobody
stares at minutes of silence. Standard library and tqdm only: the builder and the trainer both use it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
#: Outside a terminal, a progress line at least this often.
EVERY_SECONDS = 30.0


class Progress(Generic[T]):
    """Iterate ``items`` showing progress (nothing when not ``show``); ``note`` adds a short status (e.g. the loss)."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", show: bool = True,
                 leave: bool = True) -> None:
        self.items, self.desc, self.unit, self.show = items, desc, unit, show
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True) \
            if show and sys.stderr.isatty() else None
        self.status = ""

    def note(self, status: str) -> None:
        self.status = status
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)

    def __iter__(self) -> Iterator[T]:
        started = last = time.monotonic()
        done = 0
        try:
            for item in self.items:
                yield item
                done += 1
                if self.bar is not None:
                    self.bar.update(1)
                elif self.show and time.monotonic() - last >= EVERY_SECONDS:
                    last = time.monotonic()
                    self._line(done, last - started)
        finally:
            if self.bar is not None:
                self.bar.close()
            elif self.show and done and time.monotonic() - started >= 1.0:
                self._line(done, time.monotonic() - started)

    def _line(self, done: int, seconds: float) -> None:
        rate = f", {done / seconds:.2f} {self.unit}/s" if seconds > 0 else ""
        status = f" ({self.status})" if self.status else ""
        print(f"{self.desc}: {done}{f'/{self.total}' if self.total else ''} {self.unit} in {seconds:.0f} s{rate}{status}",
              file=sys.stderr, flush=True)

"""Build the artifact: scan a BraTS folder once, read each case in parallel, stream rows into one HDF5 file."""

from __future__ import annotations

import datetime as dt
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import numpy as np
from joblib import Parallel, delayed, parallel_config

from builder import __version__
from builder.extract import CaseHeaders, CaseRows, Skipped, SliceRule, read_case_headers, read_case_rows
from builder.format import FORMAT_VERSION, MODALITIES, slice_axis
from builder.layout import Case, find_cases
from builder.nifti import LIMITS
from builder.processes import kill_descendants
from builder.progress import Progress
from builder.split import split_cases, split_rows
from builder.writer import DEFAULT_COMPRESSION, ArtifactWriter, remove_stale_partials

T = TypeVar("T")
R = TypeVar("R")


class BuildError(Exception):
    """A build that cannot produce a valid artifact; the message is one line for the user."""


@dataclass(frozen=True)
class BuildOptions:
    jobs: int = -1
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    rule: SliceRule = field(default_factory=SliceRule)
    strict: bool = False
    backend: str = "loky"
    scheduler: str | None = None
    progress: bool = True
    compression: str = DEFAULT_COMPRESSION


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    cases_scanned: int
    cases_written: int
    rows: int
    split_rows: dict[str, int]
    skipped: list[Skipped]
    seconds: float
    removed_partials: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what scanning the source met and left alone


@contextmanager
def parallel_backend(backend: str, jobs: int, scheduler: str | None) -> Iterator[None]:
    """joblib's loky processes by default; a Dask cluster (``scheduler`` address, or a local one) on request."""
    if backend == "loky":
        with parallel_config(backend="loky", n_jobs=jobs):
            yield
        return
    if backend != "dask":
        raise BuildError(f"unknown backend {backend!r}; use loky or dask")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BuildError("--backend dask needs the 'distributed' package: pip install 'brats2d[dask]'") from None
    if scheduler:
        _check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout=30)
        except OSError as error:
            raise BuildError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from None
    else:
        workers = jobs if jobs > 0 else None
        client = Client(LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None))
    try:
        with parallel_config(backend="dask", n_jobs=-1):
            yield
    finally:
        client.close()


def _check_reachable(scheduler: str) -> None:
    """Fail at once, in one line, when nothing listens at the scheduler's address (Dask's client would retry for
    its whole timeout first)."""
    address = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    try:
        host, port = address.hostname, address.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise BuildError(f"--scheduler {scheduler}: give the Dask scheduler's address as tcp://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as error:
        raise BuildError(f"cannot reach the Dask scheduler at {scheduler}: {error.strerror or error}") from None


def _map(
    function: Callable[..., R], items: Iterable[T], total: int, desc: str, progress: bool, *args: object
) -> Iterator[R]:
    """Apply ``function`` to each item in the active joblib backend; results arrive in order, as they finish."""
    run = Parallel(return_as="generator", pre_dispatch="2*n_jobs")
    results = run(delayed(function)(item, *args) for item in items)
    yield from Progress(results, desc, total, "case", show=progress)


def _plan(headers: list[CaseHeaders], plane: str) -> tuple[tuple, dict[str, str]]:
    """Geometry (the most common slice shape in ``plane``, orientation and voxel size) and stored dtype per modality
    (shared dtype, else float32)."""
    geometry = Counter(h.geometry(plane) for h in headers).most_common(1)[0][0]
    dtypes = {}
    for modality in MODALITIES:
        seen = {h.value_dtypes[modality] for h in headers}
        dtypes[modality] = seen.pop() if len(seen) == 1 else np.dtype(np.float32).str
    return geometry, dtypes


def _geometry_problem(found: tuple, wanted: tuple) -> str:
    (shape, codes, size), (want_shape, want_codes, want_size) = found, wanted
    if shape != want_shape:
        return f"slice shape {shape} differs from the dataset's {want_shape}"
    if codes != want_codes:
        return (f"stored in orientation {''.join(codes)}, the dataset's is {''.join(want_codes)}: reorient it "
                "(e.g. nibabel's as_reoriented) or build it into another file")
    return f"voxel size {size} mm differs from the dataset's {want_size} mm: resample it or build it into another file"


def _split_attrs(options: BuildOptions) -> dict[str, float]:
    return {
        "train": round(1 - options.val_fraction - options.test_fraction, 6),
        "val": options.val_fraction,
        "test": options.test_fraction,
    }


#: How many of the folders that held no case a build names.
EMPTY_SHOWN = 3


def build(source: Path, out: Path, options: BuildOptions = BuildOptions()) -> BuildSummary:
    """Build ``out`` from the cases under ``source``. Raises BuildError with a one-line message."""
    started = time.perf_counter()
    if not source.is_dir():
        raise BuildError(f"{source}: no such folder (point SOURCE at the folder holding the BraTS case folders)")
    if out.is_dir():
        raise BuildError(f"{out}: is a folder; give a file name such as {out / 'brats2023.h5'}")
    unreadable: list[tuple[Path, str]] = []
    notes: list[str] = []
    empty: list[Path] = []
    try:
        cases = find_cases(source, unreadable, notes, empty)
    except ValueError as error:
        raise BuildError(str(error)) from None
    if empty and cases:
        shown = ", ".join(str(path.relative_to(source)) for path in sorted(empty)[:EMPTY_SHOWN])
        more = ", ..." if len(empty) > EMPTY_SHOWN else ""
        line = f"{len(empty)} folder(s) under {source} held no case (first: {shown}{more}): a download cut short?"
        if options.strict:
            raise BuildError(f"--strict: {line}")
        notes.append(line)
    if not cases and unreadable:
        raise BuildError(f"{unreadable[0][0]}: {unreadable[0][1]}")
    if not cases:
        raise BuildError(
            f"{source}: no BraTS case folders found (expected folders like BraTS-GLI-00000-000/ holding "
            "BraTS-GLI-00000-000-t1n.nii.gz ... -seg.nii.gz, or BraTS2021_00000/ with _t1 ... _seg files)"
        )
    removed = remove_stale_partials(out)
    try:
        writer = ArtifactWriter(out, options.compression)
    except OSError as error:
        raise BuildError(f"{out}: cannot write here ({error.strerror or error}); choose another OUT path") from None
    early = [Skipped(path.name, reason) for path, reason in unreadable]
    try:
        with writer, _removed_on_signal(writer.tmp), parallel_backend(options.backend, options.jobs, options.scheduler):
            summary = _build_into(writer, source, cases, early, options, started)
    except Exception as error:
        limit = _limit_reached(error)
        if limit is not None:
            raise BuildError(f"{out}: the build ran out of {limit}; the partial file was removed: build again with fewer "
                             f"--jobs (now {options.jobs}){' or a higher ulimit -n' if limit == 'open files' else ''}"
                             ) from None
        if not isinstance(error, OSError):
            raise
        # the writer reports every failed write (full disk, quota) as OSError
        raise BuildError(f"{out}: writing failed ({_write_failure(error)}); the partial file was removed and "
                         f"{out.name} is unchanged: free some space (or choose another OUT) and build again") from None
    return BuildSummary(**{**summary.__dict__, "removed_partials": removed, "notes": notes})


def _limit_reached(error: BaseException | None) -> str | None:
    """"memory" or "open files" when ``error`` (or what it was raised from, as joblib's pool wraps the errors of
    starting workers) is the machine's limit, else None."""
    for _ in range(8):
        if error is None:
            return None
        if isinstance(error, MemoryError) or getattr(error, "errno", None) == errno.ENOMEM:
            return "memory"
        if getattr(error, "errno", None) in LIMITS:
            return "open files"
        error = error.__cause__ or error.__context__
    return None


def _write_failure(error: OSError) -> str:
    """The cause in words: the OS's reason, or HDF5's first line (a full disk, mostly)."""
    if error.errno:
        return os.strerror(error.errno)  # h5py puts HDF5's long text in strerror; the errno says it plainly
    return f"HDF5 could not write, is the disk full? {str(error).splitlines()[0][:60]}"


@contextmanager
def _removed_on_signal(partial: Path) -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, ``docker stop``) and SIGINT (Ctrl-C) end the build at once: the partial
    file is removed, the worker processes are killed, OUT is left as it was. Handled in the handler itself,
    because an exception raised inside joblib's result generator can be swallowed while it shuts its pool down."""
    def stop(signum: int, _frame: object) -> None:
        partial.unlink(missing_ok=True)
        kill_descendants()
        print(f"\nbuild stopped by {signal.Signals(signum).name}: removed {partial.name}; the output was not changed",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    else:  # signal handlers can only be installed from the main thread (e.g. a build started from a notebook thread)
        previous = {}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _check_strict(options: BuildOptions, skipped: list[Skipped]) -> None:
    if options.strict and skipped:
        first = skipped[0]
        raise BuildError(f"--strict: case {first.case_id} skipped: {first.reason}")


def _build_into(
    writer: ArtifactWriter, source: Path, cases: list[Case], early: list[Skipped], options: BuildOptions,
    started: float
) -> BuildSummary:
    skipped: list[Skipped] = list(early)
    _check_strict(options, skipped)
    headers: list[CaseHeaders] = []
    for result in _map(read_case_headers, cases, len(cases), "headers", options.progress):
        (skipped if isinstance(result, Skipped) else headers).append(result)
    _check_strict(options, skipped)
    if not headers:
        raise BuildError(f"{source}: no valid case among {len(cases)} (first problem: {skipped[0].reason})")
    rule = options.rule
    geometry, dtypes = _plan(headers, rule.plane)
    slice_shape, axis_codes, voxel_size = geometry
    axis = slice_axis(axis_codes, rule.plane)
    readable = {h.case_id for h in headers if h.geometry(rule.plane) == geometry}
    skipped += [Skipped(h.case_id, _geometry_problem(h.geometry(rule.plane), geometry))
                for h in headers if h.case_id not in readable]
    todo = [case for case in cases if case.case_id in readable]
    writer.create(slice_shape, dtypes, rule.context)
    for result in _map(read_case_rows, todo, len(todo), "slices", options.progress, rule, dtypes, axis):
        if isinstance(result, CaseRows):
            writer.append(result)
        else:
            skipped.append(result)
            _check_strict(options, skipped)
    written = sorted(set(writer.case_ids))
    if not written:
        raise BuildError(f"{source}: no valid case among {len(cases)} (first problem: {skipped[0].reason})")
    try:
        case_split = split_cases(written, options.seed, options.val_fraction, options.test_fraction)
    except ValueError as error:
        raise BuildError(str(error)) from None
    splits = split_rows(writer.case_ids, case_split)
    skipped.sort(key=lambda s: s.case_id)
    writer.finish(
        splits,
        {
            "format_version": FORMAT_VERSION,
            "modalities": list(MODALITIES),
            "builder_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seed": options.seed,
            "split_fractions": _split_attrs(options),
            "slice_rule": rule.describe(),
            "slices_per_case": "all" if rule.per_case is None else rule.per_case,
            "min_tumour_voxels": rule.min_tumour_voxels,
            "background_slices": rule.background,
            "label4": rule.label4,
            "plane": rule.plane,
            "slice_axis": axis,
            "context": rule.context,
            "split_unit": "patient",
            "axis_codes": list(axis_codes),
            "voxel_size": list(voxel_size),
            "source": source.resolve().name,
            "source_layouts": sorted({case.layout for case in cases if case.case_id in set(written)}),
            "cases_scanned": len(cases),
            "cases_written": len(written),
            "skipped": [{"case_id": s.case_id, "reason": s.reason} for s in skipped],
        },
    )
    return BuildSummary(
        out=writer.out,
        cases_scanned=len(cases),
        cases_written=len(written),
        rows=writer.rows,
        split_rows={name: len(rows) for name, rows in splits.items()},
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )

"""Read an artifact back: a human summary (``info``) and a full integrity check (``verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter the datasets are compressed with)
import numpy as np

from builder.checks import decoded_attributes, format_problems, structure_problems
from builder.format import (
    BACKGROUND,
    CASE_ID,
    CONTEXT_GROUP,
    DATA_ID,
    READABLE_VERSIONS,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    decode_attribute,
    file_sha256,
    split_problem,
)

_BLOCK_BYTES = 32 << 20  # read at a time while verifying: bounded memory on any file size
#: HDF5 filters by the name h5py reports, and what a reader needs for each (registered ids for plugins).
_FILTERS = {"gzip": "built into HDF5", "shuffle": "built into HDF5", "fletcher32": "built into HDF5",
            "lzf": "h5py's LZF filter (h5py only)", "32001": "the Blosc plugin (Python: import hdf5plugin)",
            "32004": "the LZ4 plugin (Python: import hdf5plugin)", "32015": "the Zstd plugin (Python: import hdf5plugin)"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def _attr(f: h5py.File, key: str) -> object:
    return decode_attribute(f.attrs.get(key), key)


def filters_needed(f: h5py.File) -> list[str]:
    """Each filter the row datasets use and what a reader needs for it, e.g. "32001: the Blosc plugin (...)"."""
    names = {name for m in (*(_attr(f, "modalities") or []), SEG) if m in f for name in f[m]._filters}
    return [f"{name}: {_FILTERS.get(name, 'an HDF5 plugin with this id')}" for name in sorted(names)]


def describe(path: Path) -> str:
    """A readable summary of an artifact: rows, splits, modalities, provenance, skipped cases (ValueError naming the
    first problem when the file is not one the format describes)."""
    with h5py.File(path, "r") as f:
        a, problems = format_problems(f)
        if problems:
            raise ValueError(problems[0])
        modalities = a.get("modalities") or []
        rows = f[SEG].shape[0]
        lines = [
            f"{path}  (format v{a.get('format_version')}, {path.stat().st_size / 1e6:.1f} MB)",
            f"rows: {rows} from {a.get('cases_written')} cases ({a.get('cases_scanned')} scanned)",
            "splits: " + ", ".join(f"{s} {f[SPLIT_GROUP][s].shape[0]}" for s in SPLITS),
            "modalities: "
            + ", ".join(f"{m} {f[m].dtype}" for m in modalities)
            + f"; seg {f[SEG].dtype}; slice {f[SEG].shape[1]}x{f[SEG].shape[2]}",
            f"slices: {a.get('slice_rule')}",
            f"plane: {a.get('plane') or 'axial'} (volume axis {a.get('slice_axis', 2)}), "
            f"context: {a.get('context') or 0} slice(s) on each side",
            f"built by brats2d builder {a.get('builder_version')} on {a.get('created')} "
            f"from {a.get('source')} ({', '.join(a.get('source_layouts') or [])}), seed {a.get('seed')}",
            f"storage: {a.get('compression') or 'blosc-lz4'}, fletcher32 checksums, one slice per chunk; "
            f"filters a reader needs: {'; '.join(filters_needed(f))}",
            f"build id: {a.get(DATA_ID) or 'none (format before v3)'}",
            f"geometry: axis codes {''.join(a.get('axis_codes') or ['?'])}, voxel size {a.get('voxel_size')} mm; "
            f"splits by {a.get('split_unit') or 'case'}",
        ]
        if BACKGROUND in f:
            lines.insert(2, f"background rows (tumour-free slices): {int(f[BACKGROUND][()].sum())}")
        lines.insert(1, f"sha256: {file_sha256(path)}")
        skipped = a.get("skipped") or []
        lines.append(f"skipped cases: {len(skipped)}")
        lines += [f"  {s['case_id']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def _case_of(case_ids: np.ndarray | None, row: int) -> str:
    return f" (case {case_ids[row]})" if case_ids is not None and row < len(case_ids) else ""


def _check_rows(f: h5py.File, name: str, rows: int, case_ids: np.ndarray | None, report: Report) -> None:
    """Read every chunk (so HDF5 checks its fletcher32 checksum) and, for the seg, the label range; a damaged
    block is read again row by row to name each damaged row and its case."""
    dataset = f[name]
    step = max(1, _BLOCK_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    for start in range(0, rows, step):
        try:
            block = dataset[start : start + step]
        except OSError as error:
            for row in range(start, min(start + step, rows)):
                try:
                    dataset[row]
                except OSError:
                    report.check(False, f"/{name}: row {row}{_case_of(case_ids, row)} unreadable "
                                        f"({str(error).splitlines()[0][:80]})")
            continue
        if name == SEG and not report.check(int(block.max(initial=0)) <= 3, f"/{name}: label values above 3"):
            return
        if block.dtype.kind == "f":
            report.check(bool(np.isfinite(block).all()), f"/{name}: NaN or infinite values near row {start}")


def verify(path: Path) -> list[str]:
    """Every problem found in the artifact (empty when it is sound). Never raises: a file too damaged to go on with
    gives the problems found so far."""
    try:
        f = h5py.File(path, "r")
    except Exception as error:  # whatever h5py raises for a file that is not HDF5
        return [f"not a readable HDF5 file ({(str(error).splitlines() or [type(error).__name__])[0][:100]})"]
    report = Report()
    try:
        with f:
            _verify(f, report)
    except Exception as error:  # damage past what the checks foresee, whatever h5py makes of it
        report.check(False, f"unreadable past this point ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
    return report.problems


def _verify(f: h5py.File, report: Report) -> None:
    try:  # every object's header, read through HDF5's own checksums (the 1.10 format checks them all)
        f.visititems(lambda name, item: dict(item.attrs) and None)
    except (RuntimeError, OSError, KeyError) as error:
        report.check(False, f"metadata damaged ({str(error).splitlines()[0][:80]})")
        return
    attributes, problems = decoded_attributes(f)
    report.problems += problems
    if "format_version" not in attributes or attributes["format_version"] not in READABLE_VERSIONS:
        return
    report.problems += structure_problems(f, attributes)
    if report.problems:
        return
    version, context = attributes["format_version"], attributes.get("context") or 0
    names = [*attributes.get("modalities", []), SEG]
    neighbours = [f"{CONTEXT_GROUP}/{m}" for m in names[:-1]] if context else []
    rows = f[SEG].shape[0]
    for name in names + neighbours:
        report.check(f[name].fletcher32, f"/{name}: written without checksums")
    if version >= 3:
        for name in (CASE_ID, SLICE_INDEX, BACKGROUND, *(f"{SPLIT_GROUP}/{s}" for s in SPLITS)):
            report.check(f[name].fletcher32, f"/{name}: written without checksums")
    metadata = {name: _read_whole(f, name, report) for name in (CASE_ID, SLICE_INDEX)}
    splits = {s: _read_whole(f, f"{SPLIT_GROUP}/{s}", report) for s in SPLITS}
    if any(value is None for value in (*metadata.values(), *splits.values())):
        return
    case_ids = metadata[CASE_ID]
    if BACKGROUND in f:
        background = _read_whole(f, BACKGROUND, report)
        if background is not None:
            tumour = [row for row in np.flatnonzero(background.astype(bool)) if f[SEG][int(row)].any()]
            report.check(not tumour, f"/{BACKGROUND}: rows marked tumour-free hold tumour labels: {tumour[:5]}")
    problem = split_problem(splits, rows)  # type: ignore[arg-type]
    report.check(problem is None, f"splits: {problem}")
    if problem is None:
        every = np.concatenate(list(splits.values()))  # type: ignore[arg-type]
        report.check(every.size == rows, f"splits hold {every.size} of the {rows} rows, not every row once")
        cases = {s: set(case_ids[indices]) for s, indices in splits.items()}  # type: ignore[index]
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = cases[a] & cases[b]
            report.check(not shared, f"splits {a} and {b} share cases: {', '.join(sorted(shared)[:3])}")
    for name in names + neighbours:
        _check_rows(f, name, rows, case_ids, report)


def _read_whole(f: h5py.File, name: str, report: Report) -> np.ndarray | None:
    """A small dataset (row metadata, a split) read whole; None and a problem when its checksum fails."""
    try:
        return f[name].asstr()[()] if f[name].dtype.kind in "SO" else f[name][()]
    except OSError as error:
        report.check(False, f"/{name}: unreadable, damaged ({str(error).splitlines()[0][:80]})")
        return None

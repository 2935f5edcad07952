"""Read an artifact back: a human summary (``info``) and a full integrity check (``verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter the datasets are compressed with)
import numpy as np

from builder.format import (
    BACKGROUND,
    CASE_ID,
    READABLE_VERSIONS,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    decode_attribute,
    file_sha256,
)

_BLOCK = 256  # rows read at a time while verifying: bounded memory on any file size


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def _attr(f: h5py.File, key: str) -> object:
    return decode_attribute(f.attrs.get(key))


def describe(path: Path) -> str:
    """A readable summary of an artifact: rows, splits, modalities, provenance, skipped cases."""
    with h5py.File(path, "r") as f:
        modalities = _attr(f, "modalities") or []
        rows = f[SEG].shape[0]
        lines = [
            f"{path}  (format v{_attr(f, 'format_version')}, {path.stat().st_size / 1e6:.1f} MB)",
            f"rows: {rows} from {_attr(f, 'cases_written')} cases ({_attr(f, 'cases_scanned')} scanned)",
            "splits: " + ", ".join(f"{s} {f[SPLIT_GROUP][s].shape[0]}" for s in SPLITS),
            "modalities: "
            + ", ".join(f"{m} {f[m].dtype}" for m in modalities)
            + f"; seg {f[SEG].dtype}; slice {f[SEG].shape[1]}x{f[SEG].shape[2]}",
            f"slices: {_attr(f, 'slice_rule')}",
            f"built by brats2d builder {_attr(f, 'builder_version')} on {_attr(f, 'created')} "
            f"from {_attr(f, 'source')} ({', '.join(_attr(f, 'source_layouts') or [])}), seed {_attr(f, 'seed')}",
            f"storage: {_attr(f, 'compression')}, fletcher32 checksums, one slice per chunk",
            f"geometry: axis codes {''.join(_attr(f, 'axis_codes') or ['?'])}, voxel size {_attr(f, 'voxel_size')} mm; "
            f"splits by {_attr(f, 'split_unit') or 'case'}",
        ]
        if BACKGROUND in f:
            lines.insert(2, f"background rows (tumour-free slices): {int(f[BACKGROUND][()].sum())}")
        lines.insert(1, f"sha256: {file_sha256(path)}")
        skipped = _attr(f, "skipped") or []
        lines.append(f"skipped cases: {len(skipped)}")
        lines += [f"  {s['case_id']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def _check_rows(f: h5py.File, name: str, rows: int, report: Report) -> None:
    """Read every chunk (so HDF5 checks its fletcher32 checksum) and, for the seg, the label range."""
    dataset = f[name]
    for start in range(0, rows, _BLOCK):
        try:
            block = dataset[start : start + _BLOCK]
        except OSError as error:
            report.check(False, f"/{name}: rows {start}-{min(start + _BLOCK, rows) - 1} unreadable ({error})")
            continue
        if name == SEG and not report.check(int(block.max(initial=0)) <= 3, f"/{name}: label values above 3"):
            return
        if block.dtype.kind == "f":
            report.check(bool(np.isfinite(block).all()), f"/{name}: NaN or infinite values near row {start}")


def verify(path: Path) -> list[str]:
    """Every problem found in the artifact (empty when it is sound)."""
    report = Report()
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        return [f"{path}: not a readable HDF5 file ({error})"]
    with f:
        version = _attr(f, "format_version")
        if not report.check(version in READABLE_VERSIONS, f"format_version {version} is not one of {READABLE_VERSIONS}"):
            return report.problems
        modalities = _attr(f, "modalities") or []
        names = [*modalities, SEG]
        for name in [*names, CASE_ID, SLICE_INDEX, *(f"{SPLIT_GROUP}/{s}" for s in SPLITS)]:
            report.check(name in f, f"/{name}: missing")
        if report.problems:
            return report.problems
        rows, height, width = f[SEG].shape
        for name in names:
            report.check(f[name].shape == (rows, height, width), f"/{name}: shape {f[name].shape} is not {(rows, height, width)}")
            report.check(f[name].fletcher32, f"/{name}: written without checksums")
        report.check(f[CASE_ID].shape == (rows,), f"/{CASE_ID}: {f[CASE_ID].shape[0]} entries for {rows} rows")
        report.check(f[SLICE_INDEX].shape == (rows,), f"/{SLICE_INDEX}: {f[SLICE_INDEX].shape[0]} entries for {rows} rows")
        if report.problems:
            return report.problems
        splits = {s: f[SPLIT_GROUP][s][()] for s in SPLITS}
        if version >= 2 and report.check(BACKGROUND in f, f"/{BACKGROUND}: missing"):
            background = f[BACKGROUND][()].astype(bool)
            report.check(background.shape == (rows,), f"/{BACKGROUND}: {background.shape[0]} entries for {rows} rows")
            tumour = [row for row in np.flatnonzero(background[:rows]) if f[SEG][int(row)].any()]
            report.check(not tumour, f"/{BACKGROUND}: rows marked tumour-free hold tumour labels: {tumour[:5]}")
        for s, indices in splits.items():
            report.check(bool(np.all(np.diff(indices) > 0)), f"split {s}: indices not sorted and unique")
        every = np.concatenate(list(splits.values()))
        report.check(np.array_equal(np.sort(every), np.arange(rows)), "splits do not cover every row exactly once")
        case_ids = f[CASE_ID].asstr()[()]
        cases = {s: set(case_ids[indices[(indices >= 0) & (indices < rows)]]) for s, indices in splits.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = cases[a] & cases[b]
            report.check(not shared, f"splits {a} and {b} share cases: {', '.join(sorted(shared)[:3])}")
        for name in names:
            _check_rows(f, name, rows, report)
    return report.problems

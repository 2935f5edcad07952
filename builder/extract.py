"""The per-case work of a build, run in the workers: check a case, pick its slices, read them.

Each function returns a result or a ``Skipped`` with the reason, never raises for bad data: one broken case
must not stop a build of 1251.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.format import MODALITIES, SEG
from builder.layout import Case
from builder.nifti import NiftiReadError, read_all_raw_slices, read_header, read_slices

#: Label value 4 meant enhancing tumour up to BraTS 2021; it is stored as 3, the 2023 value.
LEGACY_ET = 4


@dataclass(frozen=True)
class Skipped:
    case_id: str
    reason: str


@dataclass(frozen=True)
class CaseHeaders:
    """What the headers of a case say, enough to plan the file before reading any voxel."""

    case_id: str
    shape: tuple[int, int, int]
    value_dtypes: dict[str, str]


@dataclass(frozen=True)
class SliceRule:
    """Which axial slices of a case become rows.

    ``per_case`` densest slices (ties to the lowest z), or every slice when ``per_case`` is None; only
    slices with at least ``min_tumour_voxels`` labelled voxels.
    """

    per_case: int | None = 1
    min_tumour_voxels: int = 1

    def choose(self, tumour_voxels: np.ndarray) -> np.ndarray:
        candidates = np.argsort(-tumour_voxels, kind="stable")
        if self.per_case is not None:
            candidates = candidates[: self.per_case]
        keep = candidates[tumour_voxels[candidates] >= max(1, self.min_tumour_voxels)]
        return np.sort(keep)

    def describe(self) -> str:
        which = "every axial slice" if self.per_case is None else f"the {self.per_case} densest axial slice(s)"
        return (
            f"{which} by count of non-zero seg voxels (ties to the lowest z), "
            f"keeping slices with at least {max(1, self.min_tumour_voxels)} such voxels"
        )


@dataclass(frozen=True)
class CaseRows:
    """The rows one case contributes: one per chosen slice, in ascending z."""

    case_id: str
    slice_index: np.ndarray
    seg: np.ndarray
    images: dict[str, np.ndarray]


def read_case_headers(case: Case) -> CaseHeaders | Skipped:
    """Check that every file exists and that all five volumes share one 3D shape."""
    missing = case.missing()
    if missing:
        names = ", ".join(case.files[name].name for name in missing)
        hint = " (an unlabelled validation case?)" if missing == [SEG] else ""
        return Skipped(case.case_id, f"missing file(s): {names}{hint}")
    try:
        headers = {name: read_header(path) for name, path in case.files.items()}
    except NiftiReadError as error:
        return Skipped(case.case_id, str(error))
    shapes = {name: info.shape for name, info in headers.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        return Skipped(case.case_id, f"volumes differ in shape: {listed}")
    return CaseHeaders(
        case_id=case.case_id,
        shape=headers[SEG].shape,
        value_dtypes={name: headers[name].value_dtype.str for name in MODALITIES},
    )


def _labels(case: Case) -> np.ndarray | str:
    """The seg as uint8 (Z, Y, X) with 2023 label values, or the reason it cannot be used.

    The array may be the reader's reused buffer: the caller copies the slices it keeps.
    """
    try:
        raw, info = read_all_raw_slices(case.files[SEG])
    except NiftiReadError as error:
        return str(error)
    values = info.scale(raw)
    name = case.files[SEG].name
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            return f"{name}: NaN or infinite label values"
        if not (values == np.round(values)).all():
            return f"{name}: non-integer label values"
    high = values.max()
    low = values.min() if values.dtype.kind != "u" else 0
    if low < 0 or high > LEGACY_ET:
        return f"{name}: label values outside 0..4 (found {low:g}..{high:g})"
    labels = values.astype(np.uint8, copy=False)
    if high == LEGACY_ET:
        labels[labels == LEGACY_ET] = 3
    return labels


def read_case_rows(case: Case, rule: SliceRule, dtypes: dict[str, str]) -> CaseRows | Skipped:
    """Read the seg in full, choose slices by ``rule``, read those slices of every modality."""
    labels = _labels(case)
    if isinstance(labels, str):
        return Skipped(case.case_id, labels)
    tumour_voxels = np.array([np.count_nonzero(axial) for axial in labels])  # 10x faster than axis=(1, 2)
    if not tumour_voxels.any():
        return Skipped(case.case_id, f"{case.files[SEG].name}: empty label map (no tumour voxels)")
    zs = rule.choose(tumour_voxels)
    if zs.size == 0:
        return Skipped(case.case_id, f"no slice has at least {rule.min_tumour_voxels} tumour voxels")
    images = {}
    for modality in MODALITIES:
        try:
            values, _ = read_slices(case.files[modality], zs)
        except NiftiReadError as error:
            return Skipped(case.case_id, str(error))
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return Skipped(case.case_id, f"{case.files[modality].name}: NaN or infinite voxels in slice(s) {zs.tolist()}")
        images[modality] = values.astype(dtypes[modality], copy=False)
    seg = np.ascontiguousarray(labels[zs].transpose(0, 2, 1))
    return CaseRows(case.case_id, zs.astype(np.int32), seg, images)

"""The per-case work of a build, run in the workers: check a case, pick its slices, read them.

Each function returns a result or a ``Skipped`` with the reason, never raises for bad data: one broken case
must not stop a build of 1251.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from builder.format import MODALITIES, SEG, context_offsets, slice_axis
from builder.labels import to_brats2023
from builder.layout import Case
from builder.nifti import NiftiReadError, read_all_raw_slices, read_header, read_raw_slices, read_slices

#: A tumour-free slice needs this share of brain (non-zero) pixels to become a background row.
MIN_BRAIN_SHARE = 0.05


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
    axis_codes: tuple[str, str, str]
    voxel_size: tuple[float, float, float]

    def geometry(self, plane: str) -> tuple[tuple[int, ...], tuple[str, str, str], tuple[float, float, float]]:
        """What every case of one artifact must share: the shape of its slices in ``plane``, orientation and voxel
        size."""
        axis = slice_axis(self.axis_codes, plane)
        return tuple(n for i, n in enumerate(self.shape) if i != axis), self.axis_codes, self.voxel_size


@dataclass(frozen=True)
class SliceRule:
    """Which slices of a case become rows, and what each row holds.

    Slices are taken in ``plane`` (axial, coronal or sagittal): the ``per_case`` densest (ties to the lowest index),
    or every slice when ``per_case`` is None; only slices with at least ``min_tumour_voxels`` labelled voxels.
    Besides, ``background`` tumour-free slices with brain on them, spread evenly over the volume, so that a model
    also learns what no tumour looks like. With ``context`` K, each row also keeps the K slices on each side of it
    (zeros beyond the volume's edges), so that a model can see what lies above and below.
    """

    per_case: int | None = 1
    min_tumour_voxels: int = 1
    background: int = 0
    label4: str = "auto"
    plane: str = "axial"
    context: int = 0

    def choose(self, tumour_voxels: np.ndarray) -> np.ndarray:
        candidates = np.argsort(-tumour_voxels, kind="stable")
        if self.per_case is not None:
            candidates = candidates[: self.per_case]
        keep = candidates[tumour_voxels[candidates] >= max(1, self.min_tumour_voxels)]
        return np.sort(keep)

    def choose_background(self, tumour_voxels: np.ndarray, brain_voxels: np.ndarray, slice_pixels: int) -> np.ndarray:
        """``background`` tumour-free brain slices, evenly spaced over those there are."""
        candidates = np.flatnonzero((tumour_voxels == 0) & (brain_voxels >= MIN_BRAIN_SHARE * slice_pixels))
        if self.background == 0 or candidates.size == 0:
            return candidates[:0]
        return np.unique(candidates[np.linspace(0, candidates.size - 1, min(self.background, candidates.size)).round().astype(int)])

    def describe(self) -> str:
        which = f"every {self.plane} slice" if self.per_case is None else f"the {self.per_case} densest {self.plane} slice(s)"
        text = (
            f"{which} by count of non-zero seg voxels (ties to the lowest index), "
            f"keeping slices with at least {max(1, self.min_tumour_voxels)} such voxels"
        )
        if self.background:
            text += (f"; plus up to {self.background} tumour-free slices per case with brain on at least "
                     f"{MIN_BRAIN_SHARE:.0%} of the slice ({MODALITIES[0]} non-zero), evenly spaced (marked in /background)")
        if self.context:
            text += f"; each row with the {self.context} slice(s) on each side of it (zeros beyond the volume)"
        return text


@dataclass(frozen=True)
class CaseRows:
    """The rows one case contributes: one per chosen slice, in ascending index."""

    case_id: str
    slice_index: np.ndarray
    seg: np.ndarray
    images: dict[str, np.ndarray]
    background: np.ndarray  # True for the rows added as tumour-free slices
    context: dict[str, np.ndarray] | None = None  # per modality (rows, 2K, H, W): the neighbouring slices


def read_case_headers(case: Case) -> CaseHeaders | Skipped:
    """Check that every file exists and that all five volumes share one 3D shape."""
    problems = case.problems()
    if problems:
        hint = " (an unlabelled validation case?)" if case.missing() == [SEG] and "; " not in problems else ""
        return Skipped(case.case_id, f"{problems}{hint}")
    try:
        headers = {name: read_header(path) for name, path in case.files.items()}
    except NiftiReadError as error:
        return Skipped(case.case_id, str(error))
    shapes = {name: info.shape for name, info in headers.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        return Skipped(case.case_id, f"volumes differ in shape: {listed}")
    codes = {name: tuple(nib.aff2axcodes(info.header.get_best_affine())) for name, info in headers.items()}
    if len(set(codes.values())) > 1:
        listed = ", ".join(f"{name} {''.join(c)}" for name, c in codes.items())
        return Skipped(case.case_id, f"volumes differ in orientation: {listed}")
    zooms = tuple(round(float(z), 4) for z in headers[SEG].header.get_zooms()[:3])
    return CaseHeaders(
        case_id=case.case_id,
        shape=headers[SEG].shape,
        value_dtypes={name: headers[name].value_dtype.str for name in MODALITIES},
        axis_codes=codes[SEG],  # type: ignore[arg-type]
        voxel_size=zooms,  # type: ignore[arg-type]
    )


def _labels(case: Case, label4: str) -> np.ndarray | str:
    """The seg as uint8 (Z, Y, X) with 2023 label values, or the reason it cannot be used.

    The array may be the reader's reused buffer: the caller copies the slices it keeps.
    """
    try:
        raw, info = read_all_raw_slices(case.files[SEG])
    except NiftiReadError as error:
        return str(error)
    return to_brats2023(info.scale(raw), case.files[SEG].name, case.legacy_naming, label4)


def along(stored: np.ndarray, axis: int) -> np.ndarray:
    """A view of a volume as read (Z, Y, X: the file's order) whose first axis is the volume's ``axis`` of (X, Y, Z):
    ``along(stored, axis)[i]`` is ``np.take(volume, i, axis)``, what nibabel gives for that slice."""
    return np.moveaxis(stored.transpose(2, 1, 0), axis, 0)


def _per_slice_nonzero(stored: np.ndarray, axis: int) -> np.ndarray:
    """Non-zero voxels of each slice along the volume's ``axis``, counted in the stored order: axial slices are
    contiguous there, and a loop of count_nonzero over them is 10x faster than one call with axis=(1, 2)."""
    return np.array([np.count_nonzero(one) for one in np.moveaxis(stored, 2 - axis, 0)])


class _Slices:
    """The slices of one image volume along ``axis`` that a case's rows need, read once: only up to the last one
    needed for axial slices (a .nii.gz decodes from its start), the whole volume for the other planes."""

    def __init__(self, path: Path, axis: int, needed: list[int], dtype: str) -> None:
        if axis == 2:
            values, _ = read_slices(path, needed)
            self._index = {z: i for i, z in enumerate(needed)}
        else:
            raw, info = read_raw_slices(path, None)  # not the reused buffer: it may hold the labels
            values, self._index = along(info.scale(raw), axis), None
        self.values = values
        self.dtype = dtype

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[index if self._index is None else self._index[index]]

    def rows(self, indices: np.ndarray, offsets: list[int], length: int) -> np.ndarray:
        """(rows, len(offsets), H, W): slice ``index + offset`` of each row, zeros beyond the volume."""
        first = self[int(indices[0])]
        out = np.zeros((len(indices), len(offsets), *first.shape), dtype=self.dtype)
        for i, index in enumerate(indices):
            for j, offset in enumerate(offsets):
                if 0 <= index + offset < length:
                    out[i, j] = self[int(index + offset)]
        return out


def read_case_rows(case: Case, rule: SliceRule, dtypes: dict[str, str], axis: int = 2) -> CaseRows | Skipped:
    """Read the seg in full, choose slices along ``axis`` by ``rule``, read those slices (and their neighbours) of
    every modality."""
    labels = _labels(case, rule.label4)
    if isinstance(labels, str):
        return Skipped(case.case_id, labels)
    label_slices = along(labels, axis)
    length = label_slices.shape[0]
    if length < 2 * rule.context + 1:
        return Skipped(case.case_id, f"only {length} slices in the {rule.plane} plane, fewer than the "
                                     f"{2 * rule.context + 1} that --context {rule.context} needs; build with a smaller --context")
    tumour_voxels = _per_slice_nonzero(labels, axis)
    if not tumour_voxels.any():
        return Skipped(case.case_id, f"{case.files[SEG].name}: empty label map (no tumour voxels)")
    zs = rule.choose(tumour_voxels)
    if zs.size == 0:
        return Skipped(case.case_id, f"no slice has at least {rule.min_tumour_voxels} tumour voxels")
    background = zs[:0]
    if rule.background:
        try:  # not the reused buffer: it may hold the labels (an int16 seg shares the images' dtype)
            brain, _ = read_raw_slices(case.files[MODALITIES[0]], None)
        except NiftiReadError as error:
            return Skipped(case.case_id, str(error))
        background = rule.choose_background(tumour_voxels, _per_slice_nonzero(brain, axis), label_slices[0].size)
        zs = np.union1d(zs, background)
    offsets = context_offsets(rule.context)
    needed = sorted({int(z) + o for z in zs for o in (0, *offsets) if 0 <= z + o < length})
    images, context = {}, {}
    for modality in MODALITIES:
        try:
            slices = _Slices(case.files[modality], axis, needed, dtypes[modality])
        except NiftiReadError as error:
            return Skipped(case.case_id, str(error))
        rows = slices.rows(zs, [0, *offsets], length)
        if rows.dtype.kind == "f" and not np.isfinite(rows).all():
            return Skipped(case.case_id, f"{case.files[modality].name}: NaN or infinite voxels in slice(s) {zs.tolist()}"
                                         f"{' or their neighbours' if offsets else ''}")
        images[modality] = np.ascontiguousarray(rows[:, 0])
        if offsets:
            context[modality] = np.ascontiguousarray(rows[:, 1:])
    seg = np.ascontiguousarray(label_slices[zs])
    return CaseRows(case.case_id, zs.astype(np.int32), seg, images, np.isin(zs, background), context or None)

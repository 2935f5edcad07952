"""A case's volumes for a 2D model: read in the training data's orientation and checked against the model's geometry,
and the labels drawn from its probabilities written back (and scored) in the case's own space.

Needs nibabel (``pip install 'brats2d[predict]'``): with ``predict`` and ``evaluate --volumes``, the only parts of
the trainer that read NIfTI.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.format import DEFAULT_AXIS_CODES, DEFAULT_VOXEL_SIZE, SEG
from builder.labels import to_brats2023
from builder.layout import MISSING, Case, file_problem
from trainer.config import FitConfig
from trainer.errors import CaseError, CommandError
from trainer.outputs import atomic_output
from trainer.scoring.brats import region_names, score_case
from trainer.tasks import classes

#: Binary (whole tumour) models write this label: the oedema value, the largest part of most tumours.
BINARY_LABEL = 2
#: Voxel sizes that differ by less than this share are the same (headers store float32 zooms).
SPACING_TOLERANCE = 0.01


def nibabel() -> Any:
    try:
        import nibabel as nib
    except ImportError:
        raise CommandError("reading NIfTI volumes needs nibabel: pip install 'brats2d[predict]'") from None
    return nib


@dataclass(frozen=True)
class Geometry:
    """What a model needs of a volume: the orientation and voxel size it was trained at, the axis it slices along,
    the shape of its slices and how many neighbours each takes (from its run configuration)."""

    axis_codes: tuple[str, ...] = DEFAULT_AXIS_CODES
    voxel_size: tuple[float, ...] = DEFAULT_VOXEL_SIZE
    slice_axis: int = 2
    slice_shape: tuple[int, ...] | None = None
    context: int = 0

    @classmethod
    def of(cls, config: FitConfig) -> Geometry:
        """A run's geometry; runs made before it was recorded trained on BraTS's LPS, 1 mm volumes, axially."""
        return cls(tuple(config.axis_codes or DEFAULT_AXIS_CODES), tuple(config.voxel_size or DEFAULT_VOXEL_SIZE),
                   config.slice_axis, tuple(config.slice_shape) if config.slice_shape else None, config.context)

    def check(self, case_id: str, shape: tuple[int, ...]) -> None:
        """CaseError unless a volume of ``shape`` (training orientation) has the slices this model was trained on."""
        planes = [n for axis, n in enumerate(shape) if axis != self.slice_axis]
        if self.slice_shape is not None and tuple(planes) != tuple(self.slice_shape):
            raise CaseError(f"{case_id}: slices of {planes[0]}x{planes[1]} voxels, the model was trained on "
                            f"{self.slice_shape[0]}x{self.slice_shape[1]}")
        if shape[self.slice_axis] < 2 * self.context + 1:
            raise CaseError(f"{case_id}: {shape[self.slice_axis]} slices, fewer than the {2 * self.context + 1} a model "
                            f"with --context {self.context} needs; use a run with less context for this case")


@dataclass
class CaseVolumes:
    """One case's volumes in the training orientation, and what it takes to write results in its own space."""

    case_id: str
    channels: tuple[str, ...]  # the modalities of ``images``, in order
    images: np.ndarray  # (C, X, Y, Z), as stored (raw values)
    truth: np.ndarray | None  # (X, Y, Z) uint8 BraTS 2023 labels, when the case has a seg
    spacing: tuple[float, float, float]  # mm, along the training orientation's axes
    reference: Any  # the first channel's image as given: predictions are written in its space
    to_input: np.ndarray  # nibabel orientation transform from the training orientation back to the input's
    legacy_naming: bool = False  # a 2018-2021 naming, whose label maps write ET as 4

    def of(self, channels: Sequence[str]) -> np.ndarray:
        """The (C, X, Y, Z) images of ``channels``, in that order (a model picks its inputs by name)."""
        return self.images[[self.channels.index(c) for c in channels]]

    def in_input_space(self, labels: np.ndarray) -> np.ndarray:
        return nibabel().orientations.apply_orientation(labels, self.to_input)

    @property
    def input_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the input's own axes."""
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])  # type: ignore[return-value]


def read_case(case: Case, channels: Sequence[str], geometry: Geometry, label4: str = "auto") -> CaseVolumes:
    """The case's channels (and seg, if any) reoriented to ``geometry``; CaseError when they cannot match it."""
    nib = nibabel()
    from builder.nifti import NiftiReadError, read_header  # needs nibabel too
    orientations = nib.orientations
    problems = case.problems(channels)
    if problems:
        raise CaseError(f"{case.case_id}: {problems}")
    paths = [case.files[c] for c in channels]
    seg_problem = file_problem(case.files[SEG])
    if seg_problem not in (None, MISSING):
        raise CaseError(f"{case.case_id}: {case.files[SEG].name} is {seg_problem}")
    has_seg = seg_problem is None
    try:
        images = [nib.load(path) for path in paths]
        seg_image = nib.load(case.files[SEG]) if has_seg else None
    except Exception as error:  # nibabel raises several types for unreadable headers
        raise CaseError(f"{case.case_id}: unreadable NIfTI ({error})") from None
    every = images + ([seg_image] if seg_image is not None else [])
    for path in [*paths, case.files[SEG]][: len(every)]:  # the headers as written (nibabel would mend some): bounds
        try:
            read_header(path)
        except NiftiReadError as error:
            raise CaseError(f"{case.case_id}: {error}") from None
    if len({image.shape for image in every}) != 1 or len(images[0].shape) != 3:
        shapes = ", ".join(f"{p.name} {image.shape}" for p, image in zip([*paths, case.files[SEG]], every))
        raise CaseError(f"{case.case_id}: volumes differ in shape or are not 3D ({shapes})")
    codes = {nib.aff2axcodes(image.affine) for image in every}
    if len(codes) != 1:
        raise CaseError(f"{case.case_id}: volumes differ in orientation ({', '.join(''.join(c) for c in codes)})")
    source = orientations.io_orientation(images[0].affine)
    target = orientations.axcodes2ornt(geometry.axis_codes)
    forward, back = orientations.ornt_transform(source, target), orientations.ornt_transform(target, source)
    spacing = [0.0, 0.0, 0.0]
    for axis, zoom in enumerate(images[0].header.get_zooms()[:3]):
        spacing[int(forward[axis, 0])] = float(zoom)
    if not np.allclose(spacing, geometry.voxel_size, rtol=SPACING_TOLERANCE):
        raise CaseError(f"{case.case_id}: voxel size {tuple(round(s, 3) for s in spacing)} mm differs from the "
                        f"training data's {tuple(geometry.voxel_size)} mm; resample the case to it first")
    geometry.check(case.case_id, orientations.apply_orientation(np.empty(images[0].shape, dtype=np.uint8), forward).shape)
    try:
        volumes = np.stack([orientations.apply_orientation(np.asanyarray(image.dataobj), forward) for image in images])
        truth = None
        if seg_image is not None:
            labels = to_brats2023(np.asanyarray(seg_image.dataobj), case.files[SEG].name, case.legacy_naming, label4)
            if isinstance(labels, str):
                raise CaseError(f"{case.case_id}: {labels}")
            truth = np.ascontiguousarray(orientations.apply_orientation(labels, forward))
    except (OSError, EOFError, ValueError) as error:  # truncated or corrupt gzip data
        raise CaseError(f"{case.case_id}: unreadable voxel data ({error})") from None
    if volumes.dtype.kind == "f" and not np.isfinite(volumes).all():
        raise CaseError(f"{case.case_id}: NaN or infinite voxels in the input volumes")
    return CaseVolumes(case.case_id, tuple(channels), volumes, truth, tuple(spacing),  # type: ignore[arg-type]
                       images[0], back, case.legacy_naming)


def labels_of(probs: np.ndarray, task: str) -> np.ndarray:
    """BraTS label values (uint8) from a volume's (outputs, X, Y, Z) probabilities (binary models write
    BINARY_LABEL for tumour)."""
    labels = classes(torch.from_numpy(probs)[None], task)[0].numpy().astype(np.uint8)
    return labels if task != "binary" else labels * BINARY_LABEL


def write_labels(labels: np.ndarray, case: CaseVolumes, path: Path, et_label: int = 3, description: str = "") -> None:
    """``labels`` (training orientation) as a uint8 NIfTI in the case's own space, enhancing tumour written as
    ``et_label`` (4 in the 2018-2021 convention), ``description`` in the header's descrip field (at most 80 ASCII
    characters); atomic, nothing partial left."""
    written = case.in_input_space(labels)
    if et_label != 3:
        written = np.where(written == 3, np.uint8(et_label), written)
    _write_volume(written.astype(np.uint8), case, path, description)


def write_map(values: np.ndarray, case: CaseVolumes, path: Path, description: str = "") -> None:
    """A voxel map (training orientation; an uncertainty map) as a float32 NIfTI in the case's own space."""
    _write_volume(case.in_input_space(values).astype(np.float32), case, path, description)


def _write_volume(written: np.ndarray, case: CaseVolumes, path: Path, description: str) -> None:
    """``written`` (input space) with the case's affine and header, its own dtype, unscaled; atomic."""
    nib = nibabel()
    header = case.reference.header.copy()
    header.set_data_dtype(written.dtype)
    header.set_slope_inter(1, 0)
    header["descrip"] = description.encode("ascii")
    with atomic_output(path, suffix=".nii.gz") as partial:  # the suffix tells nibabel to compress
        nib.save(nib.Nifti1Image(written, case.reference.affine, header), partial)


def score(labels: np.ndarray, case: CaseVolumes, task: str) -> dict[str, float]:
    """The whole-volume scores of ``trainer.scoring.brats`` and how long they took, computed in the case's own voxel
    order and spacing, as the challenge's code computes them on the files."""
    return score_in_input_space(case.in_input_space(labels), case, task)


def score_in_input_space(labels: np.ndarray, case: CaseVolumes, task: str) -> dict[str, float]:
    """``score`` of labels already in the case's own voxel order (a mask read back from its file; ET as 3 or 4)."""
    started = time.perf_counter()
    assert case.truth is not None
    labels = np.where(labels == 4, np.uint8(3), labels)
    scores = score_case(labels, case.in_input_space(case.truth), case.input_spacing, region_names(task))
    return {**scores, "score_seconds": round(time.perf_counter() - started, 3)}

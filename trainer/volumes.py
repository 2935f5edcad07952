"""Whole volumes through a 2D model: read a case in the training data's orientation, segment its brain slices,
and map the labels back to the case's own space.

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
from tqdm.auto import tqdm

from builder.format import DEFAULT_AXIS_CODES, DEFAULT_VOXEL_SIZE, SEG
from builder.labels import to_brats2023
from builder.layout import Case
from trainer.cleanup import CleanUp, clean_up
from trainer.config import FitConfig, FitError
from trainer.metrics import region_names
from trainer.pipeline import Batches, autocast_context, autocast_dtype
from trainer.reports import atomic_output
from trainer.scoring import score_case

#: Binary (whole tumour) models write this label: the oedema value, the largest part of most tumours.
BINARY_LABEL = 2
#: Voxel sizes that differ by less than this share are the same (headers store float32 zooms).
SPACING_TOLERANCE = 0.01


class CaseError(Exception):
    """A case that cannot be segmented or scored as asked; one line naming the case and the reason."""


def nibabel() -> Any:
    try:
        import nibabel as nib
    except ImportError:
        raise FitError("reading NIfTI volumes needs nibabel: pip install 'brats2d[predict]'") from None
    return nib


@dataclass(frozen=True)
class Geometry:
    """The orientation, voxel size and slice shape a model was trained at (from its run configuration)."""

    axis_codes: tuple[str, ...] = DEFAULT_AXIS_CODES
    voxel_size: tuple[float, ...] = DEFAULT_VOXEL_SIZE
    slice_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, config: FitConfig) -> Geometry:
        """A run's geometry; runs made before it was recorded trained on BraTS's LPS, 1 mm volumes."""
        return cls(tuple(config.axis_codes or DEFAULT_AXIS_CODES), tuple(config.voxel_size or DEFAULT_VOXEL_SIZE),
                   tuple(config.slice_shape) if config.slice_shape else None)


@dataclass
class CaseVolumes:
    """One case's volumes in the training orientation, and what it takes to write results in its own space."""

    case_id: str
    images: np.ndarray  # (C, X, Y, Z), as stored (raw values)
    truth: np.ndarray | None  # (X, Y, Z) uint8 BraTS 2023 labels, when the case has a seg
    spacing: tuple[float, float, float]  # mm, along the training orientation's axes
    reference: Any  # the first channel's image as given: predictions are written in its space
    to_input: np.ndarray  # nibabel orientation transform from the training orientation back to the input's

    def in_input_space(self, labels: np.ndarray) -> np.ndarray:
        return nibabel().orientations.apply_orientation(labels, self.to_input)


def read_case(case: Case, channels: Sequence[str], geometry: Geometry, label4: str = "auto") -> CaseVolumes:
    """The case's channels (and seg, if any) reoriented to ``geometry``; CaseError when they cannot match it."""
    nib = nibabel()
    orientations = nib.orientations
    missing = [case.files[c].name for c in channels if not case.files[c].is_file()]
    if missing:
        raise CaseError(f"{case.case_id}: missing {', '.join(missing)}")
    paths = [case.files[c] for c in channels]
    has_seg = case.files[SEG].is_file()
    try:
        images = [nib.load(path) for path in paths]
        seg_image = nib.load(case.files[SEG]) if has_seg else None
    except Exception as error:  # nibabel raises several types for unreadable headers
        raise CaseError(f"{case.case_id}: unreadable NIfTI ({error})") from None
    every = images + ([seg_image] if seg_image is not None else [])
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
    shape = orientations.apply_orientation(np.empty(images[0].shape, dtype=np.uint8), forward).shape
    if geometry.slice_shape is not None and tuple(shape[:2]) != tuple(geometry.slice_shape):
        raise CaseError(f"{case.case_id}: slices of {shape[0]}x{shape[1]} voxels, the model was trained on "
                        f"{geometry.slice_shape[0]}x{geometry.slice_shape[1]}")
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
    return CaseVolumes(case.case_id, volumes, truth, tuple(spacing), images[0], back)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Segmentation:
    """A model's class probabilities over a volume, and what the pass cost."""

    probabilities: np.ndarray  # (classes, X, Y, Z) float16
    brain_slices: int
    seconds: float

    @property
    def slices_per_second(self) -> float:
        return self.brain_slices / self.seconds if self.seconds > 0 else float("inf")


def segment(model: torch.nn.Module, config: FitConfig, images: np.ndarray, device: torch.device,
            batch_size: int = 32, progress: bool = True) -> Segmentation:
    """Class probabilities for a (C, X, Y, Z) stack, slice by slice; slices with no brain skip the network."""
    started = time.perf_counter()
    _, x, y, z = images.shape
    brain = np.flatnonzero(images.reshape(-1, z).any(axis=0))
    probabilities = np.zeros((config.classes, x, y, z), dtype=np.float16)
    probabilities[0] = 1  # background wherever the network does not look
    batches = Batches(config, (x, y), device)
    with torch.no_grad(), autocast_context(device, autocast_dtype(device, config.amp)), \
            tqdm(total=len(brain), unit="slice", disable=None if progress else True, leave=False) as bar:
        for start in range(0, len(brain), batch_size):
            zs = brain[start : start + batch_size]
            stack = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images[..., zs], -1, 0)))
            inputs, target = batches.inputs(stack, torch.zeros(len(zs), x, y, dtype=torch.uint8))
            softmax = batches.crop(model(inputs), target).float().softmax(1).half().cpu().numpy()
            probabilities[..., zs] = np.moveaxis(softmax, 0, -1)
            bar.update(len(zs))
    return Segmentation(probabilities, len(brain), time.perf_counter() - started)


def labels_of(classes: np.ndarray, task: str) -> np.ndarray:
    """BraTS label values from class indices (binary models write BINARY_LABEL for tumour)."""
    labels = np.asarray(classes).astype(np.uint8)
    return labels if task == "multiclass" else labels * BINARY_LABEL


def write_labels(labels: np.ndarray, case: CaseVolumes, path: Path) -> None:
    """``labels`` (training orientation) as a uint8 NIfTI in the case's own space; atomic, nothing partial left."""
    nib = nibabel()
    header = case.reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    with atomic_output(path, suffix=".nii.gz") as partial:  # the suffix tells nibabel to compress
        nib.save(nib.Nifti1Image(case.in_input_space(labels), case.reference.affine, header), partial)


def segment_case(model: torch.nn.Module, config: FitConfig, case: CaseVolumes, device: torch.device,
                 rule: CleanUp | None, progress: bool = True) -> tuple[np.ndarray, Segmentation]:
    """Labels of a whole case (training orientation), cleaned up by ``rule`` unless it is None."""
    result = segment(model, config, case.images, device, progress=progress)
    labels = labels_of(result.probabilities.argmax(0), config.task)
    return (labels if rule is None else clean_up(labels, rule)), result


def score(labels: np.ndarray, case: CaseVolumes, task: str) -> dict[str, float]:
    """The whole-volume scores of ``trainer.scoring`` and how long they took."""
    started = time.perf_counter()
    assert case.truth is not None
    scores = score_case(labels, case.truth, case.spacing, region_names(task))
    return {**scores, "score_seconds": round(time.perf_counter() - started, 3)}

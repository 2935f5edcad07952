"""Whole volumes through a 2D model: read a case in the training data's orientation, segment its brain slices in the
run's plane (each with its neighbouring slices when the run has context), and map the labels back to the case's own
space.

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
from builder.layout import Case
from builder.progress import Progress
from trainer.config import FitConfig, FitError
from trainer.metrics import region_names
from trainer.pipeline import Batches, autocast_context, autocast_dtype
from trainer.reports import atomic_output
from trainer.scoring import score_case
from trainer.tasks import classes, encode, probabilities

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
    images: np.ndarray  # (C, X, Y, Z), as stored (raw values)
    truth: np.ndarray | None  # (X, Y, Z) uint8 BraTS 2023 labels, when the case has a seg
    spacing: tuple[float, float, float]  # mm, along the training orientation's axes
    reference: Any  # the first channel's image as given: predictions are written in its space
    to_input: np.ndarray  # nibabel orientation transform from the training orientation back to the input's
    legacy_naming: bool = False  # a 2018-2021 naming, whose label maps write ET as 4

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
    return CaseVolumes(case.case_id, volumes, truth, tuple(spacing), images[0], back,  # type: ignore[arg-type]
                       case.legacy_naming)


@dataclass(frozen=True)
class Segmentation:
    """A model's probabilities (``trainer.tasks``) over a volume, and what the pass cost."""

    probabilities: np.ndarray  # (outputs, X, Y, Z) float16
    brain_slices: int
    seconds: float

    @property
    def slices_per_second(self) -> float:
        return self.brain_slices / self.seconds if self.seconds > 0 else float("inf")


#: Test-time augmentation: each slice also mirrored along one, the other and both of its in-plane axes.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def context_stack(stack: np.ndarray, indices: np.ndarray, context: int) -> np.ndarray:
    """Network inputs for slices ``indices`` of a (C, H, W, S) stack: (len(indices), C * (2K + 1), H, W), each
    channel's slices from ``-context`` to ``+context`` in order, zeros beyond the volume's edges: the rule the
    builder stores neighbours by (``trainer.data.with_context``)."""
    offsets = np.arange(-context, context + 1)
    at = indices[:, None] + offsets[None, :]
    inside = (at >= 0) & (at < stack.shape[-1])
    gathered = stack[..., np.clip(at, 0, stack.shape[-1] - 1)] * inside  # (C, H, W, n, 2K + 1)
    return np.ascontiguousarray(gathered.transpose(3, 0, 4, 1, 2)).reshape(len(indices), -1, *stack.shape[1:3])


def brain_box(brain: np.ndarray) -> tuple[slice, slice]:
    """The in-plane box holding every brain pixel of a volume's slices ((H, W): any slice's), grown to a multiple
    of 32 where the slice allows: outside it the network has nothing to see. One box for the whole volume, so that
    no slice's result depends on another's."""
    box = []
    for axis, size in ((1, brain.shape[0]), (0, brain.shape[1])):
        found = np.flatnonzero(brain.any(axis))
        start, length = int(found[0]), int(found[-1]) + 1 - int(found[0])
        wanted = min(size, length + (-length % 32))
        start = max(0, min(start - (wanted - length) // 2, size - wanted))
        box.append(slice(start, start + wanted))
    return box[0], box[1]


def empty_probabilities(task: str) -> np.ndarray:
    """(outputs,) probabilities that say "background" for certain, where the network does not look."""
    return encode(torch.zeros((1, 1), dtype=torch.long), task)[0, :, 0].numpy()


def segment(model: torch.nn.Module, config: FitConfig, images: np.ndarray, device: torch.device,
            batch_size: int = 16, progress: bool = True, tta: bool = False, box: bool = True) -> Segmentation:
    """The task's probabilities for a (C, X, Y, Z) stack, slice by slice in the run's plane, each slice with the
    run's ``context`` neighbours. Slices with no brain skip the network, which sees only the brain's bounding box
    (padded to a multiple of 32: about half of a BraTS slice; ``box=False``: whole slices, the previous
    release's pass, which benchmarks compare against). With ``tta``, probabilities are averaged over the slice and
    its mirror images along its in-plane axes (``TTA_FLIPS``: four passes)."""
    started = time.perf_counter()
    stack = np.moveaxis(images, 1 + config.slice_axis, -1)  # (C, H, W, S): slices along the run's axis
    brain = stack.any(axis=0)
    slices = np.flatnonzero(brain.any(axis=(0, 1)))
    out = np.empty((config.classes, *stack.shape[1:]), dtype=np.float16)
    out[:] = empty_probabilities(config.task)[:, None, None, None]
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    if slices.size:
        rows, cols = brain_box(brain.any(axis=2)) if box else (slice(None), slice(None))
        cropped = stack[:, rows, cols]
        batches = Batches(config, cropped.shape[1:3], device)
        starts = range(0, len(slices), batch_size)
        with torch.no_grad(), autocast_context(device, autocast_dtype(device, config.amp)):
            for start in Progress(starts, f"{len(slices)} {config.plane} slices", unit="batch", show=progress,
                                  leave=False):
                zs = slices[start : start + batch_size]
                stored = torch.from_numpy(context_stack(cropped, zs, config.context))
                no_labels = torch.zeros((len(zs), *stored.shape[-2:]), dtype=torch.uint8)

                def mirrored(dims: tuple[int, ...]) -> torch.Tensor:
                    inputs, target = batches.inputs(stored.flip(dims) if dims else stored, no_labels)
                    probs = probabilities(batches.crop(model(inputs), target).float(), config.task)
                    return probs.flip(dims) if dims else probs

                mean = sum(mirrored(dims) for dims in flips) / len(flips)
                out[:, rows, cols, zs] = mean.half().cpu().numpy().transpose(1, 2, 3, 0)
    return Segmentation(np.moveaxis(out, -1, 1 + config.slice_axis), len(slices), time.perf_counter() - started)


def labels_of(probs: np.ndarray, task: str) -> np.ndarray:
    """BraTS label values (uint8) from a volume's (outputs, X, Y, Z) probabilities (binary models write
    BINARY_LABEL for tumour)."""
    labels = classes(torch.from_numpy(probs)[None], task)[0].numpy().astype(np.uint8)
    return labels if task != "binary" else labels * BINARY_LABEL


def write_labels(labels: np.ndarray, case: CaseVolumes, path: Path, et_label: int = 3) -> None:
    """``labels`` (training orientation) as a uint8 NIfTI in the case's own space, enhancing tumour written as
    ``et_label`` (4 in the 2018-2021 convention); atomic, nothing partial left."""
    nib = nibabel()
    header = case.reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    written = case.in_input_space(labels)
    if et_label != 3:
        written = np.where(written == 3, np.uint8(et_label), written)
    with atomic_output(path, suffix=".nii.gz") as partial:  # the suffix tells nibabel to compress
        nib.save(nib.Nifti1Image(written, case.reference.affine, header), partial)


def score(labels: np.ndarray, case: CaseVolumes, task: str) -> dict[str, float]:
    """The whole-volume scores of ``trainer.scoring`` and how long they took, computed in the case's own voxel
    order and spacing, as the challenge's code computes them on the files."""
    started = time.perf_counter()
    assert case.truth is not None
    scores = score_case(case.in_input_space(labels), case.in_input_space(case.truth), case.input_spacing,
                        region_names(task))
    return {**scores, "score_seconds": round(time.perf_counter() - started, 3)}

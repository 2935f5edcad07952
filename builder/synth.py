"""Synthetic BraTS cases in the exact release layout, for the demo and the tests.

Real BraTS needs a Synapse login, so brats2d makes stand-ins: 240x240x155 volumes at 1 mm with the BraTS
affine, int16 images and a uint8 seg, named like the 2023 release (or the 2021 one). Each case is a
skull-stripped brain (grey matter, white matter, ventricles) with a tumour: a necrotic core (1) inside an
enhancing rim (3) inside oedema (2). Contrast follows real MRI, so single-modality models differ the way
they do on real data: oedema is bright on T2w and FLAIR, the rim enhances only on T1c, FLAIR cannot tell
the rim from oedema, and native T1 shows the tumour only faintly.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip

from builder.format import MODALITIES, SEG
from builder.layout import LAYOUTS

SHAPE = (240, 240, 155)
#: The SRI24 orientation BraTS volumes carry (LPS-flipped x and y).
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])

#: Voxel classes: background, tissue labels 1-3 of ``_brain``, then seg labels 1-3 shifted by 3.
CLASSES = ("background", "csf", "gm", "wm", "ncr", "ed", "et")
#: Mean intensity of each tissue per modality (arbitrary scanner units, like the real data).
CONTRAST: dict[str, dict[str, float]] = {
    "t1n": {"csf": 250, "gm": 480, "wm": 620, "ed": 545, "et": 560, "ncr": 400},
    "t1c": {"csf": 230, "gm": 470, "wm": 610, "ed": 440, "et": 1050, "ncr": 260},
    "t2w": {"csf": 1100, "gm": 650, "wm": 480, "ed": 900, "et": 760, "ncr": 1060},
    "t2f": {"csf": 120, "gm": 560, "wm": 470, "ed": 900, "et": 880, "ncr": 600},
}


@dataclass(frozen=True)
class Tumour:
    centre: np.ndarray
    radii: dict[str, float]  # outer radius in mm of the oedema, enhancing rim and necrotic core (0 = absent)
    wobble: np.ndarray  # per-region random shape coefficients


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = (np.arange(n, dtype=np.float32) for n in SHAPE)
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _smooth_field(rng: np.random.Generator, amplitude: float, at: tuple[np.ndarray, ...], waves: int = 3) -> np.ndarray:
    """A low-frequency random field at voxel coordinates ``at``: bias fields and tissue texture.

    A sum of separable products of 1D sine waves: smooth, random, and cheap to evaluate.
    """
    field = np.ones(np.broadcast_shapes(*(c.shape for c in at)), dtype=np.float32)
    for _ in range(waves):
        term = np.float32(amplitude / waves)
        for axis, coordinate in enumerate(at):
            wave = np.sin(np.arange(SHAPE[axis]) * rng.normal(0, 0.03) + rng.uniform(0, 2 * np.pi))
            term = term * wave.astype(np.float32)[coordinate.astype(np.intp)]
        field += term
    return field


def _brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue label per voxel (0 outside, 1 CSF, 2 GM, 3 WM) and the brain's centre."""
    x, y, z = _grid()
    centre = np.array([120, 118, 72]) + rng.normal(0, 3, 3)
    axes = np.array([68, 86, 64]) * rng.uniform(0.92, 1.08, 3)
    r = ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2
    tissue = np.zeros(SHAPE, dtype=np.uint8)
    tissue[r < 1] = 2
    tissue[r < 0.78 + 0.06 * (_smooth_field(rng, 1.0, (x, y, z)) - 1)] = 3
    for side in (-1, 1):  # lateral ventricles
        v = (
            ((x - centre[0] - side * 11) / 7) ** 2
            + ((y - centre[1] + 4) / 26) ** 2
            + ((z - centre[2] - 6) / 10) ** 2
        )
        tissue[v < 1] = 1
    return tissue, centre


def _tumour(rng: np.random.Generator, brain_centre: np.ndarray) -> Tumour:
    et = rng.uniform(7, 22)
    kind = rng.random()
    ncr = 0.0 if kind < 0.15 else et * rng.uniform(0.4, 0.75)
    if kind > 0.9:  # a low-grade-like tumour: oedema and core without enhancement
        et, ncr = 0.0, rng.uniform(5, 12)
    ed = max(et, ncr) * rng.uniform(1.4, 2.3)
    offset = rng.uniform(-1, 1, 3) * np.array([38, 45, 28])
    return Tumour(brain_centre + offset, {"ed": ed, "et": et, "ncr": ncr}, rng.normal(0, 0.12, (3, 4)))


def _labels(tumour: Tumour, tissue: np.ndarray) -> np.ndarray:
    """Seg labels inside a box around the tumour; irregular shapes, clipped to the brain."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    reach = int(tumour.radii["ed"] * 1.4) + 2
    lo = np.maximum(np.round(tumour.centre).astype(int) - reach, 0)
    hi = np.minimum(np.round(tumour.centre).astype(int) + reach + 1, SHAPE)
    axes = [np.arange(lo[i], hi[i], dtype=np.float32) - tumour.centre[i] for i in range(3)]
    dx, dy, dz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    distance = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-3
    ux, uy, uz = dx / distance, dy / distance, dz / distance
    box = seg[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for row, (region, value) in enumerate((("ed", 2), ("et", 3), ("ncr", 1))):
        radius = tumour.radii[region]
        if radius <= 0:
            continue
        a, b, c, d = tumour.wobble[row]
        shape = 1 + a * np.sin(3 * ux + 5 * d) + b * np.cos(4 * uy) + c * np.sin(5 * uz + 2 * a)
        box[distance < radius * shape] = value
    seg[tissue == 0] = 0
    return seg


def synth_case(case_index: int, seed: int) -> dict[str, np.ndarray]:
    """One case's five volumes, keyed by modality name and "seg"; the same for the same (index, seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, case_index]))
    tissue, centre = _brain(rng)
    seg = _labels(_tumour(rng, centre), tissue)
    inside = np.nonzero(tissue)  # intensities are computed on brain voxels only: the background stays 0
    classes = np.where(seg[inside] > 0, seg[inside] + 3, tissue[inside])
    texture = _smooth_field(rng, 0.08, inside, waves=4)
    volumes: dict[str, np.ndarray] = {SEG: seg}
    for modality in MODALITIES:
        lookup = np.array([CONTRAST[modality].get(name, 0) for name in CLASSES], dtype=np.float32)
        gain = np.float32(rng.uniform(0.6, 1.6))  # scanners differ: one reason to normalise per slice
        values = lookup[classes] * texture * _smooth_field(rng, 0.15, inside) * gain
        values += rng.standard_normal(values.shape, dtype=np.float32) * (18 * gain)
        volume = np.zeros(SHAPE, dtype=np.int16)
        volume[inside] = np.clip(np.round(values), 1, np.iinfo(np.int16).max)
        volumes[modality] = volume
    return volumes


def case_id(layout: str, index: int) -> str:
    return f"BraTS-GLI-{index:05d}-000" if layout == "brats2023" else f"BraTS2021_{index:05d}"


def write_case(out: Path, index: int, seed: int, layout: str = "brats2023", compressed: bool = True,
               name: str | None = None) -> Path:
    """Write one case folder under ``out`` (atomically: a half-written case never appears); ``name`` overrides the
    case id (any release's naming, e.g. ``Brats18_2013_11_1``)."""
    separator, suffixes = LAYOUTS[layout]
    name = name or case_id(layout, index)
    final = out / name
    staging = out / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    extension = ".nii.gz" if compressed else ".nii"
    for key, volume in synth_case(index, seed).items():
        if key == SEG and layout == "brats2021":
            volume = np.where(volume == 3, 4, volume).astype(np.uint8)  # ET was label 4 before 2023
        image = nib.Nifti1Image(volume, AFFINE)
        image.header.set_xyzt_units("mm", "sec")
        image.header.set_qform(AFFINE, code=1)
        image.header.set_sform(AFFINE, code=1)
        data = image.to_bytes()
        (staging / f"{name}{separator}{suffixes[key]}{extension}").write_bytes(
            igzip.compress(data, compresslevel=1) if compressed else data
        )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final

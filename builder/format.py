"""The HDF5 artifact's contract (datasets/FORMAT.md), shared by the builder and the trainer.

Standard library and numpy only: the trainer imports this module without needing nibabel or joblib.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 4
#: Versions readers accept: v1 files lack /background, the geometry attributes and patient-grouped splits;
#: v2 files lack the build id and the checksums of the row metadata and splits; v3 files hold axial slices only,
#: without neighbouring slices.
READABLE_VERSIONS = (1, 2, 3, 4)

#: Canonical BraTS 2023 modality names, in the order the builder stores and early fusion stacks them.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

#: Names users know from older releases and papers, mapped to the canonical ones.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1n",
    "t1ce": "t1c",
    "t1gd": "t1c",
    "t2": "t2w",
    "flair": "t2f",
}

LABELS: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

#: BraTS evaluation regions as sets of label values.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

SEG = "seg"
CASE_ID = "case_id"
SLICE_INDEX = "slice_index"
BACKGROUND = "background"
#: BraTS volumes are stored in this orientation (nibabel axis codes) at 1 mm; v1 files did not record it.
DEFAULT_AXIS_CODES: tuple[str, str, str] = ("L", "P", "S")
DEFAULT_VOXEL_SIZE: tuple[float, float, float] = (1.0, 1.0, 1.0)
SPLIT_GROUP = "split"
#: Neighbouring slices of each row (``--context K``, v4): ``/context/<modality>`` holds (N, 2K, H, W).
CONTEXT_GROUP = "context"
#: The most neighbouring slices on each side a file may hold: 8 is 17 slices per modality, 68 input channels.
MAX_CONTEXT = 8
#: Slicing planes, each named with the two axis-code letters of the axis it slices along (perpendicular to it).
PLANES: dict[str, str] = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Root attribute: a random id fixed when the file is built; runs record it and check it (v3).
DATA_ID = "data_id"
#: Every root attribute a build writes and what it records (datasets/FORMAT.md, "Root attributes"): the one table of
#: them. ``builder.checks.ATTRIBUTES`` says what the ones readers rely on must be; the trainer keeps all but
#: ``PEOPLE_ONLY`` as a run's record of its data.
ROOT_ATTRIBUTES: dict[str, str] = {
    "format_version": "the format's version (FORMAT_VERSION)",
    DATA_ID: "a random id drawn at build time (v3)",
    "modalities": "the stored modalities, in early fusion's order",
    "builder_version": "the brats2d version that wrote the file",
    "created": "ISO 8601 UTC time of the build",
    "seed": "seed of the split",
    "split_fractions": "the val and test fractions asked for",
    "split_unit": "what a split keeps together: patient (v2)",
    "slice_rule": "how rows were chosen, in words",
    "slices_per_case": "1, K or all",
    "min_tumour_voxels": "the fewest labelled voxels a tumour row has",
    "background_slices": "tumour-free slices asked for per case (v2)",
    "label4": "what seg label 4 was taken to mean (v2)",
    "plane": "the plane rows were sliced in (v4)",
    "slice_axis": "the volume axis rows were taken along (v4)",
    "context": "neighbouring slices stored on each side of every row (v4)",
    "axis_codes": "nibabel axis codes of the stored volumes (v2)",
    "voxel_size": "voxel size in mm along those axes (v2)",
    "source": "the name of the folder the cases came from",
    "source_layouts": "the naming families found",
    "cases_scanned": "case folders found",
    "cases_written": "cases with rows",
    "skipped": "every case left out and why",
    "compression": "the row datasets' filters, in words",
}
#: Root attributes kept for people reading the file, not copied into runs: a list as long as the skipped cases.
PEOPLE_ONLY = ("skipped",)
#: Attributes are decoded only within these bounds: a crafted file cannot exhaust memory or the parser's stack.
MAX_ATTRIBUTE_CHARS = 4_000_000
MAX_ATTRIBUTE_DEPTH = 8


class BadAttribute(ValueError):
    """A root attribute that is not what the format allows (too large, too deep, not JSON)."""


def canonical_modality(name: str) -> str:
    """Return the canonical name for a modality or alias; raise ValueError listing the valid names."""
    key = name.strip().lower()
    key = MODALITY_ALIASES.get(key, key)
    if key not in MODALITIES:
        valid = ", ".join(MODALITIES + tuple(MODALITY_ALIASES))
        raise ValueError(f"unknown modality {name!r}; valid names: {valid}")
    return key


def slice_axis(axis_codes: tuple[str, ...] | list[str], plane: str) -> int:
    """The volume axis that ``plane`` slices along, worked out from the volume's nibabel axis codes (BraTS's L, P, S:
    axial 2, coronal 1, sagittal 0); rows are ``np.take(volume, index, axis)``."""
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; valid: {', '.join(PLANES)}")
    for axis, code in enumerate(axis_codes):
        if str(code).upper() in PLANES[plane]:
            return axis
    raise ValueError(f"axis codes {''.join(map(str, axis_codes))} name no {plane} axis")


def context_offsets(context: int) -> list[int]:
    """Positions of the neighbouring slices of a row, relative to it, in the order ``/context/<m>`` stores them."""
    return [*range(-context, 0), *range(1, context + 1)]


def decode_attribute(value: object, name: str = "attribute") -> object:
    """An HDF5 root attribute as Python: JSON text (lists, objects) parsed, numpy scalars made plain.

    Raises BadAttribute for text over MAX_ATTRIBUTE_CHARS, nesting deeper than MAX_ATTRIBUTE_DEPTH, bad JSON,
    or anything that is not a string or a number (the format never stores arrays or objects there).
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_CHARS:
            raise BadAttribute(f"attribute {name} holds {len(value)} characters (at most {MAX_ATTRIBUTE_CHARS})")
        if value[:1] not in ("[", "{"):
            return value
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            raise BadAttribute(f"attribute {name} is not valid JSON, or nests too deeply") from None
        if _depth(decoded) > MAX_ATTRIBUTE_DEPTH:
            raise BadAttribute(f"attribute {name} nests deeper than {MAX_ATTRIBUTE_DEPTH} levels")
        return decoded
    if isinstance(value, (np.integer, np.floating, int, float)) and not isinstance(value, bool):
        return value.item() if hasattr(value, "item") else value
    raise BadAttribute(f"attribute {name} is a {type(value).__name__}, not text or a number")


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def split_problem(splits: dict[str, np.ndarray], rows: int) -> str | None:
    """What is wrong with split indices for a file of ``rows`` rows, or None: each split must be integer row
    numbers, sorted, unique and in range, and no row may be in two splits."""
    for name, indices in splits.items():
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            return f"split {name} is not a list of integer row numbers"
        if indices.size and (indices[0] < 0 or indices[-1] >= rows or not np.all(np.diff(indices) > 0)):
            return f"split {name} holds row numbers that are unsorted, repeated or outside 0..{rows - 1}"
    every = np.concatenate([indices for indices in splits.values()])
    if np.unique(every).size != every.size:
        return "the splits share rows"
    return None


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, in hex: the exact identity of an artifact that results can name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()

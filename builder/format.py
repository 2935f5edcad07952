"""The HDF5 artifact's contract (datasets/FORMAT.md), shared by the builder and the trainer.

Standard library only: the trainer imports this module without needing nibabel or joblib.
"""

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 2
#: Versions readers accept: v1 files lack /background, the geometry attributes and patient-grouped splits.
READABLE_VERSIONS = (1, 2)

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
SPLITS: tuple[str, ...] = ("train", "val", "test")


def canonical_modality(name: str) -> str:
    """Return the canonical name for a modality or alias; raise ValueError listing the valid names."""
    key = name.strip().lower()
    key = MODALITY_ALIASES.get(key, key)
    if key not in MODALITIES:
        valid = ", ".join(MODALITIES + tuple(MODALITY_ALIASES))
        raise ValueError(f"unknown modality {name!r}; valid names: {valid}")
    return key


def decode_attribute(value: object) -> object:
    """An HDF5 root attribute as Python: JSON text (lists, objects) parsed, numpy scalars made plain."""
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value.item() if hasattr(value, "item") else value


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, in hex: the exact identity of an artifact that results can name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()

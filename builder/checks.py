"""What a readable artifact is (datasets/FORMAT.md), checked from its metadata without reading its rows: the one set
of checks that ``brats-build verify`` and the trainer's open share. Nothing here raises for a bad file: every
problem comes back as a line, so that ``verify`` can list them all and the trainer can stop on the first.
"""

from __future__ import annotations

import math
from typing import Any

import h5py
import numpy as np

from builder.format import (
    BACKGROUND,
    CASE_ID,
    CONTEXT_GROUP,
    DATA_ID,
    MAX_CONTEXT,
    MODALITIES,
    PLANES,
    READABLE_VERSIONS,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    BadAttribute,
    decode_attribute,
    slice_axis,
)


def _int(low: int, high: float = math.inf) -> Any:
    return lambda v: isinstance(v, int) and low <= v <= high


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _axis_codes(v: Any) -> bool:
    if not (isinstance(v, list) and len(v) == 3 and all(isinstance(c, str) and len(c) == 1 for c in v)):
        return False
    return all(sum(c.upper() in pair for c in v) == 1 for pair in ("LR", "AP", "SI"))


#: The attributes readers use and what each must be once decoded (others are kept for people, never trusted).
ATTRIBUTES: dict[str, tuple[Any, str]] = {
    "format_version": (lambda v: v in READABLE_VERSIONS, f"one of {READABLE_VERSIONS}"),
    "modalities": (lambda v: isinstance(v, list) and v and len(set(v)) == len(v) and set(v) <= set(MODALITIES),
                   f"a list of some of {', '.join(MODALITIES)}"),
    "axis_codes": (_axis_codes, "three axis codes, one of L/R, A/P and S/I each"),
    "voxel_size": (lambda v: isinstance(v, list) and len(v) == 3 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < math.inf for s in v),
                   "three positive voxel sizes in mm"),
    "context": (_int(0, MAX_CONTEXT), f"a whole number from 0 to {MAX_CONTEXT}"),
    "plane": (lambda v: v in PLANES, f"one of {', '.join(PLANES)}"),
    "slice_axis": (_int(0, 2), "0, 1 or 2"),
    DATA_ID: (_is_text, "text"),
    "seed": (_int(-(2**63)), "a whole number"),
    "cases_written": (_int(0), "a whole number"),
    "cases_scanned": (_int(0), "a whole number"),
    "background_slices": (_int(0), "a whole number"),
    "slices_per_case": (lambda v: v == "all" or _int(1)(v), "a whole number or 'all'"),
    "split_unit": (_is_text, "text"),
    "skipped": (lambda v: isinstance(v, list), "a list"),
}


def decoded_attributes(f: h5py.File) -> tuple[dict[str, Any], list[str]]:
    """Every root attribute decoded (``decode_attribute``: bounded JSON and text), and a line for each that is out
    of the format's bounds or not what ATTRIBUTES says it must be."""
    values, problems = {}, []
    for key in f.attrs:
        try:
            values[key] = decode_attribute(f.attrs[key], key)
        except (BadAttribute, OSError, TypeError, ValueError) as error:
            problems.append(str(error) if isinstance(error, BadAttribute) else f"attribute {key} is unreadable")
            continue
        check = ATTRIBUTES.get(key)
        if check is not None and not check[0](values[key]):
            problems.append(f"attribute {key} is {str(values[key])[:40]!r}, not {check[1]}")
    if "format_version" not in values:
        problems.append("no format_version attribute: not a brats2d artifact")
    if not problems and "plane" in values and "axis_codes" in values and \
            values.get("slice_axis", 2) != slice_axis(values["axis_codes"], values["plane"]):
        problems.append(f"attribute slice_axis {values['slice_axis']} is not the {values['plane']} axis of "
                        f"{''.join(values['axis_codes'])}")
    return values, problems


def format_problems(f: h5py.File) -> tuple[dict[str, Any], list[str]]:
    """The decoded attributes and what keeps the file from being one the format describes: the attributes' problems,
    else the structure's (which needs sound attributes to know what to expect). What `info` and the trainer's open
    stop on; `verify` goes on to the rows."""
    attributes, problems = decoded_attributes(f)
    return attributes, problems or structure_problems(f, attributes)


def foreign_storage(f: h5py.File) -> list[str]:
    """Links to other files, virtual datasets and datasets stored in external files: data that lives outside the
    artifact, so that its SHA-256 and build id would no longer say what a run read."""
    found = []

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            path = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{path} is a link to {link.filename}")
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(f"{path} is a link to {link.path}")
                continue
            item = group.get(name)
            if isinstance(item, h5py.Group):
                walk(item, path)
            elif isinstance(item, h5py.Dataset):
                if item.is_virtual:
                    found.append(f"{path} is a virtual dataset (its data lives in other files)")
                elif item.external:
                    found.append(f"{path} is stored in external files ({item.external[0][0]})")

    walk(f, "")
    return found


def structure_problems(f: h5py.File, attributes: dict[str, Any]) -> list[str]:
    """Every dataset the format requires, with the shape and dtype it must have for the rows ``/case_id`` counts."""
    problems = [f"{item}; a brats2d artifact holds its own data" for item in foreign_storage(f)]
    version = attributes.get("format_version", 0)
    modalities = attributes.get("modalities") or []
    context = attributes.get("context") or 0
    required = [*modalities, SEG, CASE_ID, SLICE_INDEX, *(f"{SPLIT_GROUP}/{s}" for s in SPLITS)]
    required += [BACKGROUND] if version >= 2 else []
    required += [f"{CONTEXT_GROUP}/{m}" for m in modalities] if context else []
    missing = [name for name in required if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        return problems + [f"/{name}: missing" for name in missing]
    if f[CASE_ID].ndim != 1 or f[CASE_ID].dtype.kind not in "SO":
        return problems + [f"/{CASE_ID}: not a list of case ids (shape {f[CASE_ID].shape}, dtype {f[CASE_ID].dtype})"]
    rows = f[CASE_ID].shape[0]
    seg = f[SEG]
    if seg.ndim != 3 or seg.shape[0] != rows:
        return problems + [f"/{SEG}: shape {seg.shape}, not ({rows}, H, W) for the {rows} case ids"]
    if seg.dtype != np.uint8:
        problems.append(f"/{SEG}: dtype {seg.dtype}, but label maps are stored as uint8 (0 to 3)")
    height, width = seg.shape[1:]
    for name in modalities:
        problems += _expect(f[name], (rows, height, width), "iuf")
        if context:
            problems += _expect(f[f"{CONTEXT_GROUP}/{name}"], (rows, 2 * context, height, width), "iuf")
    problems += _expect(f[SLICE_INDEX], (rows,), "iu")
    if BACKGROUND in f:
        problems += _expect(f[BACKGROUND], (rows,), "iub")
    for name in SPLITS:
        split = f[f"{SPLIT_GROUP}/{name}"]
        if split.ndim != 1 or split.dtype.kind not in "iu":
            problems.append(f"/{SPLIT_GROUP}/{name}: not a list of integer row numbers")
    return problems


def _expect(dataset: h5py.Dataset, shape: tuple[int, ...], kinds: str) -> list[str]:
    problems = []
    if dataset.shape != shape:
        problems.append(f"{dataset.name}: shape {dataset.shape}, not {shape} for the rows /case_id counts")
    if dataset.dtype.kind not in kinds:
        problems.append(f"{dataset.name}: dtype {dataset.dtype} holds no image values")
    return problems

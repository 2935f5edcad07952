"""The builder's HDF5 artifact (datasets/FORMAT.md) as the trainer sees it: its metadata read and checked once, its
identity (build id, SHA-256, the file on disk), and the patients of each split or cross-validation fold."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hdf5plugin  # noqa: F401  (registers the Blosc filter the builder compresses with)
import numpy as np

from builder.checks import format_problems
from builder.format import (
    BACKGROUND,
    CASE_ID,
    DATA_ID,
    DEFAULT_AXIS_CODES,
    DEFAULT_VOXEL_SIZE,
    FORMAT_VERSION,
    LABELS,
    PEOPLE_ONLY,
    READABLE_VERSIONS,
    ROOT_ATTRIBUTES,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    file_sha256,
    split_problem,
)
from builder.layout import patient_of
from builder.remote import address_sha256, is_address, open_h5, remote_stamp
from builder.split import fold_of
from trainer.errors import ArtifactError

FileStamp = tuple[int, int, int, int]
#: Where an artifact is read from: a local file, or (``str``, ``builder.remote.is_address``) an address streamed.
Location = Path | str


def location_of(data: Path | str) -> Location:
    """DATA as a location: an address stays the text it is (a ``Path`` would fold its ``//``), else a path."""
    return str(data) if is_address(str(data)) else Path(data)


def file_stamp(location: Location) -> FileStamp:
    """Device, inode, size and modification time (of an address: its size and ETag): they change when a build
    replaces or rewrites the file."""
    if is_address(str(location)):
        return remote_stamp(str(location))
    status = os.stat(location)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def replaced(path: Path | str) -> ArtifactError:
    return ArtifactError(f"{path}: the file was replaced or changed while this run read it; its rows may no longer "
                         "be the ones the run started with. Stopped here: restart (or --resume) on the new file")


def label_error(path: Path | str, row: int, case_id: str, value: int) -> ArtifactError:
    return ArtifactError(f"{path}: row {row} (case {case_id}) holds label {value}, outside 0..{len(LABELS) - 1}; "
                         "the file is damaged or not a brats2d artifact: check it with `brats-build verify`")


@dataclass(frozen=True)
class Artifact:
    """What the trainer needs to know about an artifact, read once from its metadata."""

    path: Location
    modalities: tuple[str, ...]
    rows: int
    slice_shape: tuple[int, int]
    splits: dict[str, np.ndarray]
    case_ids: np.ndarray
    slice_index: np.ndarray
    background: np.ndarray  # True for tumour-free rows added with --background-slices (none in v1 files)
    axis_codes: tuple[str, str, str] = DEFAULT_AXIS_CODES
    voxel_size: tuple[float, float, float] = DEFAULT_VOXEL_SIZE
    provenance: dict[str, object] = field(default_factory=dict)
    data_id: str | None = None  # the identity fixed at build time (format v3); None in older files
    stamp: FileStamp = (0, 0, 0, 0)
    plane: str = "axial"  # the plane rows were sliced in, along ``slice_axis`` of the volumes (v4; axial before)
    slice_axis: int = 2
    context: int = 0  # neighbouring slices stored on each side of every row (v4; none before)

    @classmethod
    def open(cls, path: Path | str) -> Artifact:
        """Read the metadata and check it cheaply: required datasets, readable version, bounded attributes, and
        splits that are sorted integer row numbers, disjoint and in range. ``path`` may be an address to stream
        (``builder.remote.open_h5``)."""
        path = location_of(path)
        if isinstance(path, Path) and not path.is_file():
            raise ArtifactError(f"{path}: no such file (build one with `make dataset` or `make demo`)")
        try:
            f = open_h5(path)
        except OSError as error:
            if isinstance(error, PermissionError) or not os.access(path, os.R_OK):
                raise ArtifactError(f"{path}: not readable by this user (permission denied); fix its permissions") from None
            raise ArtifactError(f"{path}: not an HDF5 file; build a dataset with `brats-build build`") from None
        with f:
            stamp = file_stamp(path)
            version = f.attrs.get("format_version")
            if version is None or SEG not in f or SPLIT_GROUP not in f:
                raise ArtifactError(f"{path}: not a brats2d artifact (no format_version, /seg or /split)")
            if not isinstance(version, (int, np.integer)) or int(version) not in READABLE_VERSIONS:
                raise ArtifactError(
                    f"{path}: format_version {str(version)[:20]}, this trainer reads "
                    f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild it with this version's `brats-build build` "
                    f"(format {FORMAT_VERSION})"
                )
            attributes, problems = format_problems(f)  # the checks `brats-build verify` runs, but the rows
            if problems:
                raise ArtifactError(f"{path}: {problems[0]}; the file is damaged or was edited: check it with "
                                    f"`brats-build verify {path}`, or rebuild it")
            provenance = {key: attributes[key] for key in ROOT_ATTRIBUTES
                          if key in attributes and key not in PEOPLE_ONLY}
            rows = f[SEG].shape[0]
            context = int(provenance.get("context") or 0)
            splits = {name: f[SPLIT_GROUP][name][()] for name in SPLITS}
            problem = split_problem(splits, rows)
            if problem:
                raise ArtifactError(f"{path}: {problem}; the file is damaged or was edited, rebuild it")
            return cls(
                path=path,
                modalities=tuple(provenance.get("modalities", [])),  # type: ignore[arg-type]
                rows=rows,
                slice_shape=tuple(f[SEG].shape[1:]),  # type: ignore[arg-type]
                splits={name: rows_.astype(np.int64) for name, rows_ in splits.items()},
                case_ids=f[CASE_ID].asstr()[()],
                slice_index=f[SLICE_INDEX][()],
                background=f[BACKGROUND][()].astype(bool) if BACKGROUND in f else np.zeros(rows, dtype=bool),
                axis_codes=tuple(provenance.get("axis_codes", DEFAULT_AXIS_CODES)),  # type: ignore[arg-type]
                voxel_size=tuple(provenance.get("voxel_size", DEFAULT_VOXEL_SIZE)),  # type: ignore[arg-type]
                provenance=provenance,
                data_id=provenance.get(DATA_ID),  # type: ignore[arg-type]
                stamp=stamp,
                plane=str(provenance.get("plane", "axial")),
                slice_axis=int(provenance.get("slice_axis", 2)),  # type: ignore[arg-type]
                context=context,
            )

    def check_unchanged(self) -> None:
        """Raise when the file at ``path`` is no longer the one opened (a build replaced it, or it was edited)."""
        try:
            unchanged = file_stamp(self.path) == self.stamp
        except OSError:
            unchanged = False
        if not unchanged:
            raise replaced(self.path)

    def check_identity(self, recorded_id: str | None, recorded_sha256: str | None, other_data: bool = False) -> str:
        """Hold a run to the file it trained on: by the build-time id, else by SHA-256 (files before v3).

        Returns how the file relates to the run ("the run's file", "another file, on purpose (--other-data)",
        or "not checked: ..."); raises ArtifactError naming both when they differ and ``other_data`` is False.
        """
        if recorded_id is None and recorded_sha256 is None:
            return "not checked: the run recorded no data identity (trained before brats2d recorded one)"
        if recorded_id is not None and self.data_id is not None:
            same, theirs, ours = recorded_id == self.data_id, f"id {recorded_id}", f"id {self.data_id}"
        elif recorded_sha256 is not None:
            sha256 = self.sha256()
            same, theirs, ours = recorded_sha256 == sha256, f"sha256 {recorded_sha256[:16]}...", f"sha256 {sha256[:16]}..."
        else:
            return "not checked: the run recorded only a build id and this file has none"
        if same:
            return "the run's file"
        if other_data:
            return f"another file, on purpose (--other-data): the run trained on {theirs}, this is {ours}"
        raise ArtifactError(f"{self.path}: not the file this run trained on (run: {theirs}; file: {ours}), so its "
                            "splits may hold training cases; use the run's file, or --other-data to score this one "
                            "on purpose")

    def with_folds(self, folds: int, fold: int) -> Artifact:
        """This file seen by cross-validation fold ``fold`` of ``folds``: the train and val patients are pooled and
        grouped into folds by their keyed rank (``builder.split.fold_of``: stable when cases are added); the fold's
        patients become the val split (held out), the others the train split; the test patients never enter."""
        pool = np.union1d(self.splits["train"], self.splits["val"])
        seed = int(self.provenance.get("seed") or 0)  # type: ignore[call-overload]
        assigned = np.array([fold_of(patient_of(str(self.case_ids[row])), seed, folds) for row in pool], dtype=int)
        held = pool[assigned == fold]
        if held.size == 0 or held.size == pool.size:
            patients = len({patient_of(str(c)) for c in self.case_ids[pool]})
            raise ArtifactError(f"{self.path}: fold {fold} of {folds} would hold {'no' if held.size == 0 else 'every'} "
                                f"patient ({patients} patients in train and val); use fewer --folds")
        return dataclasses.replace(self, splits={"train": pool[assigned != fold], "val": held,
                                                 "test": self.splits["test"]})

    def sha256(self) -> str:
        """The file's SHA-256: the exact artifact a result came from (see ``brats-build info``); of a streamed
        address, the one its publisher gave (hashing it would read every byte)."""
        if isinstance(self.path, str):
            return address_sha256(self.path) or ""
        return file_sha256(self.path)

    def cases_of(self, split: str) -> list[str]:
        """The sorted case ids with rows in ``split``."""
        return sorted(set(self.case_ids[self.splits[split]].tolist()))

    def rows_of(self, split: str) -> np.ndarray:
        rows = self.splits[split]
        if len(rows) == 0:
            raise ArtifactError(f"{self.path}: the {split} split has no rows; rebuild with a larger --{split}-fraction")
        return rows

    def require(self, channels: Sequence[str], context: int = 0) -> None:
        """Refuse a run that needs modalities, or more neighbouring slices, than the file holds."""
        missing = [c for c in channels if c not in self.modalities]
        if missing:
            raise ArtifactError(f"{self.path}: no modality {', '.join(missing)} (it holds {', '.join(self.modalities)})")
        if context > self.context:
            raise ArtifactError(f"{self.path}: holds {self.context} neighbouring slice(s) on each side, the run asks for "
                                f"--context {context}; use --context {self.context} or less, or rebuild with "
                                f"`brats-build build ... --context {context}`")

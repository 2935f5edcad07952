"""Stream rows of the builder's HDF5 artifact (datasets/FORMAT.md) into batches, never the whole file into RAM.

Each DataLoader worker opens the file itself, read-only and lazily (h5py handles survive neither pickling nor
fork), reads only the modalities the run needs, one chunk per modality per row, and returns the stored dtype:
conversion to float and normalisation happen on the device (``trainer.transforms``), where they are cheap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter the builder compresses with)
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from builder.checks import format_problems
from builder.format import (
    BACKGROUND,
    CASE_ID,
    CONTEXT_GROUP,
    DATA_ID,
    DEFAULT_AXIS_CODES,
    DEFAULT_VOXEL_SIZE,
    FORMAT_VERSION,
    LABELS,
    READABLE_VERSIONS,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    file_sha256,
    split_problem,
)
from builder.layout import patient_of
from builder.split import fold_of

#: Stored dtypes torch cannot hold are widened in the worker; the rest travel as stored.
_TORCH_UNSUPPORTED = {np.dtype("uint16"), np.dtype("uint32"), np.dtype("uint64")}


class ArtifactError(Exception):
    """The file is not a usable brats2d artifact; the message is one line naming the file and the fix."""


#: The root attributes the trainer reads (others, such as the list of skipped cases, are never decoded).
_ATTRIBUTES = ("format_version", "modalities", "axis_codes", "voxel_size", DATA_ID, "builder_version", "created",
               "seed", "source", "slice_rule", "cases_written", "background_slices", "split_unit", "compression",
               "plane", "slice_axis", "context")

FileStamp = tuple[int, int, int, int]


def file_stamp(path: Path | str) -> FileStamp:
    """Device, inode, size and modification time: they change when a build replaces or rewrites the file."""
    status = os.stat(path)
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

    path: Path
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
        splits that are sorted integer row numbers, disjoint and in range."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file (build one with `make dataset` or `make demo`)")
        try:
            f = h5py.File(path, "r")
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
            provenance = {key: attributes[key] for key in _ATTRIBUTES if key in attributes}
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
        """The file's SHA-256: the exact artifact a result came from (see ``brats-build info``)."""
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


def neighbours_kept(stored: int, wanted: int) -> slice:
    """Which of a row's ``2 * stored`` neighbouring slices (``context_offsets(stored)``) a run with ``wanted`` on each
    side reads: the ``wanted`` nearest on each side, in the same order."""
    return slice(stored - wanted, stored + wanted)


def with_context(center: np.ndarray, neighbours: np.ndarray | None, context: int) -> np.ndarray:
    """(C, H, W) slices and their (C, 2K, H, W) neighbours as one (C * (2K + 1), H, W) stack: each channel's
    slices in order, from ``-context`` to ``+context`` (the network's input channels)."""
    if not context:
        return center
    assert neighbours is not None
    return np.concatenate([neighbours[:, :context], center[:, None], neighbours[:, context:]], 1).reshape(
        -1, *center.shape[1:])


class SliceDataset(Dataset):
    """Rows ``rows`` of the artifact: (image (C, H, W) in the stored dtype, seg (H, W) uint8, row index).

    With ``context`` K, each channel comes with its K neighbouring slices on each side (``with_context``): C becomes
    channels x (2K + 1). With a ``stamp`` (``file_stamp`` when the run opened the file), a worker that opens a
    replaced file stops instead of reading rows the run never chose. Every label read is checked to lie in 0..3.
    """

    def __init__(self, path: Path | str, rows: np.ndarray, channels: Sequence[str], stamp: FileStamp | None = None,
                 context: int = 0, stored_context: int = 0) -> None:
        self.path = str(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.channels = tuple(channels)
        self.stamp = stamp
        self.context = context
        self.kept = neighbours_kept(stored_context, context)
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> dict[str, h5py.Dataset]:
        if self._datasets is None or self._pid != os.getpid():  # a forked worker must not share the parent's handle
            # rdcc_nbytes=0: each row is one whole chunk, so a chunk cache only costs copies and memory.
            f = h5py.File(self.path, "r", rdcc_nbytes=0)
            if self.stamp is not None and file_stamp(self.path) != self.stamp:
                f.close()
                raise replaced(self.path)
            names = (*self.channels, SEG, CASE_ID, *(f"{CONTEXT_GROUP}/{c}" for c in self.channels if self.context))
            self._datasets = {name: f[name] for name in names}  # looked up once, not per row
            self._pid = os.getpid()
        return self._datasets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        datasets = self._open()
        row = int(self.rows[index])
        image = np.stack([datasets[c][row] for c in self.channels])  # one chunk per channel, never fancy indexing
        if self.context:  # one more chunk per channel: its neighbouring slices
            neighbours = np.stack([datasets[f"{CONTEXT_GROUP}/{c}"][row][self.kept] for c in self.channels])
            image = with_context(image, neighbours, self.context)
        if image.dtype in _TORCH_UNSUPPORTED:
            image = image.astype(np.float32)
        seg = datasets[SEG][row]
        if seg.max() >= len(LABELS):  # about 5 us a row
            raise label_error(self.path, row, datasets[CASE_ID].asstr()[row], int(seg.max()))
        return torch.from_numpy(image), torch.from_numpy(seg), row

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_datasets"], state["_pid"] = None, -1  # h5py handles cannot be pickled (spawn/forkserver workers)
        return state


class ShardSampler(Sampler[int]):
    """Every index once, split round-robin across ranks without padding, so reduced metrics are exact."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: SliceDataset,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset``: shuffled by epoch for training (``set_epoch``), sharded across ranks.

    Training drops the last incomplete batch (a different few rows each epoch): one batch shape means no
    recompilation under torch.compile and no BatchNorm step on a batch of one.
    """
    if train:
        sampler: Sampler[int] = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


class DeviceCache:
    """A whole split resident on the device: batches are drawn there, with no workers and no host copies.

    For files whose needed modalities fit comfortably in device memory (one densest slice per case is
    about 115 kB per modality at int16). Iterates like a DataLoader over the same sampler logic.
    """

    def __init__(self, dataset: SliceDataset, batch_size: int, train: bool, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        with h5py.File(dataset.path, "r") as f:
            rows = dataset.rows
            images = np.stack([_read_rows(f[c], rows) for c in dataset.channels], axis=1)
            if dataset.context:
                neighbours = np.stack([_read_rows(f[f"{CONTEXT_GROUP}/{c}"], rows)[:, dataset.kept]
                                       for c in dataset.channels], axis=1)
                images = np.stack([with_context(one, around, dataset.context) for one, around in zip(images, neighbours)])
            labels = _read_rows(f[SEG], rows)
            bad = np.flatnonzero(labels.reshape(len(rows), -1).max(1) >= len(LABELS))
            if bad.size:
                row = int(rows[bad[0]])
                raise label_error(dataset.path, row, f[CASE_ID].asstr()[row], int(labels[bad[0]].max()))
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.rows = torch.from_numpy(rows)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.sampler = (
            DistributedSampler(range(len(rows)), world_size, rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
            if train
            else ShardSampler(len(rows), rank, world_size)
        )

    def __len__(self) -> int:
        whole, rest = divmod(len(self.sampler), self.batch_size)
        return whole + (1 if rest and not self.train else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):  # like make_loader: drop_last in training
            index = order[start : start + self.batch_size]
            on_device = index.to(self.images.device)
            yield self.images[on_device], self.labels[on_device], self.rows[index]

    @staticmethod
    def nbytes(path: Path, rows: int, channels: Sequence[str], context: int = 0) -> int:
        with h5py.File(path, "r") as f:
            per_row = sum(f[c].dtype.itemsize for c in channels) * (2 * context + 1) + 1
            return rows * per_row * int(np.prod(f[SEG].shape[1:]))


def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows one at a time into one array (fancy indexing costs ~11 ms a row in h5py)."""
    out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    for i, row in enumerate(rows):
        dataset.read_direct(out, np.s_[int(row)], np.s_[i])
    return out

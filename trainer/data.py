"""Stream rows of the builder's HDF5 artifact (datasets/FORMAT.md) into batches, never the whole file into RAM.

Each DataLoader worker opens the file itself, read-only and lazily (h5py handles survive neither pickling nor
fork), reads only the modalities the run needs, one chunk per modality per row, and returns the stored dtype:
conversion to float and normalisation happen on the device (``trainer.transforms``), where they are cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter the builder compresses with)
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from builder.format import (
    BACKGROUND,
    CASE_ID,
    DEFAULT_AXIS_CODES,
    DEFAULT_VOXEL_SIZE,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    SEG,
    SLICE_INDEX,
    SPLIT_GROUP,
    SPLITS,
    decode_attribute,
    file_sha256,
)

#: Stored dtypes torch cannot hold are widened in the worker; the rest travel as stored.
_TORCH_UNSUPPORTED = {np.dtype("uint16"), np.dtype("uint32"), np.dtype("uint64")}


class ArtifactError(Exception):
    """The file is not a usable brats2d artifact; the message is one line naming the file and the fix."""


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

    @classmethod
    def open(cls, path: Path | str) -> Artifact:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file (build one with `make dataset` or `make demo`)")
        try:
            f = h5py.File(path, "r")
        except OSError:
            raise ArtifactError(f"{path}: not an HDF5 file; build a dataset with `brats-build build`") from None
        with f:
            version = f.attrs.get("format_version")
            if version is None or SEG not in f or SPLIT_GROUP not in f:
                raise ArtifactError(f"{path}: not a brats2d artifact (no format_version, /seg or /split)")
            if int(version) not in READABLE_VERSIONS:
                raise ArtifactError(
                    f"{path}: format_version {int(version)}, this trainer reads {', '.join(map(str, READABLE_VERSIONS))}; "
                    f"rebuild it with this version's `brats-build build` (format {FORMAT_VERSION})"
                )
            provenance = {key: decode_attribute(value) for key, value in f.attrs.items()}
            rows = f[SEG].shape[0]
            return cls(
                path=path,
                modalities=tuple(provenance.get("modalities", [])),
                rows=rows,
                slice_shape=tuple(f[SEG].shape[1:]),  # type: ignore[arg-type]
                splits={name: f[SPLIT_GROUP][name][()] for name in SPLITS},
                case_ids=f[CASE_ID].asstr()[()],
                slice_index=f[SLICE_INDEX][()],
                background=f[BACKGROUND][()].astype(bool) if BACKGROUND in f else np.zeros(rows, dtype=bool),
                axis_codes=tuple(provenance.get("axis_codes", DEFAULT_AXIS_CODES)),  # type: ignore[arg-type]
                voxel_size=tuple(provenance.get("voxel_size", DEFAULT_VOXEL_SIZE)),  # type: ignore[arg-type]
                provenance=provenance,
            )

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

    def require(self, channels: Sequence[str]) -> None:
        missing = [c for c in channels if c not in self.modalities]
        if missing:
            raise ArtifactError(f"{self.path}: no modality {', '.join(missing)} (it holds {', '.join(self.modalities)})")


class SliceDataset(Dataset):
    """Rows ``rows`` of the artifact: (image (C, H, W) in the stored dtype, seg (H, W) uint8, row index)."""

    def __init__(self, path: Path | str, rows: np.ndarray, channels: Sequence[str]) -> None:
        self.path = str(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.channels = tuple(channels)
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> dict[str, h5py.Dataset]:
        if self._datasets is None or self._pid != os.getpid():  # a forked worker must not share the parent's handle
            # rdcc_nbytes=0: each row is one whole chunk, so a chunk cache only costs copies and memory.
            f = h5py.File(self.path, "r", rdcc_nbytes=0)
            self._datasets = {name: f[name] for name in (*self.channels, SEG)}  # looked up once, not per row
            self._pid = os.getpid()
        return self._datasets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        datasets = self._open()
        row = int(self.rows[index])
        image = np.stack([datasets[c][row] for c in self.channels])  # one chunk per channel, never fancy indexing
        if image.dtype in _TORCH_UNSUPPORTED:
            image = image.astype(np.float32)
        return torch.from_numpy(image), torch.from_numpy(datasets[SEG][row]), row

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
            labels = _read_rows(f[SEG], rows)
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
    def nbytes(path: Path, rows: int, channels: Sequence[str]) -> int:
        with h5py.File(path, "r") as f:
            per_row = sum(f[c].dtype.itemsize for c in channels) + 1
            return rows * per_row * int(np.prod(f[SEG].shape[1:]))


def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows one at a time into one array (fancy indexing costs ~11 ms a row in h5py)."""
    out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    for i, row in enumerate(rows):
        dataset.read_direct(out, np.s_[int(row)], np.s_[i])
    return out

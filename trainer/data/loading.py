"""Stream rows of the artifact into batches, never the whole file into RAM, or hold a split on the device.

Both read rows through one ``RowReader``: each process opens the file itself, read-only and lazily (h5py handles
survive neither pickling nor fork), refuses a file replaced since the run opened it, reads only the modalities the
run needs, one chunk per modality per row, checks every label, and returns the stored dtype: conversion to float and
normalisation happen on the device (``trainer.data.transforms``), where they are cheap.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter the builder compresses with)
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from builder.format import CASE_ID, CONTEXT_GROUP, LABELS, SEG
from builder.remote import is_address, open_h5
from trainer.data.artifact import FileStamp, Location, file_stamp, label_error, replaced
from trainer.data.context import neighbours_kept, stack_context
from trainer.errors import ArtifactError

#: Stored dtypes torch cannot hold are widened when read; the rest travel as stored.
_TORCH_UNSUPPORTED = {np.dtype("uint16"), np.dtype("uint32"), np.dtype("uint64")}


class RowReader:
    """Rows of one artifact as a run reads them: (image (C, H, W) in the stored dtype, labels (H, W) uint8).

    With ``context`` K, each channel comes with its K neighbouring slices on each side (``stack_context``): C becomes
    channels x (2K + 1). With a ``stamp`` (``file_stamp`` when the run opened the file), a process that opens a
    replaced file stops instead of reading rows the run never chose. Every label read is checked to lie in 0..3.
    """

    def __init__(self, path: Location, channels: Sequence[str], stamp: FileStamp | None = None, context: int = 0,
                 stored_context: int = 0) -> None:
        self.path = str(path)  # a local file, or an address read in place by range requests (builder.remote.open_h5)
        self.channels = tuple(channels)
        self.stamp = stamp
        self.context = context
        self.kept = neighbours_kept(stored_context, context)
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._pid = -1

    def _open(self) -> dict[str, h5py.Dataset]:
        if self._datasets is None or self._pid != os.getpid():  # a forked worker must not share the parent's handle
            # rdcc_nbytes=0: each row is one whole chunk, so a chunk cache only costs copies and memory.
            f = open_h5(self.path, rdcc_nbytes=0)
            if self.stamp is not None and file_stamp(self.path) != self.stamp:
                f.close()
                raise replaced(self.path)
            names = (*self.channels, SEG, CASE_ID, *(f"{CONTEXT_GROUP}/{c}" for c in self.channels if self.context))
            self._datasets = {name: f[name] for name in names}  # looked up once, not per row
            self._pid = os.getpid()
        return self._datasets

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        datasets = self._open()
        try:
            image = np.stack([datasets[c][row] for c in self.channels])  # one chunk per channel, never fancy indexing
            if self.context:  # one more chunk per channel: its neighbouring slices
                neighbours = np.stack([datasets[f"{CONTEXT_GROUP}/{c}"][row][self.kept] for c in self.channels])
                image = stack_context(image, neighbours, self.context)
            labels = datasets[SEG][row]
        except OSError as error:  # h5py's words name neither the file nor the cause (streamed: builder.remote's do)
            raise self._failed(row, error) from None
        if image.dtype in _TORCH_UNSUPPORTED:
            image = image.astype(np.float32)
        if labels.max() >= len(LABELS):  # about 5 us a row
            raise label_error(self.path, row, datasets[CASE_ID].asstr()[row], int(labels.max()))
        return image, labels

    def _failed(self, row: int, error: OSError) -> ArtifactError:
        """A failed read as what it is: the file replaced under the run (its stamp changed), or damaged."""
        try:
            changed = self.stamp is not None and file_stamp(self.path) != self.stamp
        except OSError:
            changed = True
        if changed:
            return replaced(self.path)
        return ArtifactError(f"{self.path}: reading row {row} failed ({error.strerror or error}); the file is damaged: "
                             f"check it with `brats-build verify {self.path}`, or build it again")

    def close(self) -> None:
        if self._datasets is not None and self._pid == os.getpid():
            next(iter(self._datasets.values())).file.close()
        self._datasets, self._pid = None, -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_datasets"], state["_pid"] = None, -1  # h5py handles cannot be pickled (spawn/forkserver workers)
        return state


class SliceDataset(Dataset):
    """Rows ``rows`` of the artifact through ``reader``: (image, labels, row index) as tensors."""

    def __init__(self, reader: RowReader, rows: np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[index])
        image, labels = self.reader.read(row)
        return torch.from_numpy(image), torch.from_numpy(labels), row


class ShardSampler(Sampler[int]):
    """Every index once, split round-robin across ranks without padding, so reduced metrics are exact."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_sampler(length: int, train: bool, seed: int, rank: int = 0, world_size: int = 1) -> Sampler[int]:
    """Training: shuffled anew each epoch (``set_epoch``), sharded across ranks; evaluation: every row once, in
    order."""
    if train:
        return DistributedSampler(range(length), world_size, rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
    return ShardSampler(length, rank, world_size)


def make_loader(dataset: SliceDataset, batch_size: int, train: bool, workers: int, seed: int, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` with ``make_sampler``'s order.

    Training drops the last incomplete batch (a different few rows each epoch): one batch shape means no
    recompilation under torch.compile and no BatchNorm step on a batch of one. Workers of a streamed file are not
    forked from this process (``clean_workers``).
    """
    streamed = workers > 0 and is_address(dataset.reader.path)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=make_sampler(len(dataset), train, seed, rank, world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context=clean_workers() if streamed else None,
    )


def clean_workers() -> multiprocessing.context.BaseContext:
    """Where a streamed file's workers start: a worker forked from this process shares its asyncio epoll instance
    (fsspec's event loop), and when it drops its copy of the loop it unregisters this process's wake-up pipe, which
    left the next request here waiting for a timer (60 s, measured). A fork server is a fresh process that imports
    the loader once and forks the workers from itself (each starts in a fraction of a second); spawn where there is
    none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class DeviceCache:
    """A whole split resident on the device: batches are drawn there, with no workers and no host copies.

    For files whose needed modalities fit comfortably in device memory (one densest slice per case is
    about 115 kB per modality at int16). Iterates like ``make_loader``'s DataLoader, in ``make_sampler``'s order.
    """

    def __init__(self, dataset: SliceDataset, batch_size: int, train: bool, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        rows = dataset.rows
        read = [dataset.reader.read(int(row)) for row in rows]
        dataset.reader.close()
        self.images = torch.from_numpy(np.stack([image for image, _ in read])).to(device)
        self.labels = torch.from_numpy(np.stack([labels for _, labels in read])).to(device)
        self.rows = torch.from_numpy(rows)
        self.batch_size, self.train = batch_size, train
        self.sampler = make_sampler(len(rows), train, seed, rank, world_size)

    def __len__(self) -> int:
        whole, rest = divmod(len(self.sampler), self.batch_size)  # type: ignore[arg-type]
        return whole + (1 if rest and not self.train else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):  # like make_loader: drop_last in training
            index = order[start : start + self.batch_size]
            on_device = index.to(self.images.device)
            yield self.images[on_device], self.labels[on_device], self.rows[index]

    @staticmethod
    def nbytes(path: Location, rows: int, channels: Sequence[str], context: int = 0) -> int:
        with open_h5(path) as f:
            per_row = sum(f[c].dtype.itemsize for c in channels) * (2 * context + 1) + 1
            return rows * per_row * int(np.prod(f[SEG].shape[1:]))

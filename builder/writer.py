"""Write the HDF5 artifact atomically: rows go to a hidden temporary file that replaces OUT only when complete."""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import h5py
import hdf5plugin
import numpy as np

from builder.extract import CaseRows
from builder.format import BACKGROUND, CASE_ID, CONTEXT_GROUP, DATA_ID, MODALITIES, SEG, SLICE_INDEX, SPLIT_GROUP
from builder.processes import process_alive

#: The row datasets' compression, by name: what it is, the h5py filter arguments, and what a reader needs.
#: blosc-lz4 (default): about 3x smaller than raw int16 and still thousands of random rows/s
#: (benchmarks/bench_codecs.py; ../shared/PERFORMANCE.md), but readers need the Blosc plugin (``import hdf5plugin``).
#: gzip: HDF5's built-in deflate, readable by any HDF5 tool (h5py alone, h5ls, HDFView, MATLAB), slower to read.
COMPRESSIONS: dict[str, tuple[str, dict[str, object], str]] = {
    "blosc-lz4": ("blosc-lz4, byte shuffle, clevel 5 (hdf5plugin)",
                  dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)),
                  "the Blosc filter: `import hdf5plugin` in Python (pip install hdf5plugin), or HDF5_PLUGIN_PATH"),
    "gzip": ("gzip (HDF5 deflate) level 4, byte shuffle", {"compression": "gzip", "compression_opts": 4,
                                                            "shuffle": True}, "nothing beyond HDF5 (built-in filters)"),
    "none": ("none", {}, "nothing beyond HDF5"),
}
DEFAULT_COMPRESSION = "blosc-lz4"
#: HDF5's 1.10 file format (readers need HDF5 1.10 or later, 2016): its superblock, object headers, attribute heaps
#: and chunk indexes (extensible arrays) carry checksums, where the 1.8 format's B-trees and heaps carry none; with
#: fletcher32 on every chunk and every attribute stored in an object header (fixed-length text, no global heap),
#: every byte a reader uses is checked.
LIBVER = ("v110", "v110")
#: Metadata (object headers, chunk indexes) is allocated from blocks of this size, so that it lies together in a few
#: places instead of between the rows where the indexes grew: a remote reader opens the file in 4 range requests
#: instead of 14, for 0.5% more bytes (benchmarks/bench_remote.py; HDF5's paged file space measured worse there).
META_BLOCK = 4 << 20
_GROW = 256  # rows added at a time when the datasets fill up
_CHECKED = {"chunks": True, "fletcher32": True}  # small datasets: checksummed too, so verify catches damage there


class ArtifactWriter:
    """Stream case rows into a new artifact at ``out``; on any error the partial file is removed.

    Use as a context manager: leaving the block normally after ``finish`` publishes the file with an
    atomic rename; leaving it with an exception removes the temporary file and leaves ``out`` untouched.
    """

    def __init__(self, out: Path, compression: str = DEFAULT_COMPRESSION) -> None:
        self.out = out
        self.compression = compression
        # hidden, and this writer's own: the pid (which the next build checks before removing a stale one) and a
        # random part, so that two builds of one OUT never share a partial
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        # Whole chunks are written once: a chunk cache would only grow memory with the row count.
        self._file = h5py.File(self.tmp, "w", rdcc_nbytes=0, libver=LIBVER,
                               meta_block_size=META_BLOCK)  # OSError: OUT's folder is not writable
        self.rows = 0
        self.case_ids: list[str] = []
        self.slice_index: list[int] = []
        self.background: list[bool] = []
        self._datasets: dict[str, h5py.Dataset] = {}
        self._finished = False

    def __enter__(self) -> ArtifactWriter:
        return self

    def create(self, slice_shape: tuple[int, int], dtypes: dict[str, str], context: int = 0) -> None:
        """Create the row datasets: one per modality plus the seg, chunked one slice per chunk; with ``context`` K,
        also ``/context/<modality>`` with each row's 2K neighbouring slices in one chunk."""
        rows = [(name, dtypes[name], ()) for name in MODALITIES]
        if context:
            rows += [(f"{CONTEXT_GROUP}/{name}", dtypes[name], (2 * context,)) for name in MODALITIES]
        rows.append((SEG, "u1", ()))  # in the order a reader takes a row's chunks (trainer.data.loading.RowReader)
        for name, dtype, extra in rows:
            self._datasets[name] = self._file.create_dataset(
                name,
                shape=(0, *extra, *slice_shape),
                maxshape=(None, *extra, *slice_shape),
                dtype=np.dtype(dtype),
                chunks=(1, *extra, *slice_shape),
                fletcher32=True,
                **COMPRESSIONS[self.compression][1],  # type: ignore[arg-type]
            )

    def append(self, case: CaseRows) -> None:
        start, stop = self.rows, self.rows + len(case.slice_index)
        with _failed_writes_as_oserror():
            for dataset in self._datasets.values():
                if dataset.shape[0] < stop:
                    dataset.resize(stop + _GROW, axis=0)
            arrays = {name: _rows_of(case, name) for name in self._datasets}
            for offset in range(stop - start):  # row by row: a row's chunks lie together (one range request remotely)
                for name, dataset in self._datasets.items():
                    dataset[start + offset] = arrays[name][offset]
        self.case_ids.extend([case.case_id] * len(case.slice_index))
        self.slice_index.extend(case.slice_index.tolist())
        self.background.extend(case.background.tolist())
        self.rows = stop

    def finish(self, splits: dict[str, np.ndarray], attrs: dict[str, object]) -> None:
        """Trim the datasets, write the row metadata and splits (checksummed), the JSON attributes and a fresh
        build id, and flush: a full disk fails here, inside the block, so the partial file is removed."""
        with _failed_writes_as_oserror():
            self._finish(splits, attrs)
        self._finished = True

    def _finish(self, splits: dict[str, np.ndarray], attrs: dict[str, object]) -> None:
        f = self._file
        for dataset in self._datasets.values():
            dataset.resize(self.rows, axis=0)
        encoded = [case_id.encode("utf-8") for case_id in self.case_ids]
        text = h5py.string_dtype("utf-8", max(map(len, encoded), default=1))
        f.create_dataset(CASE_ID, data=np.array(encoded, dtype=text), **_CHECKED)
        f.create_dataset(SLICE_INDEX, data=np.asarray(self.slice_index, dtype=np.int32), **_CHECKED)
        f.create_dataset(BACKGROUND, data=np.asarray(self.background, dtype=np.uint8), **_CHECKED)
        group = f.create_group(SPLIT_GROUP)
        for name, rows in splits.items():
            group.create_dataset(name, data=rows.astype(np.int64), maxshape=(None,), **_CHECKED)
        for key, value in {**attrs, "compression": COMPRESSIONS[self.compression][0],
                           DATA_ID: uuid.uuid4().hex}.items():
            f.attrs.create(key, _attribute(value))
        f.flush()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            try:
                with _failed_writes_as_oserror():
                    self._file.close()
            except OSError:
                if kind is None:
                    raise
                # already failing: the first error says why; HDF5 closing a file it could not write adds nothing
            if kind is None and self._finished:
                os.replace(self.tmp, self.out)
        finally:
            self.tmp.unlink(missing_ok=True)


def _attribute(value: object) -> np.ndarray | int:
    """An attribute as stored: integers as they are, everything else as fixed-length UTF-8 text (JSON for lists and
    mappings), which HDF5 keeps in the checksummed object header rather than in its unchecked global heap."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    encoded = (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", max(1, len(encoded))))


def _rows_of(case: CaseRows, name: str) -> np.ndarray:
    if name == SEG:
        return case.seg
    if name.startswith(f"{CONTEXT_GROUP}/"):
        assert case.context is not None
        return case.context[name.split("/", 1)[1]]
    return case.images[name]


@contextmanager
def _failed_writes_as_oserror() -> Iterator[None]:
    """h5py reports some failed writes (a full disk while flushing or closing) as RuntimeError: make every failed
    write an OSError, so that the build can tell the user in one line."""
    try:
        yield
    except RuntimeError as error:
        raise OSError(str(error).splitlines()[0][:200]) from None


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove partial files of ``out`` left by builds whose process no longer exists (killed with -9, a power
    cut): each can be gigabytes. Returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        pid = path.name[len(out.name) + 2 : -len(".partial")].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

"""Write the HDF5 artifact atomically: rows go to a hidden temporary file that replaces OUT only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

import h5py
import hdf5plugin
import numpy as np

from builder.extract import CaseRows
from builder.format import BACKGROUND, CASE_ID, MODALITIES, SEG, SLICE_INDEX, SPLIT_GROUP

#: Blosc-LZ4 with byte shuffle: about 3x smaller than raw int16 and still thousands of random rows/s
#: (benchmarks/bench_codecs.py; ../shared/PERFORMANCE.md). Readers need ``import hdf5plugin``.
COMPRESSION = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
COMPRESSION_NAME = "blosc-lz4, byte shuffle, clevel 5 (hdf5plugin)"
_GROW = 256  # rows added at a time when the datasets fill up


class ArtifactWriter:
    """Stream case rows into a new artifact at ``out``; on any error the partial file is removed.

    Use as a context manager: leaving the block normally after ``finish`` publishes the file with an
    atomic rename; leaving it with an exception removes the temporary file and leaves ``out`` untouched.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        # Whole chunks are written once: a chunk cache would only grow memory with the row count.
        self._file = h5py.File(self.tmp, "w", rdcc_nbytes=0)  # raises OSError when OUT's folder is not writable
        self.rows = 0
        self.case_ids: list[str] = []
        self.slice_index: list[int] = []
        self.background: list[bool] = []
        self._datasets: dict[str, h5py.Dataset] = {}
        self._finished = False

    def __enter__(self) -> ArtifactWriter:
        return self

    def create(self, slice_shape: tuple[int, int], dtypes: dict[str, str]) -> None:
        """Create the row datasets: one per modality plus the seg, chunked one slice per chunk."""
        for name, dtype in (*((m, dtypes[m]) for m in MODALITIES), (SEG, "u1")):
            self._datasets[name] = self._file.create_dataset(
                name,
                shape=(0, *slice_shape),
                maxshape=(None, *slice_shape),
                dtype=np.dtype(dtype),
                chunks=(1, *slice_shape),
                fletcher32=True,
                **COMPRESSION,
            )

    def append(self, case: CaseRows) -> None:
        start, stop = self.rows, self.rows + len(case.slice_index)
        for name, dataset in self._datasets.items():
            if dataset.shape[0] < stop:
                dataset.resize(stop + _GROW, axis=0)
            dataset[start:stop] = case.seg if name == SEG else case.images[name]
        self.case_ids.extend([case.case_id] * len(case.slice_index))
        self.slice_index.extend(case.slice_index.tolist())
        self.background.extend(case.background.tolist())
        self.rows = stop

    def finish(self, splits: dict[str, np.ndarray], attrs: dict[str, object]) -> None:
        """Trim the datasets, write the row metadata, splits and JSON attributes."""
        f = self._file
        for dataset in self._datasets.values():
            dataset.resize(self.rows, axis=0)
        f.create_dataset(CASE_ID, data=np.array(self.case_ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset(SLICE_INDEX, data=np.asarray(self.slice_index, dtype=np.int32))
        f.create_dataset(BACKGROUND, data=np.asarray(self.background, dtype=np.uint8))
        group = f.create_group(SPLIT_GROUP)
        for name, rows in splits.items():
            group.create_dataset(name, data=rows.astype(np.int64))
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (int, str)) else json.dumps(value)
        self._finished = True

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._file.close()
        if kind is None and self._finished:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)

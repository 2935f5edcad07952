"""Which lossless filter for the artifact? Size and random-row read speed of each, on the same rows.

The trainer reads one row of one modality at a time in random order, so that is what is timed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, replicated_artifact  # noqa: E402

CODECS = {
    "none": {},
    "gzip-1 + shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf + shuffle": {"compression": "lzf", "shuffle": True},
    "blosc-lz4 + shuffle (chosen)": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)),
    "blosc-zstd-1 + shuffle": dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)),
}


def main() -> None:
    source = replicated_artifact(400, "rows400")
    with h5py.File(source) as f:
        rows = f["t2f"][()]
    order = np.random.default_rng(0).permutation(len(rows))
    print(f"{len(rows)} rows of 240x240 {rows.dtype}, one modality, fletcher32 on, random single-row reads:")
    results = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for name, options in CODECS.items():
            path = Path(tmp) / "c.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=rows, chunks=(1, *rows.shape[1:]), fletcher32=True, **options)
            size = path.stat().st_size / 1e6
            with h5py.File(path, "r", rdcc_nbytes=0) as f:
                ds = f["x"]
                start = time.perf_counter()
                for i in order:
                    ds[int(i)]
                rate = len(order) / (time.perf_counter() - start)
            results[name] = (size, rate)
    raw_size, raw_rate = results["none"]
    for name, (size, rate) in results.items():
        print(f"  {name:<30} {size:7.1f} MB ({raw_size / size:4.1f}x smaller)  {rate:8.0f} rows/s "
              f"({rate / raw_rate:4.2f}x of uncompressed)")


if __name__ == "__main__":
    main()

"""What integrity costs and what it buys, measured side by side in one run with the functions users run.

1. Bit flips: N random single-bit flips in a built file, one flip per copy, half of them anywhere (uniform over its
   bytes: mostly compressed rows) and half in the bytes outside every data chunk (the metadata: superblock, object
   headers, attributes, chunk indexes, where an unchecked flip once zeroed rows silently). Each copy is either caught
   by `brats-build verify` (`builder.inspect.verify`), caught by a reader (HDF5 refuses a read), harmless (verify
   passes and every dataset and attribute reads as before) or silent (verify passes and something reads
   differently): the target is zero silent, in the 1.10 format; the 1.8 format is flipped alike for comparison.
2. The cost of HDF5's checksummed 1.10 format (`builder.writer.LIBVER`) against the 1.8 format it replaced: the
   same `build`, the bare rows/s of the trainer's `SliceDataset` (the worst case) and the same short `fit` (loading
   on the training thread) on each file. Target for build and fit: within 2%. A whole fit's wall time varies by
   more than that on this VM, so fit's figure is the time its own row reads take in each format, as a share of fit.
3. The cost of verifying a checkpoint's CRCs (`trainer.training.model.read_checkpoint`) against a bare `torch.load`.

    python benchmarks/bench_integrity.py [--flips 200] [--cases 24]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import writer  # noqa: E402
from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from builder.inspect import verify  # noqa: E402

from common import report, side_by_side, synthetic_cases  # noqa: E402


def contents(path: Path) -> dict[str, object]:
    """Every dataset's values and every attribute, as a reader gets them (an OSError when HDF5 refuses one)."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        out.update({f"@{k}": bytes(v) if isinstance(v, bytes) else v for k, v in f.attrs.items()})
        f.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return out


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def metadata_bytes(path: Path) -> np.ndarray:
    """The offsets of every byte outside the data chunks of every chunked dataset."""
    inside = np.zeros(path.stat().st_size, dtype=bool)
    with h5py.File(path, "r") as f:
        def mark(_: str, item: object) -> None:
            if isinstance(item, h5py.Dataset) and item.chunks is not None:
                for i in range(item.id.get_num_chunks()):
                    chunk = item.id.get_chunk_info(i)
                    inside[chunk.byte_offset : chunk.byte_offset + chunk.size] = True
        f.visititems(mark)
    return np.flatnonzero(~inside)


def flips(original: Path, count: int, seed: int = 0) -> dict[str, int]:
    expected = contents(original)
    size = original.stat().st_size
    metadata = metadata_bytes(original)
    rng = random.Random(seed)
    tally = {"caught by verify": 0, "caught by a reader": 0, "harmless": 0, "silent": 0}
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "flipped.h5"
        for trial in range(count):
            shutil.copy(original, copy)
            offset = rng.randrange(size) if trial % 2 else int(metadata[rng.randrange(len(metadata))])
            bit = rng.randrange(8)
            with open(copy, "r+b") as handle:
                handle.seek(offset)
                byte = handle.read(1)[0]
                handle.seek(offset)
                handle.write(bytes([byte ^ (1 << bit)]))
            if verify(copy):
                tally["caught by verify"] += 1
                continue
            try:
                found = contents(copy)
            except (OSError, KeyError, ValueError, RuntimeError):
                tally["caught by a reader"] += 1
                continue
            tally["harmless" if same(found, expected) else "silent"] += 1
    return tally


def read_rows(path: Path, rows: int = 400) -> None:
    """The trainer's row reads alone (`SliceDataset`, four modalities with context), no model."""
    from trainer.data.loading import RowReader, SliceDataset

    with h5py.File(path) as f:
        indices = np.resize(np.arange(f["seg"].shape[0]), rows)
    dataset = SliceDataset(RowReader(path, ["t1n", "t1c", "t2w", "t2f"], context=1, stored_context=1), indices)
    for i in range(len(dataset)):
        dataset[i]


def fit_once(path: Path, runs: Path, reads: list[float]) -> None:
    """A short `fit` of early fusion with context on ``path`` (the function `brats-train fit` runs, loading on its
    own thread); the part of it spent in the trainer's row reads (`SliceDataset.__getitem__`) goes to ``reads``."""
    from trainer.config import FitConfig
    from trainer.data.loading import SliceDataset
    from trainer.training.loop import fit

    config = FitConfig(data=str(path), modality="all", encoder="resnet18", encoder_weights=None, batch_size=8,
                       crop=64, epochs=2, workers=0, device="cpu", context=1, quiet=True)
    shutil.rmtree(runs, ignore_errors=True)
    read = SliceDataset.__getitem__
    spent = [0.0]

    def timed(self, index):
        started = time.perf_counter()
        try:
            return read(self, index)
        finally:
            spent[0] += time.perf_counter() - started

    SliceDataset.__getitem__ = timed
    try:
        fit(config, run_dir=runs / "run")
    finally:
        SliceDataset.__getitem__ = read
    reads.append(spent[0])


def format_cost(source: Path, folder: Path) -> tuple[Path, Path]:
    """The same build, row reads and fit on the 1.10 format and the 1.8 format; returns the two files."""
    new, old = folder / "v110.h5", folder / "v18.h5"
    checked = writer.LIBVER
    rule = SliceRule(per_case=2, background=1, context=1)

    def build_with(libver: tuple[str, str], out: Path) -> None:
        writer.LIBVER = libver
        try:
            build(source, out, BuildOptions(jobs=1, progress=False, rule=rule, val_fraction=0.2, test_fraction=0.2))
        finally:
            writer.LIBVER = checked

    times = side_by_side(5, new=lambda: build_with(checked, new), old=lambda: build_with(("earliest", "v108"), old))
    report("build, HDF5 1.10 format / 1.8 format (time)", times["new"] / times["old"], "<= 1.02",
           times["new"] <= 1.02 * times["old"])
    times = side_by_side(3, new=lambda: read_rows(new), old=lambda: read_rows(old))
    print(f"trainer rows/s alone (SliceDataset, no model), 1.8 format / 1.10 format: {times['new'] / times['old']:.2f} "
          f"({400 / times['old']:.0f} vs {400 / times['new']:.0f} rows/s)")
    runs, reads = folder / "runs", {"new": [], "old": []}
    fit_once(new, runs, [])  # warm-up: imports, thread pools and allocators, paid once per process
    whole = side_by_side(6, new=lambda: fit_once(new, runs, reads["new"]), old=lambda: fit_once(old, runs, reads["old"]))
    print(f"fit, whole run, 1.10 format / 1.8 format: {whole['new'] / whole['old']:.2f} ({whole['new']:.2f} vs "
          f"{whole['old']:.2f} s; on this VM the model's own compute varies by 5-10% from run to run)")
    cost = (float(np.median(reads["new"])) - float(np.median(reads["old"]))) / whole["old"]
    report("fit: the format's cost (row reads inside fit, 1.10 minus 1.8) / fit", cost, "<= 0.02", cost <= 0.02)
    return new, old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--cases", type=int, default=24)
    args = parser.parse_args()
    source = synthetic_cases(args.cases)
    with tempfile.TemporaryDirectory() as folder:
        new, old = format_cost(source, Path(folder))
        checkpoint_cost(Path(folder))
        tallies = {}
        for name, path in (("1.8 format (before)", old), ("1.10 format", new)):
            tallies[name] = flips(path, args.flips)
            print(f"{name}: {args.flips} single-bit flips (half in the {len(metadata_bytes(path))} bytes of metadata) "
                  f"in a {path.stat().st_size / 1e6:.1f} MB file of {args.cases} cases: "
                  + ", ".join(f"{k} {v}" for k, v in tallies[name].items()))
        silent = tallies["1.10 format"]["silent"]
        report("silent bit flips, 1.10 format", silent, "0", silent == 0)


def checkpoint_cost(folder: Path) -> None:
    import torch

    from trainer.training.model import build_model, checkpoint_of, read_checkpoint, save_checkpoint

    model = build_model("unet", "resnet18", None, 4, 4)
    path = folder / "best.pt"
    save_checkpoint(path, checkpoint_of(model, {"data": "x", "modality": "all", "arch": "unet", "encoder": "resnet18",
                                                "channels": ["t1n", "t1c", "t2w", "t2f"], "classes": 4}))
    times = side_by_side(5, checked=lambda: read_checkpoint(path), bare=lambda: torch.load(path, weights_only=True))
    print(f"checkpoint of Unet/resnet18 ({path.stat().st_size / 1e6:.0f} MB): read_checkpoint {times['checked'] * 1e3:.0f} "
          f"ms, bare torch.load {times['bare'] * 1e3:.0f} ms (read once per evaluate, predict or resume; never in an epoch)")


if __name__ == "__main__":
    main()

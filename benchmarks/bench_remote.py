"""What reading an artifact over the network costs (issue 22): the file as the builder writes it (metadata in 4 MiB
blocks, builder.writer.META_BLOCK) against HDF5's default 2 KiB metadata blocks, locally and streamed (`--stream`)
through a local HTTP server that serves ranges with an added latency per request (tests/ranged_server.py), side by
side in one run.

The artifact is the recipe's axial file (every tumour slice, 4 background slices a case, 2 neighbouring slices on
each side) of the 26 real patients in ../shared/real-brats18 (synthetic cases where they are missing), built by
`builder.build.build` both ways. Measured with the functions the commands run: `Artifact.open` (requests to open),
`RowReader.read` (requests and rows/s, random rows, one handle), and `trainer.training.loop.fit` from the local file
and streamed at 20 ms (the same run: steps, batch, workers; its train images/s from its own metrics.csv too, which
leaves out starting the workers: streamed ones are spawned, trainer.data.loading.make_loader).

    python benchmarks/bench_remote.py [--steps 60] [--workers 4]

Targets: opening in at most 5 requests; streaming fit within 1.2x of the local file at 20 ms. Never run it beside the
test suite or another timing.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from ranged_server import Server, serving  # noqa: E402

from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact  # noqa: E402
from trainer.data.loading import RowReader  # noqa: E402
from trainer.training.history import History  # noqa: E402
from trainer.training.loop import fit  # noqa: E402

from common import CACHE, synthetic_cases  # noqa: E402

REAL = HERE.parents[1] / "shared" / "real-brats18"
FOLDER = CACHE / "remote"
CHANNELS = ("t1n", "t1c", "t2w", "t2f")
CONTEXT = 2
LATENCIES = (0.02, 0.1)


def artifacts() -> dict[str, Path]:
    """The recipe's axial file as the builder writes it, and with HDF5's default metadata blocks, built once."""
    import builder.writer

    source = REAL if REAL.is_dir() else synthetic_cases(26)
    built = {}
    for name, block in (("4 MiB metadata blocks", builder.writer.META_BLOCK), ("HDF5's 2 KiB", 2048)):
        out = FOLDER / f"meta-{block}.h5"
        if not out.is_file():
            FOLDER.mkdir(parents=True, exist_ok=True)
            builder.writer.META_BLOCK, kept = block, builder.writer.META_BLOCK
            started = time.perf_counter()
            build(source, out, BuildOptions(jobs=2, val_fraction=0.1, test_fraction=0, progress=False,
                                            rule=SliceRule(per_case=None, background=4, context=CONTEXT)))
            builder.writer.META_BLOCK = kept
            print(f"built {out} in {time.perf_counter() - started:.0f} s", flush=True)
        built[name] = out
    print(f"source: {source}")
    return built


def read_rows(location: str | Path, rows: np.ndarray) -> float:
    """Seconds to read ``rows`` in order through one RowReader (what every DataLoader worker runs)."""
    reader = RowReader(location, CHANNELS, context=CONTEXT, stored_context=CONTEXT)
    reader.read(int(rows[0]))  # opened: not what a row costs
    started = time.perf_counter()
    for row in rows:
        reader.read(int(row))
    seconds = time.perf_counter() - started
    reader.close()
    return seconds


def streamed(server: Server, address: str, rows: np.ndarray) -> dict[str, float]:
    """Requests to open the artifact and per row, and rows/s, at the server's latency."""
    before = server.counted()
    Artifact.open(address)
    opened = server.counted()
    reader = RowReader(address, CHANNELS, context=CONTEXT, stored_context=CONTEXT)
    reader.read(int(rows[0]))
    ready = server.counted()
    started = time.perf_counter()
    for row in rows:
        reader.read(int(row))
    seconds = time.perf_counter() - started
    done = server.counted()
    reader.close()
    return {"open_requests": opened[0] - before[0], "open_mib": (opened[1] - before[1]) / 2**20,
            "reader_open_requests": ready[0] - opened[0], "requests_per_row": (done[0] - ready[0]) / len(rows),
            "kib_per_row": (done[1] - ready[1]) / len(rows) / 1024, "rows_per_s": len(rows) / seconds}


def fit_seconds(data: str, out: Path, steps: int, workers: int) -> tuple[float, float]:
    """Wall seconds of a fit, and its train images/s as its metrics.csv gives them."""
    config = FitConfig(data=data, modality="all", encoder="resnet18", encoder_weights=None, batch_size=16, crop=128,
                       epochs=1, max_steps=steps, workers=workers, device="cpu", context=CONTEXT, task="regions",
                       out=str(out), quiet=True)
    started = time.perf_counter()
    run = fit(config)
    seconds = time.perf_counter() - started
    (row,) = History(run / "metrics.csv").rows
    return seconds, steps * 16 / float(row["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="random rows read per measurement")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps of each fit")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of each fit")
    args = parser.parse_args()
    files = artifacts()
    total = Artifact.open(next(iter(files.values()))).rows
    rows = np.random.default_rng(0).choice(total, size=min(args.rows, total), replace=False)
    print(f"\n{total} rows; {len(rows)} random rows per measurement\n")
    print("| metadata | size (MB) | local rows/s | latency | requests to open (MiB) | + a reader's open | requests per "
          "row | KiB per row | streamed rows/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    blobs = {name: path.read_bytes() for name, path in files.items()}
    with serving({path.name: blobs[name] for name, path in files.items()}) as server:
        addresses = {name: server.address(path.name, hashlib.sha256(blobs[name]).hexdigest())
                     for name, path in files.items()}
        for name, path in files.items():
            local = len(rows) / min(read_rows(path, rows) for _ in range(2))
            for latency in LATENCIES:
                server.latency = latency
                m = streamed(server, addresses[name], rows[: max(20, len(rows) // 4)])
                print(f"| {name} | {path.stat().st_size / 1e6:.1f} | {local:.0f} | {latency * 1000:.0f} ms | "
                      f"{m['open_requests']} ({m['open_mib']:.1f}) | {m['reader_open_requests']} | "
                      f"{m['requests_per_row']:.2f} | {m['kib_per_row']:.0f} | {m['rows_per_s']:.1f} |", flush=True)
        server.latency = LATENCIES[0]
        work = Path(tempfile.mkdtemp())
        name, path = next(iter(files.items()))
        timings: dict[str, list[tuple[float, float]]] = {"local": [], "streamed": []}
        for run, (how, data) in enumerate((("local", str(path)), ("streamed", addresses[name]), ("local", str(path)))):
            timings[how].append(fit_seconds(data, work / f"run-{run}", args.steps, args.workers))  # local around it
        local, streamed_fit = min(timings["local"]), timings["streamed"][0]
        print(f"\nfit, {args.steps} steps of batch 16 (128 px crops, {args.workers} workers), {name}: local "
              f"{local[0]:.1f} s (the faster of the runs before and after), streamed at {LATENCIES[0] * 1000:.0f} ms "
              f"{streamed_fit[0]:.1f} s: {streamed_fit[0] / local[0]:.2f}x (target <= 1.2x); training alone "
              f"{local[1]:.1f} vs {streamed_fit[1]:.1f} images/s ({local[1] / streamed_fit[1]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: cached synthetic cases, timing, peak memory of a process tree."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from joblib import Parallel, delayed

CACHE = Path(__file__).parent / ".cache"


def synthetic_cases(n: int, name: str = "cases") -> Path:
    """A folder with the first ``n`` synthetic cases (seed 0), generated once and kept in benchmarks/.cache."""
    from builder.synth import case_id, write_case

    folder = CACHE / name
    todo = [i for i in range(n) if not (folder / case_id("brats2023", i)).is_dir()]
    if todo:
        print(f"generating {len(todo)} synthetic cases in {folder} (once) ...", flush=True)
        Parallel(n_jobs=-1)(delayed(write_case)(folder, i, 0) for i in todo)
    return folder


def subset(source: Path, n: int, name: str) -> Path:
    """A folder of symlinks to the first ``n`` cases of ``source``."""
    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    for case in sorted(source.iterdir())[:n]:
        link = folder / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    return folder


def warm_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.nii*"):
        path.read_bytes()


def side_by_side(repeats: int, **functions: Callable[[], object]) -> dict[str, float]:
    """Median wall time in seconds of each function, the runs interleaved, in reversed order every other round, so
    that drift and the cost of going first hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    order = list(functions.items())
    for round_ in range(repeats):
        for name, function in order[::-1] if round_ % 2 else order:
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tree_peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh Python; return the summed VmHWM (peak RSS) of it and every process it started.

    The child reads the figures itself just before exiting, while its pool workers are still alive, because
    ``ru_maxrss`` after fork+exec can report the parent's peak instead.
    """
    probe = (
        "import os\n"
        "def _tree_hwm():\n"
        "    parents = {}\n"
        "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "        try:\n"
        "            stat = open(f'/proc/{pid}/stat').read()\n"
        "        except OSError:\n"
        "            continue\n"
        "        parents[int(pid)] = int(stat.rsplit(')', 1)[1].split()[1])\n"
        "    tree, grew = {os.getpid()}, True\n"
        "    while grew:\n"
        "        new = {p for p, parent in parents.items() if parent in tree} - tree\n"
        "        tree |= new\n"
        "        grew = bool(new)\n"
        "    total = 0\n"
        "    for pid in tree:\n"
        "        try:\n"
        "            for line in open(f'/proc/{pid}/status'):\n"
        "                if line.startswith('VmHWM:'):\n"
        "                    total += int(line.split()[1])\n"
        "        except OSError:\n"
        "            pass\n"
        "    return total / 1024\n"
    )
    script = probe + code + "\nprint('PEAK_MB', _tree_hwm())\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env={**os.environ})
    line = next(line for line in out.stdout.splitlines() if line.startswith("PEAK_MB"))
    return float(line.split()[1])


def report(name: str, value: float, target: str, ok: bool) -> None:
    print(f"{name:<58} {value:8.2f}  (target {target}) {'PASS' if ok else 'FAIL'}", flush=True)


def replicated_artifact(rows: int, name: str, source_cases: int = 200, val_fraction: float = 0.05) -> Path:
    """An artifact of ``rows`` rows in format v1, made by repeating the rows of a real build of
    ``source_cases`` synthetic cases (so size-dependent costs can be measured without generating 20,000
    cases). Each repeat gets its own case ids; splits are by case like a real build (90/5/5 by default)."""
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np

    from builder.build import BuildOptions, build
    from builder.checks import decoded_attributes
    from builder.extract import CaseRows
    from builder.format import MODALITIES
    from builder.split import split_cases, split_rows
    from builder.writer import ArtifactWriter

    out = CACHE / f"{name}.h5"
    if out.is_file():
        return out
    base = CACHE / f"base{source_cases}.h5"
    if not base.is_file():
        build(synthetic_cases(source_cases), base, BuildOptions(progress=False))
    with h5py.File(base) as f:
        data = {m: f[m][()] for m in (*MODALITIES, "seg")}
        ids = f["case_id"].asstr()[()]
        attrs, _ = decoded_attributes(f)  # as a build wrote them: JSON and text decoded, written again alike
    with ArtifactWriter(out) as writer:
        writer.create(data["seg"].shape[1:], {m: data[m].dtype.str for m in MODALITIES})
        for i in range(rows):
            j = i % len(ids)
            writer.append(CaseRows(f"{ids[j]}-r{i // len(ids)}", np.array([80], np.int32), data["seg"][j : j + 1],
                                   {m: data[m][j : j + 1] for m in MODALITIES}, np.zeros(1, bool)))
        cases = sorted(set(writer.case_ids))
        splits = split_rows(writer.case_ids, split_cases(cases, 0, val_fraction, 0.05))
        writer.finish(splits, {**attrs, "cases_written": len(cases), "cases_scanned": len(cases)})
    return out

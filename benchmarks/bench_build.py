"""Build speed and memory, measured side by side on the same synthetic int16 cases (issue: the builder).

- one job: the builder against the notebook way (``get_fdata`` of the seg and every modality, then slicing)
- one job: the builder against the inflate floor (ISA-L decoding only the bytes the build needs)
- two jobs against one job
- peak memory (VmHWM of the whole process tree) of a 200-case build against a 20-case build
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import nibabel as nib
import numpy as np
from isal import isal_zlib

sys.path.insert(0, str(Path(__file__).parent))
from builder.build import BuildOptions, build  # noqa: E402
from builder.format import MODALITIES  # noqa: E402
from builder.layout import find_cases  # noqa: E402
from builder.nifti import read_header  # noqa: E402

from common import report, side_by_side, subset, synthetic_cases, tree_peak_rss_mb, warm_page_cache  # noqa: E402

SPEED_CASES = 48


def notebook_way(source: Path) -> None:
    """What the original notebooks did: every volume into float64 RAM, then pick the slice."""
    for case in find_cases(source):
        seg = nib.load(case.files["seg"]).get_fdata()
        z = int(np.argmax(np.count_nonzero(seg, axis=(0, 1))))
        rows = [nib.load(case.files[m]).get_fdata()[:, :, z] for m in MODALITIES]
        assert rows[0].shape == seg.shape[:2]


def needed_bytes(source: Path, artifact: Path) -> list[tuple[Path, int]]:
    """For each file the build reads: how many decoded bytes it needs (seg: all; images: up to slice z)."""
    with h5py.File(artifact) as f:
        z_of = dict(zip(f["case_id"].asstr()[()], f["slice_index"][()]))
    plan = []
    for case in find_cases(source):
        for name, path in case.files.items():
            info = read_header(path)
            last = info.shape[2] - 1 if name == "seg" else int(z_of[case.case_id])
            plan.append((path, info.vox_offset + (last + 1) * info.slice_bytes))
    return plan


def inflate_floor(plan: list[tuple[Path, int]]) -> None:
    for path, nbytes in plan:
        data = isal_zlib.decompressobj(31).decompress(path.read_bytes(), nbytes)
        assert len(data) == nbytes


def main() -> None:
    all_cases = synthetic_cases(200)
    speed = subset(all_cases, SPEED_CASES, f"first{SPEED_CASES}")
    warm_page_cache(all_cases)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.h5"

        def build_with(jobs: int, source: Path = speed) -> None:
            build(source, out, BuildOptions(jobs=jobs, progress=False))

        # Each comparison runs side by side; the notebook way goes last because its gigabytes of float64
        # volumes disturb the allocator and the page cache for whatever runs after it in this process.
        many = subset(all_cases, 120, "first120")
        build_with(2, many)  # start the worker pool once
        t = side_by_side(3, one=lambda: build_with(1, many), two=lambda: build_with(2, many))
        t_one, t_two = t["one"], t["two"]
        build_with(1)
        plan = needed_bytes(speed, out)
        t = side_by_side(5, build=lambda: build_with(1), floor=lambda: inflate_floor(plan))
        t_build, t_floor = t["build"], t["floor"]
        t_notebook = side_by_side(1, notebook=lambda: notebook_way(speed))["notebook"]

    per_case = 1000 / SPEED_CASES
    print(f"\nbuild of {SPEED_CASES} synthetic int16 cases, one job: builder {t_build * per_case:.0f} ms/case, "
          f"notebook way {t_notebook * per_case:.0f} ms/case, ISA-L inflate floor {t_floor * per_case:.0f} ms/case")
    report("speed-up over the notebook way (one job)", t_notebook / t_build, ">= 5", t_notebook / t_build >= 5)
    report("builder time / inflate floor (one job)", t_build / t_floor, "<= 1.3", t_build / t_floor <= 1.3)
    report("speed-up of 2 jobs over 1 job (120 cases)", t_one / t_two, ">= 1.8", t_one / t_two >= 1.8)

    peaks = {}
    for n in (20, 200):
        source = subset(all_cases, n, f"first{n}")
        peaks[n] = tree_peak_rss_mb(
            "from pathlib import Path; import tempfile\n"
            "from builder.build import BuildOptions, build\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            f"    build(Path({str(source)!r}), Path(tmp) / 'm.h5', BuildOptions(jobs=2, progress=False))\n"
        )
    print(f"peak memory of the process tree, 2 jobs: 20 cases {peaks[20]:.0f} MB, 200 cases {peaks[200]:.0f} MB")
    ratio = peaks[200] / peaks[20]
    report("peak memory 200 cases / 20 cases", ratio, "<= 1.2", ratio <= 1.2)


if __name__ == "__main__":
    main()

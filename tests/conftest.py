"""Shared fixtures, made once per test session: a handful of synthetic BraTS cases in the exact release layout and the
artifact built from them (for the builder's tests, which compare rows with nibabel), and the same cases cut down to a
box around each tumour, with their artifact and one tiny trained run (for the trainer's tests, whose cost grows with
every voxel a model sees)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from builder.extract import SliceRule
from builder.synth import write_case

N_CASES = 12
#: Options of the tiniest real training runs: a small encoder from scratch on 64x64 patches, on the CPU.
FAST = ["--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "3", "--workers", "0",
        "--crop", "64", "--device", "cpu"]


@pytest.fixture(scope="session")
def cases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic cases in the BraTS 2023 layout (read-only for tests: copy before changing)."""
    from joblib import Parallel, delayed

    out = tmp_path_factory.mktemp("brats") / "TrainingData"
    Parallel(n_jobs=2)(delayed(write_case)(out, i, 0) for i in range(N_CASES))
    return out


@pytest.fixture(scope="session")
def artifact(cases_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact built from ``cases_dir`` with a 50/25/25 split, so every split has rows."""
    out = tmp_path_factory.mktemp("artifact") / "brats.h5"
    build(cases_dir, out, BuildOptions(jobs=2, val_fraction=0.25, test_fraction=0.25, progress=False))
    return out


#: The box the small cases keep around each tumour (x, y, z voxels): small enough to segment in a second.
SMALL_BOX = (96, 96, 32)


def cut_down(case: Path, out: Path) -> Path:
    """A copy of a case folder with every volume cut to SMALL_BOX around the tumour (affines kept in world space)."""
    import nibabel as nib
    import numpy as np

    seg_path = next(p for p in case.iterdir() if p.name.lower().split(".")[0].endswith("seg"))
    seg = np.asanyarray(nib.load(seg_path).dataobj)
    centre = np.round(np.argwhere(seg > 0).mean(0)).astype(int)
    box = tuple(slice(max(0, min(c - n // 2, s - n)), max(0, min(c - n // 2, s - n)) + n)
                for c, n, s in zip(centre, SMALL_BOX, seg.shape))
    target = out / case.name
    target.mkdir(parents=True)
    for path in case.iterdir():
        image = nib.load(path)
        nib.save(image.slicer[box], target / path.name)
    return target


@pytest.fixture(scope="session")
def small_cases(cases_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cases_dir`` cut down to SMALL_BOX around each tumour, same names and dtypes (read-only for tests)."""
    from joblib import Parallel, delayed

    out = tmp_path_factory.mktemp("small") / "TrainingData"
    Parallel(n_jobs=2)(delayed(cut_down)(case, out) for case in sorted(cases_dir.iterdir()))
    return out


@pytest.fixture(scope="session")
def small_artifact(small_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact of ``small_cases`` with a 50/25/25 split and one neighbouring slice on each side of every row."""
    out = tmp_path_factory.mktemp("small_artifact") / "small.h5"
    build(small_cases, out, BuildOptions(jobs=2, val_fraction=0.25, test_fraction=0.25, progress=False,
                                         rule=SliceRule(context=1)))
    return out


@pytest.fixture
def case_copy(cases_dir: Path, tmp_path: Path):
    """Copy some cases into a fresh folder, so a test may break them."""

    def copy(n: int) -> Path:
        folder = tmp_path / "src"
        for case in sorted(cases_dir.iterdir())[:n]:
            shutil.copytree(case, folder / case.name)
        return folder

    return copy


@pytest.fixture(scope="session")
def small_run(small_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step early-fusion run on ``small_artifact``: a real checkpoint to predict and evaluate with (tests that
    only read it share it; copy it before changing it)."""
    from click.testing import CliRunner

    from trainer.cli import main

    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(main, ["fit", str(small_artifact), "-m", "all", "--out", str(out), *FAST, "--epochs",
                                       "1", "--max-steps", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return next(out.iterdir())


@contextmanager
def file_size_limit(limit: int):
    """A real full-disk fault for this process: the kernel refuses writes past ``limit`` bytes per file (EFBIG),
    as it does on a full disk (ENOSPC), with no privileges needed (RLIMIT_FSIZE; SIGXFSZ ignored meanwhile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def unprivileged(command: list[str]) -> list[str]:
    """``command`` run so that file permissions apply: as root, with every capability dropped (setpriv)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced here")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *command]


def one_error_line(result) -> str:
    """The single ``Error: ...`` line of a CLI result that failed cleanly (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]

"""Shared fixtures: a handful of synthetic BraTS cases and the artifact built from them (made once per run)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
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
def small_run(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step early-fusion run on ``artifact``: a real checkpoint to predict and evaluate with."""
    from click.testing import CliRunner

    from trainer.cli import main

    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(main, ["fit", str(artifact), "-m", "all", "--out", str(out), *FAST, "--epochs", "1",
                                       "--max-steps", "2"], catch_exceptions=False)
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

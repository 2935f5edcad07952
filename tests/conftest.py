"""Shared fixtures and helpers.

Fixtures, made once per test session: a handful of synthetic BraTS cases in the exact release layout and the artifact
built from them (for the builder's tests, which compare rows with nibabel), and the same cases cut down to a box
around each tumour, with their artifact and one tiny trained run (for the trainer's tests, whose cost grows with
every voxel a model sees). Session fixtures are read-only: a test that writes copies first (``writable_copy``).

Helpers, one of each: the two CLIs (``trainer_cli``, ``builder_cli``), the independent NIfTI reader (``read_volume``),
a run stopped as a kill would stop it (``fit_killed``), the checks of a clean failure (``one_error_line``) and a
report's page read back (``ReportPage``)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from builder.build import BuildOptions, build
from builder.extract import SliceRule
from builder.synth import write_case

N_CASES = 12
#: Options of the tiniest real training runs: a small encoder from scratch on 64x64 patches, on the CPU.
FAST_OPTIONS = {"encoder": "resnet18", "encoder_weights": "none", "batch_size": 3, "workers": 0, "crop": 64,
                "device": "cpu"}
#: The same on the command line.
FAST = [text for name, value in FAST_OPTIONS.items() for text in (f"--{name.replace('_', '-')}", str(value))]


class ReportPage(HTMLParser):
    """A report's table rows (by table id: ``patients``, ``approaches``), its pictures and every address it names
    (``trainer.commands.report``)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.addresses: list[str] = []
        self._cell: list[str] | None = None
        self._in_body = False
        self._table: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(found.get("id") or "", [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._table.append([])
        elif tag == "td" and self._in_body:
            self._cell = []
        elif tag == "img":
            self.images.append(found.get("src") or "")
        self.addresses += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    @property
    def rows(self) -> list[list[str]]:
        """The patient table's rows."""
        return self.tables.get("patients", [])


def trainer_cli(*args: object) -> Result:
    """``brats-train ARGS`` in this process (paths and numbers as text)."""
    from trainer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def builder_cli(*args: object) -> Result:
    """``brats-build ARGS`` in this process."""
    from builder.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def read_volume(path: Path) -> np.ndarray:
    """A NIfTI volume's stored values read with nibabel: the independent answer builds and predictions are held to."""
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj)


def case_volume(case: Path, suffix: str) -> np.ndarray:
    """``read_volume`` of the case file whose name ends in ``suffix`` (``-t2f``, ``_flair``, ``seg``...)."""
    return read_volume(next(case.glob(f"*{suffix}.nii*")))


def writable_copy(run: Path, folder: Path) -> Path:
    """A copy of a read-only fixture's run folder that a test may write into (evaluate writes its tables there)."""
    return Path(shutil.copytree(run, folder / run.name))


def kill_after_epoch(epoch: int):
    """An ``on_epoch_end`` hook that stops a run as Ctrl-C would, once epoch ``epoch`` (0-based) is logged and before
    that epoch's checkpoints are written: the most awkward moment for what a run leaves behind."""

    def hook(row: dict[str, float]) -> None:
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return hook


def fit_killed(data: Path, out: Path, epoch: int, modality: str = "t1n", **options: object) -> Path:
    """``brats-train fit DATA -m MODALITY --out OUT`` with FAST_OPTIONS and ``options``, killed after epoch ``epoch``
    (``kill_after_epoch``); returns the run's folder."""
    from trainer.cli import make_config
    from trainer.training.loop import fit

    with pytest.raises(KeyboardInterrupt):
        fit(make_config(data, modality, out, **{**FAST_OPTIONS, **options}), on_epoch_end=kill_after_epoch(epoch))
    (run,) = out.iterdir()
    return run


def limited(resource_name: str, value: int, code: str, *args: str) -> subprocess.CompletedProcess:
    """Python ``code`` run in a process whose ``resource_name`` limit (RLIMIT_AS, RLIMIT_NOFILE...) is ``value``."""
    setup = f"import resource; resource.setrlimit(resource.{resource_name}, ({value}, {value}))\n"
    return subprocess.run([sys.executable, "-c", setup + code, *args], capture_output=True, text=True, timeout=300)


def partials(folder: Path) -> list[Path]:
    """Partial files anywhere under ``folder``: none may be left behind."""
    return [p for p in folder.rglob("*") if "partial" in p.name]


def released_together(setup: str, body: str, arguments: list[list[str]], barrier: Path
                      ) -> list[subprocess.CompletedProcess]:
    """One Python process per argument list (``args`` in the code), released at once: each runs ``setup`` (its
    imports), says it is ready, waits for ``barrier``, then runs ``body``; returns how each ended."""
    code = (f"import sys, time, pathlib\ngo, ready, args = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), "
            f"sys.argv[3:]\n{setup}\nready.touch()\nwhile not go.exists(): time.sleep(0.002)\n{body}\n")
    ready = [barrier.with_name(f"ready-{n}") for n in range(len(arguments))]
    processes = [subprocess.Popen([sys.executable, "-c", code, str(barrier), str(flag), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args, flag in zip(arguments, ready)]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    barrier.touch()  # every process has done its imports: released together
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in processes]


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

    seg_path = next(p for p in case.iterdir() if p.name.lower().split(".")[0].endswith("seg"))
    seg = read_volume(seg_path)
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
    out = tmp_path_factory.mktemp("runs")
    result = trainer_cli("fit", small_artifact, "-m", "all", "--out", out, *FAST, "--epochs", "1", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return next(out.iterdir())


#: A run that can be resumed and extended: early stopping out of the way, its resume state kept.
RESUMABLE_OPTIONS = {"modality": "t1c", "patience": 9, "keep_last": True}
RESUMABLE = ["-m", "t1c", *FAST, "--patience", "9", "--keep-last"]


@pytest.fixture(scope="session")
def resumable_run(small_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch RESUMABLE run on ``small_artifact``, made in one go (read-only: copy it to resume or damage it)."""
    out = tmp_path_factory.mktemp("resumable")
    assert trainer_cli("fit", small_artifact, "--out", out, *RESUMABLE, "--epochs", "2").exit_code == 0
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


def one_error_line(result: Result, only: bool = False) -> str:
    """The single ``Error: ...`` line of a CLI result that failed cleanly (exit 1, no traceback); with ``only``, the
    output holds nothing else either."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error") or only]
    assert len(lines) == 1 and lines[0].startswith("Error"), result.output
    return lines[0]

"""A hostile but fair user: swapped and edited files, crafted checkpoints, full disks, signals, unreadable inputs.

Each failure must be one line naming the real cause, and leave nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from builder.build import BuildError, BuildOptions, build
from builder.extract import SliceRule
from builder.cli import main as build_main
from trainer import train as train_module
from trainer.cli import main
from trainer.data import Artifact

from conftest import FAST, file_size_limit, one_error_line, unprivileged


def _trainer(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _builder(*args: str):
    return CliRunner().invoke(build_main, [str(a) for a in args])


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "partial" in p.name]


# --- a run is bound to its data -------------------------------------------------------------------------------

def test_rebuilt_file_is_refused_unless_scored_on_purpose(small_run: Path, small_artifact: Path, small_cases: Path,
                                                          tmp_path: Path) -> None:
    moved = tmp_path / "moved.h5"
    shutil.copy(small_artifact, moved)  # the same build, moved: accepted
    assert _trainer("evaluate", small_run, "--data", moved, "--device", "cpu").exit_code == 0
    rebuilt = tmp_path / "rebuilt.h5"
    build(small_cases, rebuilt, BuildOptions(jobs=1, seed=5, val_fraction=0.25, test_fraction=0.25, progress=False,
                                             rule=SliceRule(context=1)))
    line = one_error_line(_trainer("evaluate", small_run, "--data", rebuilt, "--device", "cpu"))
    assert "not the file this run trained on" in line and Artifact.open(rebuilt).data_id in line
    assert "--other-data" in line
    scored = _trainer("evaluate", small_run, "--data", rebuilt, "--other-data", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert "on purpose" in json.loads((small_run / "test_metrics.json").read_text())["data_check"]
    killed = tmp_path / "killed"  # a run killed before its first checkpoint: its options alone
    killed.mkdir()
    shutil.copy(small_run / "config.json", killed)
    resumed = _trainer("fit", rebuilt, "--resume", killed)
    assert "not the file this run trained on" in one_error_line(resumed)


def test_file_replaced_during_fit_is_detected_not_read(small_artifact: Path, small_cases: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    data = tmp_path / "data.h5"
    shutil.copy(small_artifact, data)
    other = tmp_path / "other.h5"
    build(small_cases, other, BuildOptions(jobs=1, seed=9, val_fraction=0.25, test_fraction=0.25, progress=False))
    real_add = train_module.History.add

    def add_then_rebuild(self, row):  # a colleague rebuilds the file while epoch 1 is being logged
        real_add(self, row)
        if row["epoch"] == 0:
            os.replace(other, data)

    monkeypatch.setattr(train_module.History, "add", add_then_rebuild)
    result = _trainer("fit", data, "-m", "t1n", "--out", tmp_path / "runs", *FAST, "--epochs", "3")
    line = one_error_line(result)
    assert "replaced or changed while this run read it" in line and str(data) in line
    (run,) = (tmp_path / "runs").iterdir()
    with open(run / "metrics.csv") as handle:
        assert len(handle.readlines()) == 2  # header and epoch 1 only: no epoch validated on the new file


@pytest.mark.parametrize("damage", ["overlap", "negative", "fraction", "range"])
def test_damaged_splits_stop_at_open(artifact: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / f"{damage}.h5"
    shutil.copy(artifact, bad)
    with h5py.File(bad, "r+") as f:
        train, val = f["split/train"][()], f["split/val"][()]
        new = {"overlap": np.union1d(train, val[:1]), "negative": np.r_[-1, train[1:]],
               "fraction": train.astype(np.float64) + 0.5, "range": np.r_[train, f["seg"].shape[0] + 3]}[damage]
        del f["split/train"]
        f["split/train"] = new
    line = one_error_line(_trainer("fit", bad, "-m", "t1n", "--out", tmp_path, *FAST))
    assert str(bad) in line and ("split" in line or "share rows" in line)
    assert list(tmp_path.glob("t1n-*")) == []
    verified = _builder("verify", bad)
    assert verified.exit_code == 1 and "Traceback" not in verified.output and "split" in verified.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_label_outside_the_classes_names_row_and_case(artifact: Path, tmp_path: Path, workers: str) -> None:
    bad = tmp_path / "label9.h5"
    shutil.copy(artifact, bad)
    with h5py.File(bad, "r+") as f:
        row = int(f["split/train"][1])
        seg = f["seg"][row]
        seg[seg > 0] = 9
        f["seg"][row] = seg
        case = f["case_id"].asstr()[row]
    line = one_error_line(_trainer("fit", bad, "-m", "t1n", "--out", tmp_path, *FAST, "--workers", workers))
    assert f"row {row} (case {case}) holds label 9" in line and "brats-build verify" in line


def test_attributes_out_of_bounds_and_missing_datasets(artifact: Path, tmp_path: Path) -> None:
    deep = tmp_path / "deep.h5"
    shutil.copy(artifact, deep)
    with h5py.File(deep, "r+") as f:
        f.attrs["axis_codes"] = "[" * 50_000 + "]" * 50_000
    line = one_error_line(_trainer("fit", deep, "-m", "t1n", "--out", tmp_path, *FAST))
    assert "attribute axis_codes" in line
    assert "axis_codes" in one_error_line(_builder("info", deep))
    verified = _builder("verify", deep)
    assert verified.exit_code == 1 and "Traceback" not in verified.output and "axis_codes" in verified.output
    headless = tmp_path / "no_case_id.h5"
    shutil.copy(artifact, headless)
    with h5py.File(headless, "r+") as f:
        del f["case_id"]
    assert "/case_id: missing" in one_error_line(_trainer("fit", headless, "-m", "t1n", "--out", tmp_path, *FAST))
    verified = _builder("verify", headless)
    assert verified.exit_code == 1 and "/case_id: missing" in verified.output


class Payload:
    """Not something a checkpoint holds: loading it would need to build this object."""


def test_crafted_checkpoints_are_refused_inone_error_line(small_run: Path, tmp_path: Path) -> None:
    good = torch.load(small_run / "best.pt", weights_only=True)
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save({**good, "extra": Payload()}, crafted / "unsafe.pt")
    huge = {**good["config"], "classes": 200_000_000}
    torch.save({**good, "config": huge}, crafted / "huge.pt")
    (crafted / "truncated.pt").write_bytes((small_run / "best.pt").read_bytes()[:5000])
    case = tmp_path / "out"
    for name, words in (("unsafe.pt", "refused"), ("huge.pt", "invalid configuration"),
                        ("truncated.pt", "not a readable checkpoint")):
        line = one_error_line(_trainer("predict", crafted, str(small_run), "--out", case, "--checkpoint", name))
        assert words in line and name in line


def test_non_finite_loss_stops_and_never_becomes_best(small_artifact: Path, tmp_path: Path) -> None:
    assert "--lr inf" in one_error_line(_trainer("fit", small_artifact, "-m", "t1n", "--out", tmp_path, *FAST, "--lr",
                                                 "inf"))
    out = tmp_path / "runs"
    result = _trainer("fit", small_artifact, "-m", "t1n", "--out", out, *FAST, "--lr", "1e30", "--clip-grad", "0",
                      "--warmup-epochs", "0", "--epochs", "3")
    assert "no longer finite" in one_error_line(result)
    (run,) = out.iterdir()
    if (run / "best.pt").exists():  # only ever from a finite epoch
        weights = torch.load(run / "best.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# --- nothing left behind ----------------------------------------------------------------------------------------

def test_full_disk_while_building_leaves_nothing(cases_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.h5"
    out.write_bytes(b"the previous artifact")
    with file_size_limit(3_000_000), pytest.raises(BuildError) as caught:
        build(cases_dir, out, BuildOptions(jobs=1, rule=_every_slice(), progress=False))
    message = str(caught.value)
    assert "writing failed" in message and "partial file was removed" in message and "\n" not in message
    assert out.read_bytes() == b"the previous artifact" and _partials(tmp_path) == []


def _every_slice():
    return SliceRule(per_case=None)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    real_add = train_module.History.add

    def killed_in_second_epoch(self, row):
        real_add(self, row)
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # the run dies after epoch 2 was logged, before its checkpoints

    monkeypatch.setattr(train_module.History, "add", killed_in_second_epoch)
    out = tmp_path / "runs"
    assert _trainer("fit", small_artifact, "-m", "t1n", "--out", out, *FAST, "--epochs", "2").exit_code == 1
    monkeypatch.undo()
    (run,) = out.iterdir()
    before = (run / "last.pt").read_bytes()
    with file_size_limit((run / "best.pt").stat().st_size + 1000):  # best.pt fits, last.pt (optimiser state) not
        result = _trainer("fit", small_artifact, "--resume", run, "--epochs", "3")  # epoch 2 is not the last
    line = one_error_line(result)
    assert "last.pt: could not be written" in line and "nothing partial" in line
    assert (run / "last.pt").read_bytes() == before and _partials(run) == []
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0  # still resumable


def test_full_disk_while_predicting_leaves_no_partial_mask(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    out.mkdir()
    case = sorted(small_cases.iterdir())[0]
    with file_size_limit(1_000):
        result = _trainer("predict", small_run, case, "--out", out, "--device", "cpu", "--no-clean-up")
    line = one_error_line(result)
    assert f"{case.name}.nii.gz: could not be written" in line
    assert list(out.iterdir()) == []


def test_read_only_output_is_blamed_on_the_output(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    case = sorted(small_cases.iterdir())[0]
    code = ("import sys; from trainer.cli import main; "
            f"sys.argv = ['brats-train', 'predict', '{small_run}', '{case}', '--out', '{out}', '--device', 'cpu']; main()")
    done = subprocess.run(unprivileged([sys.executable, "-c", code]), capture_output=True, text=True)
    out.chmod(0o755)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not be written" in done.stderr and "brats-build verify" not in done.stderr


def _build_process(source: Path, out: Path) -> subprocess.Popen:
    code = ("import sys; from builder.cli import main; "
            f"sys.argv = ['brats-build', 'build', '{source}', '{out}', '--jobs', '2', '--slices-per-case', 'all']; main()")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_build_at_once_and_leaves_nothing(cases_dir: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "signalled.h5"
    process = _build_process(cases_dir, out)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".signalled.h5.*.partial")) or len(_children(process.pid)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    workers = _children(process.pid)
    process.send_signal(signum)
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - stopped < 5
    assert process.returncode == 128 + signum and "Traceback" not in stderr
    assert "removed" in stderr and not out.exists() and _partials(tmp_path) == []
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_partials_of_killed_builds_are_removed_by_the_next(cases_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.h5.{int(dead.stdout)}.partial"
    stale.write_bytes(b"gigabytes, once")
    alive = tmp_path / f".x.h5.{os.getppid()}.partial"  # a build that still runs keeps its file
    alive.write_bytes(b"in progress")
    result = _builder("build", cases_dir, out, "--jobs", "1")
    assert result.exit_code == 0 and f"removed {stale}" in result.output
    assert not stale.exists() and alive.exists() and out.is_file()


# --- unreadable and odd inputs ----------------------------------------------------------------------------------

def test_unreadable_files_and_folders_are_skipped_with_reasons(case_copy, tmp_path: Path) -> None:
    source = case_copy(4)
    cases = sorted(source.iterdir())
    (cases[0] / f"{cases[0].name}-t2w.nii.gz").chmod(0)
    cases[1].chmod(0)
    out = tmp_path / "out.h5"
    code = ("import sys; from builder.cli import main; "
            f"sys.argv = ['brats-build', 'build', '{source}', '{out}', '--jobs', '1']; main()")
    done = subprocess.run(unprivileged([sys.executable, "-c", code]), capture_output=True, text=True)
    cases[1].chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert f"skipped {cases[0].name}:" in done.stdout and "-t2w.nii.gz: cannot be read (Permission denied)" in done.stdout
    assert f"skipped {cases[1].name}: folder cannot be read (Permission denied)" in done.stdout
    assert "from 2/4 cases" not in done.stdout and "from 2/3 cases" in done.stdout


def test_upper_case_extensions_are_read(case_copy, tmp_path: Path) -> None:
    source = case_copy(3)
    case = sorted(source.iterdir())[0]
    for path in case.iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", ".NII.GZ")))
    summary = build(source, tmp_path / "x.h5", BuildOptions(jobs=1, progress=False))
    assert summary.cases_written == 3 and summary.skipped == []


# --- checksums and portable compression -------------------------------------------------------------------------

def _flip_a_byte(path: Path, name: str, chunk: int = 0) -> None:
    with h5py.File(path) as f:
        info = f[name].id.get_chunk_info(chunk)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_verify_names_the_case_and_checks_the_row_metadata(artifact: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.h5"
    shutil.copy(artifact, damaged)
    _flip_a_byte(damaged, "t2f", 5)
    with h5py.File(damaged) as f:
        case = f["case_id"].asstr()[5]
    result = _builder("verify", damaged)
    assert result.exit_code == 1 and f"/t2f: row 5 (case {case}) unreadable" in result.output
    for name in ("case_id", "slice_index", "split/test"):
        bad = tmp_path / f"{name.replace('/', '_')}.h5"
        shutil.copy(artifact, bad)
        _flip_a_byte(bad, name)
        result = _builder("verify", bad)
        assert result.exit_code == 1 and f"/{name}: unreadable, damaged" in result.output, result.output


def test_gzip_files_read_with_plain_h5py_and_train_alike(cases_dir: Path, artifact: Path, tmp_path: Path) -> None:
    portable = tmp_path / "gzip.h5"
    result = _builder("build", cases_dir, portable, "--jobs", "1", "--compression", "gzip", "--val-fraction", "0.25",
                      "--test-fraction", "0.25")
    assert result.exit_code == 0, result.output
    read = "import h5py, sys; f = h5py.File(sys.argv[1]); print(int(f['t2f'][0].sum()))"  # no hdf5plugin
    plain = subprocess.run([sys.executable, "-c", read, str(portable)], capture_output=True, text=True)
    with h5py.File(artifact) as f:
        assert plain.returncode == 0 and int(plain.stdout) == int(f["t2f"][0].sum())
    blosc = subprocess.run([sys.executable, "-c", read, str(artifact)], capture_output=True, text=True)
    assert blosc.returncode != 0  # what the option is for: the default needs the plugin
    info = _builder("info", portable).output
    assert "gzip: built into HDF5" in info and "Blosc" not in info
    assert "32001: the Blosc plugin" in _builder("info", artifact).output
    from trainer.data import SliceDataset

    a, b = Artifact.open(portable), Artifact.open(artifact)
    rows = a.rows_of("train")
    first, second = SliceDataset(a.path, rows, ["t1n", "t2f"])[0], SliceDataset(b.path, rows, ["t1n", "t2f"])[0]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

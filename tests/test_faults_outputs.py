"""Outputs written whole or not at all: full disks while building and predicting, read-only output folders, signals
that end a build, partials left by killed builds, and two writers of one output."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.build import BuildError, BuildOptions, build
from builder.extract import SliceRule

from conftest import (
    builder_cli,
    file_size_limit,
    one_error_line,
    partials,
    read_volume,
    released_together,
    trainer_cli,
    unprivileged,
    writable_copy,
)


def test_full_disk_while_building_leaves_nothing(cases_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.h5"
    out.write_bytes(b"the previous artifact")
    with file_size_limit(3_000_000), pytest.raises(BuildError) as caught:
        build(cases_dir, out, BuildOptions(jobs=1, rule=_every_slice(), progress=False))
    message = str(caught.value)
    assert "writing failed" in message and "partial file was removed" in message and "\n" not in message
    assert out.read_bytes() == b"the previous artifact" and partials(tmp_path) == []


def _every_slice():
    return SliceRule(per_case=None)


def test_full_disk_while_predicting_leaves_no_partial_mask(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    out.mkdir()
    case = sorted(small_cases.iterdir())[0]
    with file_size_limit(1_000):
        result = trainer_cli("predict", small_run, case, "--out", out, "--device", "cpu", "--no-clean-up")
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


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


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
    assert "removed" in stderr and not out.exists() and partials(tmp_path) == []
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]


def test_partials_of_killed_builds_are_removed_by_the_next(cases_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.h5.{int(dead.stdout)}.partial"
    stale.write_bytes(b"gigabytes, once")
    alive = tmp_path / f".x.h5.{os.getppid()}.partial"  # a build that still runs keeps its file
    alive.write_bytes(b"in progress")
    result = builder_cli("build", cases_dir, out, "--jobs", "1")
    assert result.exit_code == 0 and f"removed {stale}" in result.output
    assert not stale.exists() and alive.exists() and out.is_file()


def test_two_writers_of_one_output_leave_one_whole_write(tmp_path: Path) -> None:
    """Two processes writing one output at the same moment, 30 times each (as two `predict` runs into one folder do,
    through ``atomic_output`` like every output): the file is always one writer's whole write, and no partial is
    left."""
    target = tmp_path / "out" / "BraTS-GLI-00003-000.nii.gz"
    target.parent.mkdir()
    body = ("for _ in range(30):\n    with atomic_output(pathlib.Path(args[0]), suffix='.nii.gz') as partial:\n"
            "        partial.write_bytes(args[1].encode() * 200_000)")
    done = released_together("from trainer.outputs import atomic_output", body,
                             [[str(target), "a"], [str(target), "b"]], tmp_path / "go")
    assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
    assert target.read_bytes() in (b"a" * 200_000, b"b" * 200_000)
    assert partials(target.parent) == []


def test_a_case_name_near_the_file_system_limit_is_predicted(small_run: Path, small_cases: Path,
                                                             tmp_path: Path) -> None:
    """A legal 244-byte case name: its files (255 bytes) and its mask (251) fit, and so does the mask's partial."""
    source = small_cases / "BraTS-GLI-00003-000"
    name = "BraTS-GLI-00003-000" + "x" * (244 - len("BraTS-GLI-00003-000"))
    case = tmp_path / "in" / name
    case.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copy(path, case / path.name.replace(source.name, name))
    out = tmp_path / "out"
    result = trainer_cli("predict", small_run, case, "--out", out, "--device", "cpu", "--save-probabilities")
    assert result.exit_code == 0, result.output
    assert read_volume(out / f"{name}.nii.gz").shape == read_volume(source / f"{source.name}-seg.nii.gz").shape
    assert (out / f"{name}.npz").is_file() and name in (out / "predict_scores.csv").read_text()
    assert partials(out) == []


def test_predict_killed_and_rerun_scores_every_case(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    """SIGKILL after the first mask: the rerun keeps it, writes the rest, and its table holds every case, the kept
    masks scored as written; masks another model wrote are refused, not mixed in."""
    inputs = tmp_path / "in"
    cases = sorted(small_cases.iterdir())[:3]
    for case in cases:
        shutil.copytree(case, inputs / case.name)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "trainer", "predict", str(small_run), str(inputs), "--out",
                                str(out), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / f"{cases[0].name}.nii.gz"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert first.is_file()
    for case in cases[1:]:  # as if the kill had come before them, however fast this machine is
        (out / f"{case.name}.nii.gz").unlink(missing_ok=True)
    rerun = trainer_cli("predict", small_run, inputs, "--out", out, "--device", "cpu")
    assert rerun.exit_code == 0, rerun.output
    assert rerun.output.count("written before by these models") == 1 and rerun.output.count(": wrote ") == 2
    assert "3 cases in" in rerun.output and "3 scored" in rerun.output and "0 skipped" in rerun.output
    with open(out / "predict_scores.csv") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {case.name for case in cases} and rows[cases[0].name]["written"] == "before"
    for case in cases:
        mask, truth = read_volume(out / f"{case.name}.nii.gz"), read_volume(case / f"{case.name}-seg.nii.gz")
        p, t = mask > 0, truth > 0
        expected = 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())
        assert float(rows[case.name]["dice_WT"]) == pytest.approx(expected)
    other = trainer_cli("predict", small_run, inputs, "--out", out, "--device", "cpu", "--tta")
    assert other.exit_code == 1 and other.output.count("written by other models, options or inputs") == 3
    assert "--overwrite" in other.output and (out / "predict_scores.csv").is_file()


def _tool(*args: object, stdout: object) -> subprocess.CompletedProcess:
    """A command-line tool in a child process, its standard output as given (a file, or a pipe)."""
    tool = {"brats-build": "builder", "brats-train": "trainer"}[str(args[0])]
    return subprocess.run([sys.executable, "-m", tool, *map(str, args[1:])], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=300)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_standard_output_is_its_own_message(small_cases: Path, small_artifact: Path, tmp_path: Path) -> None:
    """`> /dev/full`: one line on standard error naming standard output, never the file read or written, no
    traceback; what build wrote is whole."""
    with open("/dev/full", "w") as full:
        for args in (("brats-build", "info", small_artifact), ("brats-build", "verify", small_artifact),
                     ("brats-build", "build", small_cases, tmp_path / "new.h5", "--jobs", "1")):
            done = _tool(*args, stdout=full)
            assert done.returncode == 1 and "Traceback" not in done.stderr, (args, done.stderr)
            assert done.stderr.strip().splitlines() == ["Error: standard output could not be written (No space left "
                                                        "on device); what the command printed is lost; files are "
                                                        "written whole or not at all"]
    assert builder_cli("verify", tmp_path / "new.h5").exit_code == 0 and partials(tmp_path) == []


def test_a_closed_pipe_ends_a_command_quietly(small_artifact: Path, small_run: Path, tmp_path: Path) -> None:
    """`| head -c 1`: the reader goes away; the command ends at its next write with a closed pipe's status (141, as
    a process ended by SIGPIPE) and says nothing, as Unix tools do; never "reading failed (Broken pipe)"."""
    run = writable_copy(small_run, tmp_path)
    for args in (("brats-build", "info", small_artifact), ("brats-train", "evaluate", run, "--device", "cpu")):
        read, write = os.pipe()
        os.close(read)
        try:
            done = _tool(*args, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == 141 and done.stderr == "", (args, done.stderr)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_onto_a_full_disk_leaves_neither_file(small_run: Path, tmp_path: Path, fmt: str) -> None:
    """The network and its sidecar are one unit: torch's own writer aborted the process on a full disk (a C++
    abort, a partial left); now the bytes are made in memory and a failed write is one line naming the outputs."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
    run = writable_copy(small_run, tmp_path)
    suffix = {"torchscript": ".pt", "onnx": ".onnx"}[fmt]
    with file_size_limit(100_000):  # the network is megabytes: its write fails as on a full disk
        line = one_error_line(trainer_cli("export", run, "--format", fmt))
    assert f"model{suffix}" in line and f"model{suffix}.json" in line and "could not be written" in line
    assert not (run / f"model{suffix}").exists() and not (run / f"model{suffix}.json").exists()
    assert partials(run) == []
    (run / f"model{suffix}.json").mkdir()  # in the sidecar's way: refused before anything is written
    line = one_error_line(trainer_cli("export", run, "--format", fmt))
    assert f"model{suffix}.json: is a folder" in line and not (run / f"model{suffix}").exists()

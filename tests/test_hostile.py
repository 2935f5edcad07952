"""The second round of a hostile but fair user: damaged checkpoints and run folders, files whose data lives
elsewhere, edited artifacts, flipped bits, concurrent writers, hostile volumes, and the machine's limits. Each
ends in one line naming the cause or in a correct result, never a traceback, a hang or a silent change."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from builder.build import BuildOptions, build
from builder.cli import main as build_main
from builder.inspect import verify
from trainer import train as train_module
from trainer.cli import main

from conftest import FAST, one_error_line


def _trainer(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _builder(*args: object):
    return CliRunner().invoke(build_main, [str(a) for a in args])


# --- checked checkpoints --------------------------------------------------------------------------------------------

def test_a_checkpoint_with_one_byte_changed_is_refused(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    data = bytearray((run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the weights: torch itself would load it as other weights
    (run / "best.pt").write_bytes(bytes(data))
    for command in (["evaluate", run, "--device", "cpu"],
                    ["predict", run, small_cases / "BraTS-GLI-00003-000", "--out", tmp_path / "out", "--device", "cpu"],
                    ["export", run, "--format", "torchscript"]):
        line = one_error_line(_trainer(*command))
        assert "best.pt: damaged" in line and "CRC" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_fields_of_the_wrong_type_are_one_line(small_run: Path, small_artifact: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "crop": "abc"}}, run / "best.pt")
    line = one_error_line(_trainer("evaluate", run, "--device", "cpu"))
    assert "crop is 'abc'" in line and "whole number" in line
    torch.save({**checkpoint, "epoch": "0", "step": 2, "best_score": 0.1, "bad_epochs": 0, "optimizer": {},
                "schedule": {}, "scaler": {}}, run / "last.pt")
    line = one_error_line(_trainer("fit", small_artifact, "--resume", run))
    assert "last.pt: its epoch is '0'" in line


# --- the artifact holds its own data --------------------------------------------------------------------------------

@pytest.mark.parametrize("elsewhere", ["external link", "virtual dataset", "external storage"])
def test_data_stored_outside_the_artifact_is_refused(small_artifact: Path, tmp_path: Path, elsewhere: str) -> None:
    bad = tmp_path / "bad.h5"
    shutil.copy(small_artifact, bad)
    outside = tmp_path / "outside.h5"
    with h5py.File(bad, "r+") as f:
        values = f["t2f"][()]
        del f["t2f"]
        if elsewhere == "external link":
            with h5py.File(outside, "w") as other:
                other["t2f"] = values
            f["t2f"] = h5py.ExternalLink(str(outside), "t2f")
        elif elsewhere == "virtual dataset":
            with h5py.File(outside, "w") as other:
                other["t2f"] = values
            layout = h5py.VirtualLayout(values.shape, values.dtype)
            layout[:] = h5py.VirtualSource(str(outside), "t2f", values.shape)
            f.create_virtual_dataset("t2f", layout)
        else:
            raw = tmp_path / "t2f.raw"
            values.tofile(raw)
            f.create_dataset("t2f", values.shape, values.dtype, external=[(str(raw), 0, values.nbytes)])
    line = one_error_line(_trainer("fit", bad, "-m", "t2f", "--out", tmp_path / "runs", *FAST))
    assert "/t2f" in line and ("link" in line or "virtual" in line or "external" in line)
    verified = _builder("verify", bad)
    assert verified.exit_code == 1 and "holds its own data" in verified.output and "Traceback" not in verified.output


def test_flipped_bits_in_the_metadata_are_caught(small_artifact: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_integrity import contents, metadata_bytes, same

    expected, offsets = contents(small_artifact), metadata_bytes(small_artifact)
    rng = random.Random(1)
    copy = tmp_path / "flipped.h5"
    silent = []
    for _ in range(25):
        shutil.copy(small_artifact, copy)
        offset = int(offsets[rng.randrange(len(offsets))])
        with open(copy, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ (1 << rng.randrange(8))]))
        if not verify(copy):
            try:
                if not same(contents(copy), expected):
                    silent.append(offset)
            except (OSError, RuntimeError, KeyError):
                pass
    assert silent == []


# --- edited artifacts -----------------------------------------------------------------------------------------------

def _edited(artifact: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.h5"
    shutil.copy(artifact, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _labels_as(dtype: str, value: float):
    def edit(f: h5py.File) -> None:
        seg = f["seg"][()].astype(dtype)
        seg[0, 10, 10] = value
        del f["seg"]
        f.create_dataset("seg", data=seg, chunks=(1, *seg.shape[1:]), fletcher32=True)
    return edit


def _shorter(name: str):
    def edit(f: h5py.File) -> None:
        values = f[name][()][:-1]
        del f[name]
        f.create_dataset(name, data=values)
    return edit


def _attribute(key: str, value: object):
    def edit(f: h5py.File) -> None:
        f.attrs[key] = value
    return edit


@pytest.mark.parametrize("edit, words", [
    (_labels_as("int8", -1), "uint8"),
    (_labels_as("float32", 1.5), "uint8"),
    (_shorter("t2w"), "/t2w: shape"),
    (_shorter("case_id"), "/seg: shape"),
    (_attribute("axis_codes", 5), "attribute axis_codes"),
    (_attribute("modalities", 7), "attribute modalities"),
], ids=["seg int8", "seg float", "fewer rows", "fewer case ids", "axis codes a number", "modalities a number"])
def test_edited_artifacts_are_one_line_everywhere(small_artifact: Path, small_run: Path, tmp_path: Path, edit,
                                                 words: str) -> None:
    bad = _edited(small_artifact, tmp_path, edit)
    assert words in one_error_line(_trainer("fit", bad, "-m", "t2w", "--out", tmp_path / "runs", *FAST))
    assert words in one_error_line(_trainer("evaluate", small_run, "--data", bad, "--other-data", "--device", "cpu"))
    assert words in one_error_line(_builder("info", bad))
    verified = _builder("verify", bad)
    assert verified.exit_code == 1 and words in verified.output and "Traceback" not in verified.output


# --- concurrent writers ---------------------------------------------------------------------------------------------

def _released_together(commands: list[list[str]], barrier: Path) -> list[subprocess.CompletedProcess]:
    """Start the commands, let them import, then release them at once (each waits for ``barrier``)."""
    wait = ("import sys, time, pathlib\ngo = pathlib.Path(sys.argv.pop(1))\nready = pathlib.Path(sys.argv.pop(1))\n"
            "import trainer.cli, trainer.train, trainer.predict\nfrom trainer.launch import main\nready.touch()\n"
            "while not go.exists(): time.sleep(0.005)\nsys.argv[0] = 'brats-train'\nmain()")
    ready = [barrier.with_name(f"ready-{n}") for n in range(len(commands))]
    processes = [subprocess.Popen([sys.executable, "-c", wait, str(barrier), str(flag), *command],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command, flag in zip(commands, ready)]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    barrier.touch()  # every process has loaded the trainer: released together
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in processes]


def test_two_predictions_of_one_case_into_one_folder(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    case, out = small_cases / "BraTS-GLI-00003-000", tmp_path / "out"
    command = ["predict", str(small_run), str(case), "--out", str(out), "--device", "cpu", "--overwrite",
               "--save-probabilities"]
    for done in _released_together([command, command], tmp_path / "go"):
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    mask = nib.load(out / "BraTS-GLI-00003-000.nii.gz")  # whole, whichever write came last
    assert mask.shape == nib.load(next(case.glob("*-t1n.nii.gz"))).shape
    assert np.load(out / "BraTS-GLI-00003-000.npz")["probabilities"].shape[0] == 4
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_two_runs_with_one_name_get_two_folders(small_artifact: Path, tmp_path: Path) -> None:
    command = ["fit", str(small_artifact), "-m", "t1n", "--out", str(tmp_path / "runs"), "--name", "same", *FAST,
               "--epochs", "1", "--max-steps", "1"]
    for done in _released_together([command, command], tmp_path / "go"):
        assert done.returncode == 0, done.stderr
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all((folder / "best.pt").is_file() for folder in folders)


def test_a_run_in_use_is_refused_to_a_second_resume(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    real_add = train_module.History.add

    def killed(self, row):
        real_add(self, row)
        raise KeyboardInterrupt  # killed before the first checkpoint was written

    monkeypatch.setattr(train_module.History, "add", killed)
    assert _trainer("fit", small_artifact, "-m", "t1n", "--out", tmp_path / "runs", *FAST).exit_code == 1
    monkeypatch.undo()
    (run,) = (tmp_path / "runs").iterdir()
    assert not list(run.glob("*.pt")) and (run / "config.json").is_file()
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (run / ".fit.lock").write_text(str(owner.pid))  # a live fit holds it
        assert "in use by a live fit" in one_error_line(_trainer("fit", "--resume", run, "--epochs", "1"))
    finally:
        owner.kill()
        owner.wait()
    resumed = _trainer("fit", "--resume", run, "--epochs", "1")  # the stale lock taken over; started from scratch
    assert resumed.exit_code == 0, resumed.output
    assert (run / "best.pt").is_file() and not (run / ".fit.lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(_trainer("fit", "--resume", empty))
    assert "nothing to resume" in line and f"delete {empty}" in line


def test_a_damaged_metrics_file_is_read_up_to_the_damage(small_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert _trainer("fit", small_artifact, "-m", "t1n", "--out", out, *FAST, "--epochs", "2",
                    "--keep-last").exit_code == 0
    (run,) = out.iterdir()
    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics[: len(metrics) - 40])  # cut mid-row
    resumed = _trainer("fit", "--resume", run, "--epochs", "3")
    assert resumed.exit_code == 0 and "line 3 is damaged" in resumed.output
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "2"]  # epoch 1's row was lost, epoch 2 appended


def test_unwritable_run_folders_are_write_errors(small_artifact: Path, tmp_path: Path) -> None:
    from conftest import unprivileged

    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    code = ("import sys; from trainer.launch import main; sys.argv = ['brats-train', 'fit', sys.argv[1], '-m', "
            f"'t1n', '--out', sys.argv[2], {', '.join(repr(a) for a in FAST)}]; main()")
    done = subprocess.run(unprivileged([sys.executable, "-c", code, str(small_artifact), str(parent / "runs")]),
                          capture_output=True, text=True)
    parent.chmod(0o755)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not be created" in done.stderr and "reading failed" not in done.stderr


# --- hostile volumes ------------------------------------------------------------------------------------------------

def _huge_header(path: Path) -> None:
    """A NIfTI that claims 240 x 240 x 32767 int16 voxels (3.8 GB) over a few real bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape((240, 240, 32767))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    raw = header.binaryblock + b"\0" * (int(header["vox_offset"]) - 348) + b"\0" * 4096
    path.write_bytes(gzip.compress(raw))


def test_hostile_headers_are_skipped_before_any_voxel_is_read(small_cases: Path, small_run: Path,
                                                             tmp_path: Path) -> None:
    source = tmp_path / "source"
    cases = sorted(small_cases.iterdir())[:3]
    for case in cases:
        shutil.copytree(case, source / case.name)
    _huge_header(next((source / cases[0].name).glob("*-t2w.nii.gz")))
    flat = next((source / cases[1].name).glob("*-t1c.nii.gz"))  # pixdim[3] = 0, which nibabel would read as 1 mm
    raw = bytearray(gzip.decompress(flat.read_bytes()))
    struct.pack_into("<f", raw, 88, 0.0)
    flat.write_bytes(gzip.compress(bytes(raw)))
    summary = build(source, tmp_path / "x.h5", BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0))
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert "every dimension must be 1 to 1024" in reasons[cases[0].name]
    assert "voxel size (1.0, 1.0, 0.0) mm" in reasons[cases[1].name] and summary.cases_written == 1
    predicted = _trainer("predict", small_run, source, "--out", tmp_path / "out", "--device", "cpu")
    assert predicted.exit_code == 1 and "Traceback" not in predicted.output
    assert f"skipped {cases[0].name}:" in predicted.output and "every dimension must be 1 to 1024" in predicted.output
    assert (tmp_path / "out" / f"{cases[2].name}.nii.gz").is_file()


def test_links_back_up_the_tree_end_the_scan(small_cases: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    for case in sorted(small_cases.iterdir())[:2]:
        shutil.copytree(case, source / case.name)
    (source / "again").symlink_to(source, target_is_directory=True)
    (source / "once more").symlink_to(source, target_is_directory=True)
    result = _builder("build", source, tmp_path / "x.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "from 2/2 cases" in result.output and result.output.count("not scanned again") == 2


# --- the machine's limits -------------------------------------------------------------------------------------------

def _limited(resource_name: str, value: int, code: str, *args: str) -> subprocess.CompletedProcess:
    setup = (f"import resource; resource.setrlimit(resource.{resource_name}, ({value}, {value}))\n")
    return subprocess.run([sys.executable, "-c", setup + code, *args], capture_output=True, text=True, timeout=300)


def test_too_few_file_descriptors_for_a_build(small_cases: Path, tmp_path: Path) -> None:
    code = ("import sys; from builder.cli import main; sys.argv = ['brats-build', 'build', sys.argv[1], sys.argv[2], "
            "'--jobs', '2']; main()")
    done = _limited("RLIMIT_NOFILE", 16, code, str(small_cases), str(tmp_path / "x.h5"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "ran out of open files" in done.stderr and "fewer --jobs" in done.stderr
    assert not list(tmp_path.iterdir())


def test_too_little_memory_to_load_or_train(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    code = "import sys; from trainer.launch import main; sys.argv = ['brats-train', 'fit', sys.argv[1], '-m', 't1n']; main()"
    done = _limited("RLIMIT_AS", 600 << 20, code, str(small_artifact))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not start" in done.stderr and "memory limit" in done.stderr

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 268435456 bytes")

    monkeypatch.setattr(train_module, "train_step", no_room)
    line = one_error_line(_trainer("fit", small_artifact, "-m", "t1n", "--out", tmp_path / "runs", *FAST))
    assert "out of memory" in line and "--batch-size" in line


def test_json_outputs_are_strict(small_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert _trainer("evaluate", run, "--device", "cpu").exit_code == 0
    for path in run.glob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
    assert os.path.getsize(run / "test_metrics.json") > 0
    # a tiny run may hold no NaN at all: the writer every JSON output goes through, given NaN and infinities
    from trainer.reports import write_json

    write_json(tmp_path / "values.json", {"nan": float("nan"), "list": [np.float32("inf"), 1.5], "ok": np.float64(2)})
    written = json.loads((tmp_path / "values.json").read_text(), parse_constant=lambda c: pytest.fail(f"holds {c}"))
    assert written == {"nan": None, "list": [None, 1.5], "ok": 2.0}

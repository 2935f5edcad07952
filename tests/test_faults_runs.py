"""Faults of runs and checkpoints: crafted or damaged checkpoints, fields of the wrong type, a loss that stops being
finite, a full disk while saving, run folders shared, locked, damaged or unwritable, too little memory, and strict
JSON outputs. Each ends in one line naming the cause, and what a run leaves behind stays usable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import CONFIG_VERSION
from trainer.training import loop as train_module

from conftest import (
    FAST,
    file_size_limit,
    fit_killed,
    limited,
    one_error_line,
    partials,
    released_together,
    trainer_cli,
    unprivileged,
    writable_copy,
)


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
    assert good["config"]["config_version"] == CONFIG_VERSION  # what a checkpoint says it is, for later readers
    torch.save({**good, "config": {**good["config"], "config_version": 99}}, crafted / "newer.pt")
    torch.save({**good, "config": {**good["config"], "format_version": 99}}, crafted / "newer-format.pt")
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 1, 1)), crafted / "torchscript.pt")
    torch.save(good, crafted / "legacy.pt", _use_new_zipfile_serialization=False)
    (crafted / "text.pt").write_text("weights: none\n")
    case = tmp_path / "out"
    for name, words in (("unsafe.pt", "refused"), ("huge.pt", "invalid configuration"),
                        ("truncated.pt", "a checkpoint cut short"), ("newer.pt", "configuration version 99"),
                        ("newer-format.pt", "artifact format 99"), ("torchscript.pt", "a TorchScript model"),
                        ("legacy.pt", "torch's legacy (before 1.6) format"), ("text.pt", "not a torch checkpoint")):
        line = one_error_line(trainer_cli("predict", crafted, str(small_run), "--out", case, "--checkpoint", name))
        assert words in line and name in line


def test_a_checkpoint_with_one_byte_changed_is_refused(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    data = bytearray((run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the weights: torch itself would load it as other weights
    (run / "best.pt").write_bytes(bytes(data))
    for command in (["evaluate", run, "--device", "cpu"],
                    ["predict", run, small_cases / "BraTS-GLI-00003-000", "--out", tmp_path / "out", "--device", "cpu"],
                    ["export", run, "--format", "torchscript"]):
        line = one_error_line(trainer_cli(*command))
        assert "best.pt: damaged" in line and "CRC" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_fields_of_the_wrong_type_are_one_line(small_run: Path, small_artifact: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "crop": "abc"}}, run / "best.pt")
    line = one_error_line(trainer_cli("evaluate", run, "--device", "cpu"))
    assert "crop is 'abc'" in line and "whole number" in line
    torch.save({**checkpoint, "epoch": "0", "step": 2, "best_score": 0.1, "bad_epochs": 0, "optimizer": {},
                "schedule": {}, "scaler": {}}, run / "last.pt")
    line = one_error_line(trainer_cli("fit", small_artifact, "--resume", run))
    assert "last.pt: its epoch is '0'" in line


def test_non_finite_loss_stops_and_never_becomes_best(small_artifact: Path, tmp_path: Path) -> None:
    assert "--lr inf" in one_error_line(trainer_cli("fit", small_artifact, "-m", "t1n", "--out", tmp_path, *FAST, "--lr",
                                                 "inf"))
    out = tmp_path / "runs"
    result = trainer_cli("fit", small_artifact, "-m", "t1n", "--out", out, *FAST, "--lr", "1e30", "--clip-grad", "0",
                      "--warmup-epochs", "0", "--epochs", "3")
    assert "no longer finite" in one_error_line(result)
    (run,) = out.iterdir()  # not finite from the first epoch: nothing of it was saved or logged
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists() and not (run / "metrics.csv").exists()
    assert "stopped: CommandError: epoch 1: the loss is no longer finite" in (run / "log.txt").read_text()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(small_artifact: Path, tmp_path: Path) -> None:
    run = fit_killed(small_artifact, tmp_path / "runs", 1, epochs=2)  # after epoch 2 was logged, before its checkpoints
    before = (run / "last.pt").read_bytes()
    with file_size_limit((run / "best.pt").stat().st_size + 1000):  # best.pt fits, last.pt (optimiser state) not
        result = trainer_cli("fit", small_artifact, "--resume", run, "--epochs", "3")  # epoch 2 is not the last
    line = one_error_line(result)
    assert "last.pt: could not be written" in line and "nothing partial" in line
    assert (run / "last.pt").read_bytes() == before and partials(run) == []
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0  # still resumable


def test_two_runs_with_one_name_get_two_folders(tmp_path: Path) -> None:
    """Two processes that start runs of one name at the same moment, 25 times each: every run gets a folder of its own
    (``new_run_dir``, what `fit` calls: one mkdir that fails when the folder exists, never check-then-create)."""
    out = tmp_path / "runs"
    body = "for _ in range(25):\n    print(new_run_dir(pathlib.Path(args[0]), 'same'))"
    done = released_together("from trainer.training.runs import new_run_dir", body, [[str(out)], [str(out)]],
                             tmp_path / "go")
    assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
    made = [line for d in done for line in d.stdout.split()]
    assert len(made) == len(set(made)) == 50 and sorted(map(str, out.iterdir())) == sorted(made)


def test_a_run_in_use_is_refused_to_a_second_resume(small_artifact: Path, tmp_path: Path) -> None:
    run = fit_killed(small_artifact, tmp_path / "runs", 0)  # killed before the first checkpoint was written
    assert not list(run.glob("*.pt")) and (run / "config.json").is_file()
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (run / ".fit.lock").write_text(str(owner.pid))  # a live fit holds it
        assert "in use by a live fit" in one_error_line(trainer_cli("fit", "--resume", run, "--epochs", "1"))
    finally:
        owner.kill()
        owner.wait()
    resumed = trainer_cli("fit", "--resume", run, "--epochs", "1")  # the stale lock taken over; started from scratch
    assert resumed.exit_code == 0, resumed.output
    assert (run / "best.pt").is_file() and not (run / ".fit.lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(trainer_cli("fit", "--resume", empty))
    assert "nothing to resume" in line and f"delete {empty}" in line


def test_a_damaged_metrics_file_is_read_up_to_the_damage(resumable_run: Path, tmp_path: Path) -> None:
    run = writable_copy(resumable_run, tmp_path)
    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics[: len(metrics) - 40])  # cut mid-row
    resumed = trainer_cli("fit", "--resume", run, "--epochs", "3")
    assert resumed.exit_code == 0 and "line 3 is damaged" in resumed.output
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "2"]  # epoch 1's row was lost, epoch 2 appended


def test_unwritable_run_folders_are_write_errors(small_artifact: Path, tmp_path: Path) -> None:

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


def test_too_little_memory_to_load_or_train(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    code = "import sys; from trainer.launch import main; sys.argv = ['brats-train', 'fit', sys.argv[1], '-m', 't1n']; main()"
    done = limited("RLIMIT_AS", 600 << 20, code, str(small_artifact))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not start" in done.stderr and "memory limit" in done.stderr

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 268435456 bytes")

    monkeypatch.setattr(train_module, "train_step", no_room)
    line = one_error_line(trainer_cli("fit", small_artifact, "-m", "t1n", "--out", tmp_path / "runs", *FAST))
    assert "out of memory" in line and "--batch-size" in line


def test_json_outputs_are_strict(small_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert trainer_cli("evaluate", run, "--device", "cpu").exit_code == 0
    for path in run.glob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))
    assert os.path.getsize(run / "test_metrics.json") > 0
    # a tiny run may hold no NaN at all: the writer every JSON output goes through, given NaN and infinities
    from trainer.outputs import write_json

    write_json(tmp_path / "values.json", {"nan": float("nan"), "list": [np.float32("inf"), 1.5], "ok": np.float64(2)})
    written = json.loads((tmp_path / "values.json").read_text(), parse_constant=lambda c: pytest.fail(f"holds {c}"))
    assert written == {"nan": None, "list": [None, 1.5], "ok": 2.0}

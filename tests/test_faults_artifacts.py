"""Faults of the artifact: a file rebuilt or replaced under a run, damaged splits and labels, attributes out of bounds,
data stored outside the file, edited datasets and flipped bits. Each ends in one line naming the file and the fix
(or is caught by `brats-build verify`), never a traceback or a silent change."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from builder.build import BuildOptions, build
from builder.extract import SliceRule
from builder.inspect import verify
from trainer.cli import make_config
from trainer.data.artifact import Artifact
from trainer.errors import ArtifactError
from trainer.training.loop import fit

from conftest import FAST, FAST_OPTIONS, builder_cli, one_error_line, trainer_cli, writable_copy


def test_rebuilt_file_is_refused_unless_scored_on_purpose(small_run: Path, small_artifact: Path, small_cases: Path,
                                                          tmp_path: Path) -> None:
    run = writable_copy(small_run, tmp_path)
    moved = tmp_path / "moved.h5"
    shutil.copy(small_artifact, moved)  # the same build, moved: accepted
    assert trainer_cli("evaluate", run, "--data", moved, "--device", "cpu").exit_code == 0
    rebuilt = tmp_path / "rebuilt.h5"
    build(small_cases, rebuilt, BuildOptions(jobs=1, seed=5, val_fraction=0.25, test_fraction=0.25, progress=False,
                                             rule=SliceRule(context=1)))
    line = one_error_line(trainer_cli("evaluate", run, "--data", rebuilt, "--device", "cpu"))
    assert "not the file this run trained on" in line and Artifact.open(rebuilt).data_id in line
    assert "--other-data" in line
    scored = trainer_cli("evaluate", run, "--data", rebuilt, "--other-data", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert "on purpose" in json.loads((run / "test_metrics.json").read_text())["data_check"]
    killed = tmp_path / "killed"  # a run killed before its first checkpoint: its options alone
    killed.mkdir()
    shutil.copy(small_run / "config.json", killed)
    resumed = trainer_cli("fit", rebuilt, "--resume", killed)
    assert "not the file this run trained on" in one_error_line(resumed)


@pytest.mark.parametrize("how", ["replaced", "copied over"])
def test_file_replaced_during_fit_is_detected_not_read(small_artifact: Path, small_cases: Path, tmp_path: Path,
                                                       how: str) -> None:
    """A colleague rebuilds the file (a new inode), or copies another over it (same inode, new bytes: h5py's reads
    then fail inside a chunk): either way the run says the file changed, never that it is damaged."""
    data = tmp_path / "data.h5"
    shutil.copy(small_artifact, data)
    other = tmp_path / "other.h5"
    build(small_cases, other, BuildOptions(jobs=1, seed=9, val_fraction=0.25, test_fraction=0.25, progress=False))

    def rebuild(row):  # while epoch 1 is being logged
        if row["epoch"] == 0:
            os.replace(other, data) if how == "replaced" else shutil.copyfile(other, data)

    config = make_config(data, "t1n", tmp_path / "runs", **FAST_OPTIONS, epochs=3)
    with pytest.raises(ArtifactError) as caught:
        fit(config, on_epoch_end=rebuild)
    assert "replaced or changed while this run read it" in str(caught.value) and str(data) in str(caught.value)
    assert "damaged" not in str(caught.value)
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
    line = one_error_line(trainer_cli("fit", bad, "-m", "t1n", "--out", tmp_path, *FAST))
    assert str(bad) in line and ("split" in line or "share rows" in line)
    assert list(tmp_path.glob("t1n-*")) == []
    verified = builder_cli("verify", bad)
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
    line = one_error_line(trainer_cli("fit", bad, "-m", "t1n", "--out", tmp_path, *FAST, "--workers", workers))
    assert f"row {row} (case {case}) holds label 9" in line and "brats-build verify" in line


def test_attributes_out_of_bounds_and_missing_datasets(artifact: Path, tmp_path: Path) -> None:
    deep = tmp_path / "deep.h5"
    shutil.copy(artifact, deep)
    with h5py.File(deep, "r+") as f:
        f.attrs["axis_codes"] = "[" * 50_000 + "]" * 50_000
    line = one_error_line(trainer_cli("fit", deep, "-m", "t1n", "--out", tmp_path, *FAST))
    assert "attribute axis_codes" in line
    assert "axis_codes" in one_error_line(builder_cli("info", deep))
    verified = builder_cli("verify", deep)
    assert verified.exit_code == 1 and "Traceback" not in verified.output and "axis_codes" in verified.output
    headless = tmp_path / "no_case_id.h5"
    shutil.copy(artifact, headless)
    with h5py.File(headless, "r+") as f:
        del f["case_id"]
    assert "/case_id: missing" in one_error_line(trainer_cli("fit", headless, "-m", "t1n", "--out", tmp_path, *FAST))
    verified = builder_cli("verify", headless)
    assert verified.exit_code == 1 and "/case_id: missing" in verified.output


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
    line = one_error_line(trainer_cli("fit", bad, "-m", "t2f", "--out", tmp_path / "runs", *FAST))
    assert "/t2f" in line and ("link" in line or "virtual" in line or "external" in line)
    verified = builder_cli("verify", bad)
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
    assert words in one_error_line(trainer_cli("fit", bad, "-m", "t2w", "--out", tmp_path / "runs", *FAST))
    assert words in one_error_line(trainer_cli("evaluate", small_run, "--data", bad, "--other-data", "--device", "cpu"))
    assert words in one_error_line(builder_cli("info", bad))
    verified = builder_cli("verify", bad)
    assert verified.exit_code == 1 and words in verified.output and "Traceback" not in verified.output


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
    result = builder_cli("verify", damaged)
    assert result.exit_code == 1 and f"/t2f: row 5 (case {case}) unreadable" in result.output
    for name in ("case_id", "slice_index", "split/test"):
        bad = tmp_path / f"{name.replace('/', '_')}.h5"
        shutil.copy(artifact, bad)
        _flip_a_byte(bad, name)
        result = builder_cli("verify", bad)
        assert result.exit_code == 1 and f"/{name}: unreadable, damaged" in result.output, result.output


def test_gzip_files_read_with_plain_h5py_and_train_alike(cases_dir: Path, artifact: Path, tmp_path: Path) -> None:
    portable = tmp_path / "gzip.h5"
    result = builder_cli("build", cases_dir, portable, "--jobs", "1", "--compression", "gzip", "--val-fraction", "0.25",
                      "--test-fraction", "0.25")
    assert result.exit_code == 0, result.output
    read = "import h5py, sys; f = h5py.File(sys.argv[1]); print(int(f['t2f'][0].sum()))"  # no hdf5plugin
    plain = subprocess.run([sys.executable, "-c", read, str(portable)], capture_output=True, text=True)
    with h5py.File(artifact) as f:
        assert plain.returncode == 0 and int(plain.stdout) == int(f["t2f"][0].sum())
    blosc = subprocess.run([sys.executable, "-c", read, str(artifact)], capture_output=True, text=True)
    assert blosc.returncode != 0  # what the option is for: the default needs the plugin
    info = builder_cli("info", portable).output
    assert "gzip: built into HDF5" in info and "Blosc" not in info
    assert "32001: the Blosc plugin" in builder_cli("info", artifact).output
    from trainer.data.loading import RowReader, SliceDataset

    a, b = Artifact.open(portable), Artifact.open(artifact)
    rows = a.rows_of("train")
    first, second = SliceDataset(RowReader(a.path, ["t1n", "t2f"]), rows)[0], SliceDataset(RowReader(b.path, ["t1n", "t2f"]), rows)[0]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_info_and_verify_never_raise_whatever_the_file_holds(artifact: Path, tmp_path: Path) -> None:
    """An artifact zeroed after its first blocks (a copy cut short, a disk that lost blocks): whether the metadata
    is gone (all but the first 4 KiB zeroed: h5py raised RuntimeError; info says it is not readable, in one line) or
    only the rows (the last 90%; the metadata lies in the first block: info, which reads no row, still describes
    it), verify names the problems; neither shows a traceback."""
    data = artifact.read_bytes()
    for kept, said in ((4096, "not a readable brats2d artifact"), (len(data) // 10, None)):
        damaged = tmp_path / f"damaged-{kept}.h5"
        damaged.write_bytes(data[:kept] + bytes(len(data) - kept))
        info = builder_cli("info", damaged)
        assert "Traceback" not in info.output
        if said:
            assert info.exit_code == 1 and f"{damaged}: {said}" in one_error_line(info)
        else:
            assert info.exit_code == 0, info.output
        checked = builder_cli("verify", damaged)
        assert checked.exit_code == 1 and "Traceback" not in checked.output and str(damaged) in checked.output

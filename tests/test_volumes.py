"""Whole volumes: reorientation, brain-only passes, clean-up, `evaluate --volumes` and its bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import Result

from trainer.config import FitConfig
from trainer.inference.slices import network_probabilities
from trainer.scoring.cleanup import CleanUp, clean_up
from trainer.training.model import load_model
from trainer.training.plots import radiological

from conftest import trainer_cli, writable_copy

CASE = "BraTS-GLI-00003-000"


def _reoriented_copy(case_dir: Path, out: Path, ornt: list[list[int]]) -> Path:
    """The case with its voxel axes permuted or flipped, and the affine changed to match (same anatomy)."""
    target = out / case_dir.name
    target.mkdir(parents=True)
    for path in case_dir.iterdir():
        nib.save(nib.load(path).as_reoriented(np.array(ornt)), target / path.name)
    return target


def _predict(run: Path, case: Path, out: Path, *extra: str) -> Result:
    return trainer_cli("predict", run, case, "--out", out, "--device", "cpu", *extra)


@pytest.mark.parametrize("ornt", [[[0, -1], [1, 1], [2, 1]], [[1, 1], [0, 1], [2, -1]]], ids=["flipped", "permuted"])
def test_another_orientation_gives_the_same_mask_in_its_own_space(small_run: Path, small_cases: Path, tmp_path: Path,
                                                                  ornt: list[list[int]]) -> None:
    moved = _reoriented_copy(small_cases / CASE, tmp_path / "in", ornt)
    assert nib.aff2axcodes(nib.load(next(moved.glob("*t1n*"))).affine) != ("L", "P", "S")
    assert _predict(small_run, small_cases / CASE, tmp_path / "a", "--no-clean-up").exit_code == 0
    result = _predict(small_run, moved, tmp_path / "b", "--no-clean-up")
    assert result.exit_code == 0, result.output
    original = nib.load(tmp_path / "a" / f"{CASE}.nii.gz")
    written = nib.load(tmp_path / "b" / f"{CASE}.nii.gz")
    source = nib.load(moved / f"{CASE}-t2f.nii.gz")
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    expected = np.asanyarray(original.dataobj)
    assert len(np.unique(expected)) > 1  # a mask with structure, or the comparison would prove nothing
    back = np.asanyarray(nib.as_closest_canonical(written).dataobj)
    np.testing.assert_array_equal(back, np.asanyarray(nib.as_closest_canonical(original).dataobj))
    rows = [list(csv.DictReader(open(tmp_path / d / "predict_scores.csv")))[0] for d in ("a", "b")]
    assert rows[0]["dice_WT"] == rows[1]["dice_WT"] and rows[0]["lesion_dice_ET"] == rows[1]["lesion_dice_ET"]


def test_slices_without_brain_skip_the_network(small_run: Path) -> None:
    model, saved = load_model(small_run / "best.pt")
    config = FitConfig.from_dict({**saved, "device": "cpu"})
    images = np.zeros((4, 64, 64, 10), dtype=np.int16)
    images[:, 10:50, 12:40, [2, 3, 7]] = 500
    images[1, 20:30, 20:30, 8] = 300  # one modality alone makes a brain slice
    result = network_probabilities(model, config, images, torch.device("cpu"), batch_size=2, progress=False)
    assert result.brain_slices == 4
    assert np.all(result.probabilities[0][..., [0, 1, 4, 5, 6, 9]] == 1)
    assert result.probabilities.shape == (4, 64, 64, 10) and result.slices_per_second > 0


def test_clean_up_by_hand() -> None:
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[2:12, 2:12, 2:12] = 2  # 1000 voxels of oedema
    labels[4:8, 4:8, 4:8] = 3  # 64 voxels of enhancing tumour inside
    labels[20:22, 20:22, 20:22] = 1  # 8 voxels far away
    labels[15:20, 25:29, 15:25] = 2  # 200 voxels far away
    assert np.array_equal(clean_up(labels, CleanUp()), labels)
    small_gone = clean_up(labels, CleanUp.uniform((50, 50, 50)))
    assert small_gone[20:22, 20:22, 20:22].sum() == 0 and (small_gone == 2).sum() == 1000 - 64 + 200
    share = clean_up(labels, CleanUp.uniform(min_share=0.25))  # 200 < 0.25 * 1000
    assert (share > 0).sum() == 1000
    no_et = clean_up(labels, CleanUp(min_et_voxels=100))
    assert (no_et == 3).sum() == 0 and (no_et == 1).sum() == 64 + 8
    speck = labels.copy()
    speck[10, 10, 10] = 3  # a lone enhancing voxel inside the oedema: a stray core component, not a lesion
    cleaned = clean_up(speck, CleanUp.uniform((10, 10, 10)))
    assert cleaned[10, 10, 10] == 2 and (cleaned == 3).sum() == 64  # back to oedema: still whole tumour


def test_radiological_view_from_axis_codes() -> None:
    stored = np.arange(6).reshape(2, 3)  # axis 0: 2 voxels, axis 1: 3 voxels
    # axial slices: anterior up, the patient's right on the viewer's left; each letter names where an index grows
    assert radiological(stored, ("L", "P"))[1] == ("A", "P", "R", "L")
    np.testing.assert_array_equal(radiological(stored, ("L", "P"))[0], stored.T)  # BraTS: transpose only
    np.testing.assert_array_equal(radiological(stored, ("R", "A"))[0], stored.T[::-1, ::-1])
    np.testing.assert_array_equal(radiological(stored, ("P", "L"))[0], stored)
    np.testing.assert_array_equal(radiological(stored, ("A", "R"))[0], stored[::-1, ::-1])
    # coronal (BraTS: L, S) and sagittal (P, S) slices: superior up; sagittal shows anterior on the left
    coronal, edges = radiological(stored, ("L", "S"))
    np.testing.assert_array_equal(coronal, stored.T[::-1])
    assert edges == ("S", "I", "R", "L")
    sagittal, edges = radiological(stored, ("P", "S"))
    np.testing.assert_array_equal(sagittal, stored.T[::-1])
    assert edges == ("S", "I", "A", "P")


def test_evaluate_volumes_scores_each_case_as_predict_does(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    run = writable_copy(small_run, tmp_path)
    result = trainer_cli("evaluate", run, "--volumes", small_cases, "--device", "cpu", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "lesion-wise Dice WT" in result.output and "the first 2 of 3 cases" in result.output
    rows = list(csv.DictReader(open(run / "test_volumes.csv")))
    report = json.loads((run / "test_volumes.json").read_text())
    assert report["cases_scored"] == 2 and report["cases_in_split"] == 3 and "lesion-wise" in report["definition"]
    for key in ("lesion_dice_WT", "lesion_hd95_ET", "dice_TC", "hd95_WT", "sensitivity_ET", "specificity_WT"):
        summary = report["metrics"][key]
        assert summary["ci_low"] is None and "fewer than 5 patients" in summary["interval"]  # two patients
        assert summary["mean"] == pytest.approx(np.mean([float(r[key]) for r in rows]))
    first = rows[0]["case_id"]
    assert _predict(small_run, small_cases / first, tmp_path / "masks").exit_code == 0
    (predicted,) = list(csv.DictReader(open(tmp_path / "masks" / "predict_scores.csv")))
    for key in ("dice_WT", "lesion_dice_TC", "hd95_ET", "lesion_fp_WT"):
        assert float(predicted[key]) == pytest.approx(float(rows[0][key]))


def test_bad_volumes_are_listed_and_the_rest_scored(small_run: Path, small_cases: Path, small_artifact: Path,
                                                    tmp_path: Path) -> None:
    from trainer.data.artifact import Artifact

    train = Artifact.open(small_artifact).cases_of("train")
    folder = tmp_path / "volumes"
    for case in train[:5]:
        shutil.copytree(small_cases / case, folder / case)
    (folder / train[1] / f"{train[1]}-t1c.nii.gz").unlink()  # a missing modality
    odd = folder / train[2] / f"{train[2]}-t2w.nii.gz"  # a volume of another shape
    image = nib.load(odd)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, :20], image.affine, image.header), odd)
    spaced = folder / train[3]  # another voxel size
    for path in spaced.iterdir():
        image = nib.load(path)
        image.header.set_zooms((1.0, 1.0, 2.0))
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header), path)
    run = writable_copy(small_run, tmp_path)
    result = trainer_cli("evaluate", run, "--split", "train", "--volumes", folder, "--device", "cpu", "--no-clean-up")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(train[1] in line and "missing" in line and "t1c" in line for line in lines)
    assert any(train[2] in line and "shape" in line for line in lines)
    assert any(train[3] in line and "voxel size" in line for line in lines)
    assert any(train[5] in line and "not found" in line for line in lines)
    rows = list(csv.DictReader(open(run / "train_volumes.csv")))
    assert sorted(r["case_id"] for r in rows) == sorted([train[0], train[4]])
    report = json.loads((run / "train_volumes.json").read_text())
    assert len(report["skipped"]) == len(train) - 2
    assert not list(small_run.glob(".*partial*"))

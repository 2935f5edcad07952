"""Late fusion by hand, the comparison table end to end, and predictions written as BraTS NIfTI."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.inference.fusion import mean_probabilities, vote
from trainer.scoring.statistics import bootstrap_interval

from conftest import FAST, ReportPage, read_volume


def test_vote_by_hand_with_double_vote_and_tie() -> None:
    # Four 3x3 label maps; model 1 (t1c) is the best single model and counts twice.
    t1n = torch.tensor([[0, 2, 2], [1, 1, 0], [3, 0, 2]])
    t1c = torch.tensor([[0, 3, 1], [1, 2, 0], [3, 3, 1]])
    t2w = torch.tensor([[0, 2, 2], [2, 2, 0], [1, 0, 3]])
    t2f = torch.tensor([[1, 2, 3], [2, 0, 0], [2, 0, 2]])
    fused = vote([m[None] for m in (t1n, t1c, t2w, t2f)], best=1, classes=4)[0]
    # votes per pixel (t1n, t1c x2, t2w, t2f):
    # (0,1) 2,3,2,2: label 2 has 3 votes against 3's 2 -> 2, the best model outvoted
    # (0,2) 2,1,2,3: 2 and 1 both have 2 votes -> tie -> the best model's 1
    # (1,1) 1,2,2,0: 2 has 3 -> 2;  (2,1) 0,3,0,0: 0 has 3, the double vote for 3 loses -> 0
    # (2,2) 2,1,3,2: 2 and 1 tie at 2 -> 1
    expected = torch.tensor([[0, 2, 1], [1, 2, 0], [3, 0, 1]])
    assert torch.equal(fused, expected)


def test_mean_of_probabilities() -> None:
    a = torch.tensor([[[[0.9]], [[0.1]]]])
    b = torch.tensor([[[[0.3]], [[0.7]]]])
    assert torch.allclose(mean_probabilities([a, b]), torch.tensor([[[[0.6]], [[0.4]]]]))


def test_bootstrap_interval_brackets_the_mean() -> None:
    from scipy import stats

    values = np.random.default_rng(0).uniform(0.5, 0.9, 40)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 0.2
    expected = stats.bootstrap((values,), np.mean, n_resamples=2000, method="BCa",
                               random_state=np.random.default_rng(0)).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high))  # scipy's BCa, not a hand-written one
    assert bootstrap_interval(np.full(10, 0.7)) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval(values[:4]) == (None, None)  # four patients: no interval


COMPARE_ARGS = [*FAST, "--epochs", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def compared(small_artifact: Path, small_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny compare (five 2-step runs) scored per slice and on one whole volume, with its report; tests read it,
    never change it."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = CliRunner().invoke(main, ["compare", str(small_artifact), "--out", str(out), *COMPARE_ARGS, "--volumes",
                                       str(small_cases), "--volume-cases", "1", "--no-clean-up", "--report"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_compare_writes_the_table_and_pictures(compared: Path) -> None:
    out = compared
    for name in ("comparison.csv", "comparison.md", "comparison.png", "comparison.gif", "comparison_cases.csv"):
        assert (out / name).is_file(), name
    with open(out / "comparison.csv") as handle:
        rows = {r["approach"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["t1n", "t1c", "t2w", "t2f", "all", "vote", "mean"]
    for name, row in rows.items():
        regions = [float(row[f"dice_{r}"]) for r in ("WT", "TC", "ET")]
        assert float(row["dice_mean"]) == pytest.approx(np.mean(regions), abs=1e-6)  # the mean the table names
        assert row["dice_mean_ci_low"] == "" and "fewer than 5" in row["dice_mean_interval"]  # 3 test cases: none
        assert (row["loss"] == "") == (name in ("vote", "mean"))
    strict = json.loads((out / "comparison.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
    assert strict[-1]["loss"] is None and "no loss" in strict[-1]["loss_note"]
    # each single model's row is exactly what evaluating its run on the test split gives
    run = shutil.copytree(out / "t1c", compared.parent / "t1c-evaluated")
    assert CliRunner().invoke(main, ["evaluate", str(run), "--device", "cpu"]).exit_code == 0
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert float(rows["t1c"]["dice_mean"]) == pytest.approx(metrics["dice_mean"], abs=1e-6)
    assert int(rows["all"]["parameters"]) > int(rows["t1n"]["parameters"])  # 4 input channels
    table = (out / "comparison.md").read_text()
    assert "late fusion, vote" in table and "not comparable" in table and "Whole volumes" in table
    with open(out / "comparison_cases.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 7 * 3  # seven approaches x three test cases


def test_compare_volumes_score_as_evaluate_does(compared: Path, small_cases: Path, tmp_path: Path) -> None:
    volumes = list(csv.DictReader(open(compared / "comparison_volumes.csv")))
    assert [r["approach"] for r in volumes] == ["t1n", "t1c", "t2w", "t2f", "all", "vote", "mean"]
    summary = json.loads((compared / "comparison_volumes.json").read_text())
    best = summary["best"]
    assert summary["approaches"][best][f"lesion_dice_mean_minus_{best}"]["mean"] == 0
    assert "the first 1 of 3 test cases" in summary["cases"]
    # the early-fusion row is what `evaluate --volumes` gives for that run on the same case
    run = shutil.copytree(compared / "all", tmp_path / "all")
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), "--volumes", str(small_cases), "--limit", "1",
                                          "--no-clean-up", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    (alone,) = list(csv.DictReader(open(run / "test_volumes.csv")))
    (fused,) = [r for r in volumes if r["approach"] == "all"]
    assert alone["case_id"] == fused["case_id"] and alone["lesion_dice_WT"] == fused["lesion_dice_WT"]


def test_the_compare_report_shows_every_approach_of_every_patient(compared: Path, small_artifact: Path) -> None:
    """comparison_volumes.html: a row per approach and patient with the CSV's numbers, the approaches' table in the
    JSON's order with its means, one picture per patient (truth and the seven masks), nothing from outside."""
    from PIL import Image

    page = ReportPage()
    page.feed((compared / "comparison_volumes.html").read_text())
    volumes = list(csv.DictReader(open(compared / "comparison_volumes.csv")))
    assert sorted((r[0], r[1]) for r in page.rows) == sorted((r["case_id"], r["approach"]) for r in volumes)
    by_key = {(r["case_id"], r["approach"]): r for r in volumes}
    for row in page.rows:  # patient, approach, lesion-wise Dice WT...
        assert row[2] == f"{float(by_key[row[0], row[1]]['lesion_dice_WT']):.3f}"
    summary = json.loads((compared / "comparison_volumes.json").read_text())
    approaches = page.tables["approaches"]
    assert len(approaches) == len(summary["approaches"]) == 7
    means = [f"{s['metrics']['lesion_dice_WT']['mean']:.3f}" for s in summary["approaches"].values()]
    assert [row[1] for row in approaches] == means
    assert [row[-1] == "best" for row in approaches].count(True) == 1
    assert len(page.images) == summary["cases_scored"] == 1
    picture = Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1])))
    assert picture.format == "PNG" and picture.width > 2.5 * picture.height  # eight panels a row (truth, 7 masks), 3 rows
    assert all(a.startswith("data:") for a in page.addresses)
    assert summary["report_seconds"] > 0 and all(float(r["volume_ml_WT"]) > 0 for r in volumes)
    refused = CliRunner().invoke(main, ["compare", str(small_artifact), "--out", str(compared.parent / "none"),
                                        "--report"])
    assert refused.exit_code == 1 and "give --volumes" in refused.output and not (compared.parent / "none").exists()


def test_compare_reuses_only_runs_of_the_same_file(compared: Path, small_artifact: Path, tmp_path: Path) -> None:
    out = shutil.copytree(compared, tmp_path / "cmp")
    args = ["compare", str(small_artifact), "--out", str(out), *COMPARE_ARGS]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--reuse" in again.output
    reused = CliRunner().invoke(main, [*args, "--reuse"])
    assert reused.exit_code == 0 and reused.output.count("reusing") == 5
    rebuilt = tmp_path / "rebuilt.h5"  # another build (its own id) of the same cases: the runs do not belong to it
    shutil.copy(small_artifact, rebuilt)
    with h5py.File(rebuilt, "r+") as f:
        f.attrs["data_id"] = "0" * 32
    refused = CliRunner().invoke(main, ["compare", str(rebuilt), *args[2:], "--reuse"])
    assert refused.exit_code == 1 and "not the file this run trained on" in refused.output
    assert "reusing" not in refused.output and "Traceback" not in refused.output


def test_predict_writes_a_seg_nifti_matching_the_source(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    case = small_cases / "BraTS-GLI-00003-000"
    result = CliRunner().invoke(main, ["predict", str(small_run), str(case), "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = nib.load(tmp_path / "BraTS-GLI-00003-000.nii.gz")
    source = nib.load(case / "BraTS-GLI-00003-000-t2f.nii.gz")
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)
    assert written.header.get_data_dtype() == np.uint8
    assert np.allclose(written.header.get_zooms(), source.header.get_zooms())
    assert written.header["qform_code"] == source.header["qform_code"]
    labels = np.asanyarray(written.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert "lesion-wise Dice WT" in result.output and "slices/s" in result.output
    with open(tmp_path / "predict_scores.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    truth = read_volume(case / "BraTS-GLI-00003-000-seg.nii.gz")
    for region, values in (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))):
        p, t = np.isin(labels, values), np.isin(truth, values)
        expected = 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())
        assert float(row[f"dice_{region}"]) == pytest.approx(expected)  # the scores are of the mask written


def test_predict_errors_leave_no_partial_output(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "in" / "BraTS-GLI-00004-000"
    shutil.copytree(small_cases / "BraTS-GLI-00004-000", broken)
    (broken / "BraTS-GLI-00004-000-t1c.nii.gz").unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(small_run), str(broken), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and "missing BraTS-GLI-00004-000-t1c.nii.gz" in result.output
    assert "skipped BraTS-GLI-00004-000" in result.output
    assert not out.exists() or list(out.iterdir()) == []  # no seg, and no partial file
    empty = tmp_path / "norun"
    empty.mkdir()
    result = CliRunner().invoke(main, ["predict", str(empty), str(broken), "--out", str(out)])
    assert result.exit_code == 1 and "no checkpoint" in result.output

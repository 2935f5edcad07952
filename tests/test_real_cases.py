"""End to end on real BraTS 2018 patients (../shared/real-brats18, beside the repository; skipped elsewhere)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from builder.build import BuildOptions, build
from builder.extract import SliceRule
from builder.format import MODALITIES
from builder.inspect import verify
from builder.layout import find_cases
from trainer.cli import main

from conftest import FAST

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"the real BraTS 2018 cases are not at {REAL}")


@pytest.fixture(scope="module")
def real_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "real.h5"
    rule = SliceRule(per_case=None, background=4)
    build(REAL, out, BuildOptions(jobs=2, progress=False, val_fraction=0.2, test_fraction=0.2, rule=rule))
    return out


def test_real_cases_build_exactly_what_nibabel_reads(real_artifact: Path) -> None:
    cases = {case.case_id: case for case in find_cases(REAL)}
    assert verify(real_artifact) == []
    with h5py.File(real_artifact) as f:
        ids, zs, marked = f["case_id"].asstr()[()], f["slice_index"][()], f["background"][()].astype(bool)
        assert sorted(set(ids)) == sorted(cases) and json.loads(f.attrs["axis_codes"]) == ["L", "P", "S"]
        for case_id, case in cases.items():
            rows = np.flatnonzero(ids == case_id)
            seg = np.asanyarray(nib.load(case.files["seg"]).dataobj)
            tumour = np.flatnonzero(np.count_nonzero(seg, axis=(0, 1)))
            np.testing.assert_array_equal(np.sort(zs[rows[~marked[rows]]]), tumour)  # every tumour slice
            assert marked[rows].sum() == 4 and not np.isin(zs[rows[marked[rows]]], tumour).any()
            np.testing.assert_array_equal(f["seg"][rows[0]], np.where(seg[..., zs[rows[0]]] == 4, 3, seg[..., zs[rows[0]]]))
            for modality in MODALITIES:
                volume = np.asanyarray(nib.load(case.files[modality]).dataobj)
                for row in rows[:: max(1, len(rows) // 5)]:
                    np.testing.assert_array_equal(f[modality][row], volume[:, :, zs[row]])


def test_real_cases_fit_predict_and_score(real_artifact: Path, tmp_path: Path) -> None:
    fitted = CliRunner().invoke(main, ["fit", str(real_artifact), "-m", "all", "--out", str(tmp_path / "runs"), *FAST,
                                       "--epochs", "1", "--max-steps", "2"], catch_exceptions=False)
    assert fitted.exit_code == 0, fitted.output
    (run,) = list((tmp_path / "runs").iterdir())
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), "--volumes", str(REAL), "--split", "val",
                                          "--device", "cpu", "--limit", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    (row,) = list(csv.DictReader(open(run / "val_volumes.csv")))
    case_dir = REAL / row["case_id"]
    predicted = CliRunner().invoke(main, ["predict", str(run), str(case_dir), "--out", str(tmp_path / "out"),
                                          "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    written = nib.load(tmp_path / "out" / f"{row['case_id']}-seg.nii.gz")
    source = nib.load(next(case_dir.glob("*_flair.nii.gz")))
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    (scored,) = list(csv.DictReader(open(tmp_path / "out" / "predict_scores.csv")))
    assert scored["lesion_dice_WT"] == row["lesion_dice_WT"] and 0 <= float(row["dice_WT"]) <= 1
    assert int(row["brain_slices"]) < 155  # real volumes have slices without brain: no network pass there

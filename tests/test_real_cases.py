"""End to end on a fixed few real BraTS 2018 patients (../shared/real-brats18, beside the repository; skipped
elsewhere): the build against nibabel (neighbouring slices included), and fit, evaluate and predict on real headers
(the whole-volume part on the volumes cut down around the tumour, as the synthetic tests do)."""

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

from conftest import FAST, cut_down, read_volume

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"
#: Two sites, an int16 and a uint8 seg: enough to see real headers and labels, quick to build.
PATIENTS = ("Brats18_2013_11_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA01_201_1", "Brats18_TCIA10_639_1")
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"the real BraTS 2018 cases are not at {REAL}")


@pytest.fixture(scope="module")
def real_few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Links to the PATIENTS (the shared folder is read-only: nothing is written there)."""
    folder = tmp_path_factory.mktemp("real") / "patients"
    folder.mkdir()
    for patient in PATIENTS:
        (folder / patient).symlink_to(REAL / patient, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def real_artifact(real_few: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "real.h5"
    rule = SliceRule(per_case=None, background=4, context=1)
    build(real_few, out, BuildOptions(jobs=2, progress=False, val_fraction=0.25, test_fraction=0.25, rule=rule))
    return out


def test_real_cases_build_exactly_what_nibabel_reads(real_few: Path, real_artifact: Path) -> None:
    cases = {case.case_id: case for case in find_cases(real_few)}
    assert verify(real_artifact) == []
    with h5py.File(real_artifact) as f:
        ids, zs, marked = f["case_id"].asstr()[()], f["slice_index"][()], f["background"][()].astype(bool)
        assert sorted(set(ids)) == sorted(PATIENTS) and json.loads(f.attrs["axis_codes"]) == ["L", "P", "S"]
        for case_id, case in cases.items():
            rows = np.flatnonzero(ids == case_id)
            seg = read_volume(case.files["seg"])
            tumour = np.flatnonzero(np.count_nonzero(seg, axis=(0, 1)))
            np.testing.assert_array_equal(np.sort(zs[rows[~marked[rows]]]), tumour)  # every tumour slice
            assert marked[rows].sum() == 4 and not np.isin(zs[rows[marked[rows]]], tumour).any()
            np.testing.assert_array_equal(f["seg"][rows[0]], np.where(seg[..., zs[rows[0]]] == 4, 3, seg[..., zs[rows[0]]]))
            for modality in MODALITIES:
                volume = read_volume(case.files[modality])
                for row in rows[:: max(1, len(rows) // 4)]:
                    z = zs[row]
                    np.testing.assert_array_equal(f[modality][row], volume[:, :, z])
                    np.testing.assert_array_equal(f[f"context/{modality}"][row],
                                                  np.stack([volume[:, :, z - 1], volume[:, :, z + 1]]))


def test_real_cases_fit_predict_and_score(real_few: Path, tmp_path: Path) -> None:
    volumes = tmp_path / "volumes"  # the real volumes cut down around each tumour: real headers, quick to segment
    for patient in PATIENTS:
        cut_down(real_few / patient, volumes)
    data = tmp_path / "real_small.h5"
    build(volumes, data, BuildOptions(jobs=2, progress=False, val_fraction=0.25, test_fraction=0.25,
                                      rule=SliceRule(per_case=None, context=1)))
    fitted = CliRunner().invoke(main, ["fit", str(data), "-m", "all", "--out", str(tmp_path / "runs"), *FAST,
                                       "--context", "1", "--task", "regions", "--epochs", "1", "--max-steps", "2"],
                                catch_exceptions=False)
    assert fitted.exit_code == 0, fitted.output
    (run,) = list((tmp_path / "runs").iterdir())
    with h5py.File(data) as f:
        val_case = str(f["case_id"].asstr()[int(f["split/val"][0])])
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), "--volumes", str(volumes), "--split", "val",
                                          "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    (row,) = list(csv.DictReader(open(run / "val_volumes.csv")))
    predicted = CliRunner().invoke(main, ["predict", str(run), str(volumes / val_case), "--out", str(tmp_path / "out"),
                                          "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    written = nib.load(tmp_path / "out" / f"{val_case}.nii.gz")
    source = nib.load(next((volumes / val_case).glob("*_flair.nii.gz")))
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2, 4}  # a 2018 name: ET written as 4
    (scored,) = list(csv.DictReader(open(tmp_path / "out" / "predict_scores.csv")))
    assert scored["lesion_dice_WT"] == row["lesion_dice_WT"] and scored["dice_WT"] == row["dice_WT"]

"""Every BraTS naming is found, label 4 and orientation are never guessed, and splits are by patient and stable."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from builder.build import BuildOptions, build
from builder.extract import SliceRule
from builder.layout import find_cases, patient_of
from builder.split import split_cases
from builder.synth import write_case

from conftest import read_volume

QUIET = BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0)


@pytest.mark.parametrize(
    ("name", "layout", "compressed", "flair"),
    [
        ("Brats18_2013_11_1", "brats2021", True, "Brats18_2013_11_1_flair.nii.gz"),
        ("Brats19_CBICA_AAB_1", "brats2021", True, "Brats19_CBICA_AAB_1_flair.nii.gz"),
        ("BraTS20_Training_001", "brats2021", False, "BraTS20_Training_001_flair.nii"),
        ("BraTS2021_00000", "brats2021", True, "BraTS2021_00000_flair.nii.gz"),
        ("BraTS-GLI-00000-000", "brats2023", True, "BraTS-GLI-00000-000-t2f.nii.gz"),
        ("BraTS-MEN-00004-000", "brats2023", True, "BraTS-MEN-00004-000-t2f.nii.gz"),
        ("BraTS-MET-00001-000", "brats2023", True, "BraTS-MET-00001-000-t2f.nii.gz"),
        ("BraTS-PED-00012-000", "brats2023", True, "BraTS-PED-00012-000-t2f.nii.gz"),
        ("BraTS-SSA-00002-000", "brats2023", True, "BraTS-SSA-00002-000-t2f.nii.gz"),
    ],
)
def test_every_release_naming_is_found_and_built(tmp_path: Path, name: str, layout: str, compressed: bool,
                                                 flair: str) -> None:
    source = tmp_path / "release"
    write_case(source, 3, seed=0, layout=layout, compressed=compressed, name=name)
    (case,) = find_cases(source)
    assert case.case_id == name and case.files["t2f"] == source / name / flair and not case.missing()
    out = tmp_path / "out.h5"
    summary = build(source, out, QUIET)
    assert summary.cases_written == 1 and summary.skipped == []
    with h5py.File(out) as f:
        z = int(f["slice_index"][0])
        np.testing.assert_array_equal(f["t2f"][0], read_volume(source / name / flair)[:, :, z])
        assert set(np.unique(f["seg"][0])) <= {0, 1, 2, 3}


def _relabel_et_as_4(case_dir: Path) -> None:
    path = next(case_dir.glob("*-seg.nii.gz"))
    image = nib.load(path)
    seg = np.asanyarray(image.dataobj).copy()
    seg[seg == 3] = 4
    nib.save(nib.Nifti1Image(seg, image.affine, image.header), path)


def test_label_4_in_a_2023_name_is_not_silently_enhancing_tumour(tmp_path: Path) -> None:
    source = tmp_path / "post"
    keep = write_case(source, 1, seed=0)
    _relabel_et_as_4(write_case(source, 2, seed=0))
    summary = build(source, tmp_path / "auto.h5", QUIET)
    assert summary.cases_written == 1
    (skipped,) = summary.skipped
    assert "label 4" in skipped.reason and "--label4" in skipped.reason and "resection cavity" in skipped.reason
    as_et = BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0, rule=SliceRule(label4="et"))
    assert build(source, tmp_path / "et.h5", as_et).cases_written == 2
    with h5py.File(tmp_path / "et.h5") as f:
        assert 3 in f["seg"][1] and 4 not in f["seg"][()]
    assert keep.name in h5py.File(tmp_path / "auto.h5")["case_id"].asstr()[()]


def test_another_orientation_or_voxel_size_is_skipped_with_its_reason(tmp_path: Path) -> None:
    source = tmp_path / "mixed"
    for index in range(3):
        write_case(source, index, seed=0)
    for suffix, affine in (("-000", np.diag([1.0, 1.0, 1.0, 1.0])), ("-001", np.diag([-1.0, -1.0, 2.0, 1.0]))):
        case = source / f"BraTS-GLI-0000{'12'[suffix == '-001']}-000"
        for path in case.glob("*.nii.gz"):
            image = nib.load(path)
            nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
    summary = build(source, tmp_path / "out.h5", QUIET)
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert summary.cases_written == 1
    assert "orientation RAS" in reasons["BraTS-GLI-00001-000"] and "LPS" in reasons["BraTS-GLI-00001-000"]
    assert "voxel size (1.0, 1.0, 2.0)" in reasons["BraTS-GLI-00002-000"]


def test_background_slices_are_tumour_free_brain_rows_marked_apart(tmp_path: Path, cases_dir: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(cases_dir / "BraTS-GLI-00000-000", source / "BraTS-GLI-00000-000")
    options = BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0, rule=SliceRule(per_case=2, background=4))
    build(source, tmp_path / "bg.h5", options)
    seg = read_volume(next(source.rglob("*-seg.nii.gz")))
    t1n = read_volume(next(source.rglob("*-t1n.nii.gz")))
    tumour, brain = np.count_nonzero(seg, axis=(0, 1)), np.count_nonzero(t1n, axis=(0, 1))
    with h5py.File(tmp_path / "bg.h5") as f:
        marked, zs = f["background"][()].astype(bool), f["slice_index"][()]
        assert marked.sum() == 4 and (~marked).sum() == 2
        assert np.all(np.diff(zs) > 0)
        for row, z in enumerate(zs):
            np.testing.assert_array_equal(f["t2w"][row], read_volume(next(source.rglob("*-t2w.nii.gz")))[:, :, z])
            if marked[row]:
                assert tumour[z] == 0 and brain[z] >= 0.05 * 240 * 240 and not f["seg"][row].any()
    candidates = np.flatnonzero((tumour == 0) & (brain >= 0.05 * 240 * 240))
    below, above = candidates[candidates < zs[~marked].min()], candidates[candidates > zs[~marked].max()]
    assert zs[marked].min() == candidates.min() and zs[marked].max() == candidates.max()  # spread to both ends
    assert below.size and above.size


def test_scans_of_one_patient_share_a_split() -> None:
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(60) for t in range(1 + p % 3)]
    assert patient_of("BraTS-GLI-00007-002") == "BraTS-GLI-00007" and patient_of("Brats18_2013_11_1") == "Brats18_2013_11_1"
    splits = split_cases(ids, seed=0, val_fraction=0.1, test_fraction=0.1)
    owner = {patient_of(case): name for name, cases in splits.items() for case in cases}
    for name, cases in splits.items():
        assert all(owner[patient_of(case)] == name for case in cases)
    assert sorted(sum(splits.values(), [])) == sorted(ids)


def test_golden_split_of_a_fixed_list() -> None:
    ids = [f"BraTS-GLI-{p:05d}-000" for p in range(20)] + ["BraTS-GLI-00003-001"]
    splits = split_cases(ids, seed=0, val_fraction=0.1, test_fraction=0.1)
    assert splits["val"] == ["BraTS-GLI-00012-000", "BraTS-GLI-00018-000"]
    assert splits["test"] == ["BraTS-GLI-00002-000", "BraTS-GLI-00011-000"]
    assert {"BraTS-GLI-00003-000", "BraTS-GLI-00003-001"} <= set(splits["train"])


def _moves(before: dict[str, list[str]], after: dict[str, list[str]], common: set[str]) -> dict[tuple[str, str], int]:
    old = {c: s for s, cases in before.items() for c in cases}
    new = {c: s for s, cases in after.items() for c in cases}
    moved: dict[tuple[str, str], int] = {}
    for case in common:
        if old[case] != new[case]:
            key = tuple(sorted((old[case], new[case])))
            moved[key] = moved.get(key, 0) + 1
    return moved


def test_one_change_moves_at_most_one_patient_per_boundary_and_counts_follow_fractions() -> None:
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(20, 400)
        ids = [f"BraTS-GLI-{p:05d}-000" for p in rng.sample(range(5000), n)]
        if trial % 2:
            changed, common = ids + [f"BraTS-GLI-{5000 + trial:05d}-000"], set(ids)
        else:
            removed = rng.choice(ids)
            changed = [c for c in ids if c != removed]
            common = set(changed)
        before, after = split_cases(ids, 0, 0.05, 0.05), split_cases(changed, 0, 0.05, 0.05)
        moved = _moves(before, after, common)
        assert ("test", "val") not in moved and all(count <= 1 for count in moved.values()), (trial, moved)
        for splits, total in ((before, len(ids)), (after, len(changed))):
            for name in ("val", "test"):
                assert abs(len(splits[name]) - 0.05 * total) <= 1 or len(splits[name]) == 1

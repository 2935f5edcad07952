"""The artifact holds, for each case, the densest slice read straight from the NIfTI files, and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import hdf5plugin
import nibabel as nib
import numpy as np
import pytest

from builder import writer as writer_module
from builder.build import BuildError, BuildOptions, build
from builder.checks import ATTRIBUTES
from builder.extract import SliceRule
from builder.format import FORMAT_VERSION, MODALITIES, ROOT_ATTRIBUTES, SPLITS
from builder.synth import write_case

from conftest import builder_cli, case_volume, one_error_line, read_volume

QUIET = BuildOptions(jobs=1, progress=False)


def test_rows_equal_densest_slice_read_with_nibabel(artifact: Path, cases_dir: Path) -> None:
    with h5py.File(artifact) as f:
        case_ids = f["case_id"].asstr()[()]
        assert list(case_ids) == sorted(p.name for p in cases_dir.iterdir())
        for row, case in enumerate(case_ids):
            seg = case_volume(cases_dir / case, "seg")
            z = int(np.argmax(np.count_nonzero(seg, axis=(0, 1))))  # argmax: ties go to the lowest z
            assert f["slice_index"][row] == z
            np.testing.assert_array_equal(f["seg"][row], seg[:, :, z])
            for modality in MODALITIES:
                expected = case_volume(cases_dir / case, modality)[:, :, z]
                assert f[modality].dtype == expected.dtype
                np.testing.assert_array_equal(f[modality][row], expected)


def test_layout_of_the_file(artifact: Path) -> None:
    with h5py.File(artifact) as f:
        for name in (*MODALITIES, "seg"):
            assert f[name].chunks == (1, 240, 240)
            plist = f[name].id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            assert {hdf5plugin.BLOSC_ID, h5py.h5z.FILTER_FLETCHER32} <= filters
        assert f["seg"].dtype == np.uint8
        assert f.attrs["format_version"] == FORMAT_VERSION and len(f.attrs["data_id"]) == 32
        assert json.loads(f.attrs["axis_codes"]) == ["L", "P", "S"] and json.loads(f.attrs["voxel_size"]) == [1, 1, 1]
        assert f["background"].shape == f["seg"].shape[:1] and not f["background"][()].any()
        assert json.loads(f.attrs["modalities"]) == list(MODALITIES)
        assert json.loads(f.attrs["skipped"]) == []
        assert f.attrs["cases_scanned"] == f.attrs["cases_written"] == f["seg"].shape[0]
        assert sorted(f.attrs) == sorted(ROOT_ATTRIBUTES)  # every attribute written is in the one table, and back
        assert all(isinstance(v, (bytes, np.integer)) for v in f.attrs.values())  # JSON and text, never pickles
        assert f.id.get_create_plist().get_version()[0] == 3  # superblock v3: HDF5's 1.10 format, checksummed
    spec = (Path(__file__).parents[1] / "datasets" / "FORMAT.md").read_text()
    assert [key for key in ROOT_ATTRIBUTES if f"`{key}`" not in spec] == []  # the contract names each of them
    assert set(ATTRIBUTES) <= set(ROOT_ATTRIBUTES)  # and the checks check only attributes of the table


def test_splits_disjoint_by_case_and_covering(artifact: Path) -> None:
    with h5py.File(artifact) as f:
        splits = {s: f["split"][s][()] for s in SPLITS}
        cases = f["case_id"].asstr()[()]
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(cases)))
    assert all(np.all(np.diff(rows) > 0) for rows in splits.values())
    assert all(len(rows) > 0 for rows in splits.values())
    owners = {case: {s for s, rows in splits.items() if case in set(cases[rows])} for case in cases}
    assert all(len(o) == 1 for o in owners.values())


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {
            name: f[name][()]
            for name in (*MODALITIES, "seg", "case_id", "slice_index", "split/train", "split/val", "split/test")
        }


def test_same_file_whatever_jobs_or_listing_order(cases_dir: Path, artifact: Path, tmp_path: Path, monkeypatch) -> None:
    import os

    real_walk = os.walk

    def reversed_walk(top, *args, **kwargs):  # the file system lists folders in another order
        for root, dirs, files in real_walk(top, *args, **kwargs):
            dirs.reverse()
            yield root, dirs, list(reversed(files))

    monkeypatch.setattr(os, "walk", reversed_walk)
    one_job = tmp_path / "one.h5"
    build(cases_dir, one_job, BuildOptions(jobs=1, val_fraction=0.25, test_fraction=0.25, progress=False))
    a, b = _datasets(one_job), _datasets(artifact)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_brats2021_layout_uncompressed_and_label_4(tmp_path: Path) -> None:
    source = tmp_path / "BraTS2021"
    write_case(source, 5, seed=0, layout="brats2021", compressed=False)
    case = source / "BraTS2021_00005"
    assert (case / "BraTS2021_00005_flair.nii").is_file()
    seg = case_volume(case, "_seg")
    assert 4 in seg and 3 not in seg
    out = tmp_path / "old.h5"
    build(source, out, QUIET)
    z = int(np.argmax(np.count_nonzero(seg, axis=(0, 1))))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["seg"][0], np.where(seg[:, :, z] == 4, 3, seg[:, :, z]))
        np.testing.assert_array_equal(f["t2f"][0], case_volume(case, "_flair")[:, :, z])
        np.testing.assert_array_equal(f["t1c"][0], case_volume(case, "_t1ce")[:, :, z])


def test_k_densest_slices_keep_rows_of_a_case_together(cases_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "k3.h5"
    build(cases_dir, out, BuildOptions(jobs=2, rule=SliceRule(per_case=3), val_fraction=0.25, test_fraction=0.25, progress=False))
    with h5py.File(out) as f:
        cases = f["case_id"].asstr()[()]
        slices = f["slice_index"][()]
        assert len(cases) == 3 * len(set(cases))
        for case in sorted(set(cases)):
            rows = np.flatnonzero(cases == case)
            assert np.all(np.diff(rows) == 1)  # contiguous
            counts = np.count_nonzero(case_volume(cases_dir / case, "seg"), axis=(0, 1))
            expected = np.sort(np.argsort(-counts, kind="stable")[:3])
            np.testing.assert_array_equal(slices[rows], expected)
            np.testing.assert_array_equal(f["t1c"][rows[-1]], case_volume(cases_dir / case, "t1c")[:, :, expected[-1]])
        splits = {s: set(cases[f["split"][s][()]]) for s in SPLITS}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])


# --- bad input -------------------------------------------------------------------------------------------------


def _rewrite(path: Path, data: np.ndarray) -> None:
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine), path)


def _break_cases(source: Path) -> dict[str, str]:
    """Damage one case per kind of fault; return case id -> a word its skip reason must contain."""
    cases = sorted(p for p in source.iterdir())
    expect = {}
    (cases[0] / f"{cases[0].name}-t2w.nii.gz").unlink()
    expect[cases[0].name] = "missing"
    t2f = cases[1] / f"{cases[1].name}-t2f.nii.gz"
    t2f.write_bytes(t2f.read_bytes()[:200_000])
    expect[cases[1].name] = "truncated"
    _rewrite(cases[2] / f"{cases[2].name}-t1n.nii.gz", np.zeros((240, 240, 150), np.int16))
    expect[cases[2].name] = "shape"
    t1c = cases[3] / f"{cases[3].name}-t1c.nii.gz"
    values = read_volume(t1c).astype(np.float32)
    values[100:140, 100:140, :] = np.nan
    _rewrite(t1c, values)
    expect[cases[3].name] = "NaN"
    _rewrite(cases[4] / f"{cases[4].name}-seg.nii.gz", np.zeros((240, 240, 155), np.uint8))
    expect[cases[4].name] = "empty"
    seg = cases[5] / f"{cases[5].name}-seg.nii.gz"
    labels = read_volume(seg).copy()
    labels[labels == 2] = 7
    _rewrite(seg, labels)
    expect[cases[5].name] = "outside 0..4"
    return expect


def test_bad_cases_are_skipped_with_reasons(case_copy, tmp_path: Path) -> None:
    source = case_copy(9)
    expect = _break_cases(source)
    out = tmp_path / "out.h5"
    summary = build(source, out, BuildOptions(jobs=2, progress=False))
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert reasons.keys() == expect.keys()
    for case, word in expect.items():
        assert word in reasons[case], reasons[case]
    with h5py.File(out) as f:
        assert set(f["case_id"].asstr()[()]) == {p.name for p in source.iterdir()} - expect.keys()
        assert {s["case_id"]: s["reason"] for s in json.loads(f.attrs["skipped"])} == reasons
        assert f["t1c"].dtype == np.float32  # one case stored float32, so the column is float32 (lossless for int16)


def test_strict_makes_a_skip_fatal_and_leaves_no_file(case_copy, tmp_path: Path) -> None:
    source = case_copy(7)
    _break_cases(source)
    out = tmp_path / "strict.h5"
    with pytest.raises(BuildError, match="--strict"):
        build(source, out, BuildOptions(jobs=1, strict=True, progress=False))
    assert list(tmp_path.glob("*strict*")) == []


def test_cli_no_valid_case_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = one_error_line(builder_cli("build", str(tmp_path / "empty"), str(tmp_path / "x.h5")), only=True)
    assert "no BraTS case folders" in line
    broken = tmp_path / "broken" / "BraTS-GLI-00001-000"
    broken.mkdir(parents=True)
    (broken / "BraTS-GLI-00001-000-t1n.nii.gz").write_bytes(b"garbage")
    line = one_error_line(builder_cli("build", str(tmp_path / "broken"), str(tmp_path / "x.h5")), only=True)
    assert "no valid case" in line and "missing" in line
    assert not (tmp_path / "x.h5").exists()


def test_cli_unwritable_out_is_one_line_exit_1(cases_dir: Path, tmp_path: Path) -> None:
    line = one_error_line(builder_cli("build", str(cases_dir), str(tmp_path / "no" / "such" / "dir" / "x.h5")), only=True)
    assert "cannot write" in line
    line = one_error_line(builder_cli("build", str(tmp_path / "nowhere"), str(tmp_path / "x.h5")), only=True)
    assert "no such folder" in line


def test_failed_build_leaves_nothing_and_keeps_an_older_file(cases_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "keep.h5"
    out.write_bytes(b"an older artifact")

    def interrupted(self, case):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.ArtifactWriter, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(cases_dir, out, QUIET)
    assert out.read_bytes() == b"an older artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


# --- info and verify ---------------------------------------------------------------------------------------------


def test_info_summarises(artifact: Path) -> None:
    result = builder_cli("info", str(artifact))
    assert result.exit_code == 0
    assert "rows: 12 from 12 cases" in result.output and "train 6, val 3, test 3" in result.output
    assert "skipped cases: 0" in result.output


def test_verify_passes_then_catches_a_flipped_byte(artifact: Path, tmp_path: Path) -> None:
    assert builder_cli("verify", str(artifact)).exit_code == 0
    damaged = tmp_path / "damaged.h5"
    shutil.copy(artifact, damaged)
    with h5py.File(damaged) as f:
        chunk = f["t2w"].id.get_chunk_info(4)
    with open(damaged, "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = builder_cli("verify", str(damaged))
    assert result.exit_code == 1
    assert "/t2w" in result.output and "unreadable" in result.output


def test_verify_catches_overlapping_splits(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    shutil.copy(artifact, bad)
    with h5py.File(bad, "r+") as f:
        val = f["split/val"][()]
        del f["split/train"]
        f["split/train"] = np.arange(f["seg"].shape[0])
    result = builder_cli("verify", str(bad))
    assert result.exit_code == 1 and "share rows" in result.output
    assert len(val) > 0


def test_dask_backend_builds_the_same_file(cases_dir: Path, artifact: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    out = tmp_path / "dask.h5"
    build(cases_dir, out, BuildOptions(jobs=2, backend="dask", val_fraction=0.25, test_fraction=0.25, progress=False))
    a, b = _datasets(out), _datasets(artifact)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_unreachable_dask_scheduler_is_one_line(cases_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    result = builder_cli("build", str(cases_dir), str(tmp_path / "x.h5"), "--backend", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert "cannot reach the Dask scheduler" in one_error_line(result, only=True)
    assert not (tmp_path / "x.h5").exists()


def test_every_tumour_slice_with_a_minimum(cases_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "two"
    for case in sorted(cases_dir.iterdir())[:2]:
        (source / case.name).parent.mkdir(parents=True, exist_ok=True)
        (source / case.name).symlink_to(case, target_is_directory=True)
    out = tmp_path / "all.h5"
    build(source, out, BuildOptions(jobs=1, rule=SliceRule(per_case=None, min_tumour_voxels=50), progress=False))
    with h5py.File(out) as f:
        cases, slices = f["case_id"].asstr()[()], f["slice_index"][()]
        assert f.attrs["slices_per_case"] == b"all" and f.attrs["min_tumour_voxels"] == 50
    for case in sorted(set(cases)):
        counts = np.count_nonzero(case_volume(cases_dir / case, "seg"), axis=(0, 1))
        np.testing.assert_array_equal(slices[cases == case], np.flatnonzero(counts >= 50))

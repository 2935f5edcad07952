"""Three planes and neighbouring slices (2.5D): what the builder stores, what the trainer reads and what whole-volume
inference assembles are nibabel's slices along the plane's axis, with one edge rule (zeros beyond the volume)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from builder.build import BuildError, BuildOptions, build
from builder.extract import SliceRule
from builder.format import MODALITIES, slice_axis
from builder.layout import find_cases
from trainer.cli import main
from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.data.context import volume_inputs
from trainer.data.loading import RowReader, SliceDataset
from trainer.errors import CaseError
from trainer.inference.cases import Geometry, read_case

from conftest import FAST, case_volume, one_error_line


def _neighbours(volume: np.ndarray, index: int, axis: int, context: int) -> np.ndarray:
    """Slices index-K..index+K along ``axis`` read with nibabel, zeros beyond the volume: the independent answer."""
    slices = []
    for position in range(index - context, index + context + 1):
        inside = 0 <= position < volume.shape[axis]
        slices.append(np.take(volume, position, axis) if inside else np.zeros_like(np.take(volume, 0, axis)))
    return np.stack(slices)


def test_axis_of_each_plane_from_the_axis_codes() -> None:
    assert [slice_axis(("L", "P", "S"), p) for p in ("axial", "coronal", "sagittal")] == [2, 1, 0]
    assert [slice_axis(("S", "R", "A"), p) for p in ("axial", "coronal", "sagittal")] == [0, 2, 1]


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_rows_and_their_neighbours_are_nibabels_slices_along_the_plane(cases_dir: Path, tmp_path: Path,
                                                                       plane: str) -> None:
    source = tmp_path / "two"
    for case in sorted(cases_dir.iterdir())[:2]:
        shutil.copytree(case, source / case.name)
    out = tmp_path / f"{plane}.h5"
    build(source, out, BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0,
                                    rule=SliceRule(per_case=2, plane=plane, context=2)))
    axis = slice_axis(("L", "P", "S"), plane)
    with h5py.File(out) as f:
        assert f.attrs["plane"] == plane.encode() and f.attrs["slice_axis"] == axis and f.attrs["context"] == 2
        ids, indices = f["case_id"].asstr()[()], f["slice_index"][()]
        for row, (case_id, index) in enumerate(zip(ids, indices)):
            seg = case_volume(source / case_id, "-seg")
            counts = np.count_nonzero(np.moveaxis(seg, axis, 0).reshape(seg.shape[axis], -1), axis=1)
            assert index in np.sort(np.argsort(-counts, kind="stable")[:2])  # the two densest, in this plane
            np.testing.assert_array_equal(f["seg"][row], np.take(seg, index, axis))
            for modality in MODALITIES:
                expected = _neighbours(case_volume(source / case_id, f"-{modality}"), int(index), axis, 2)
                np.testing.assert_array_equal(f[modality][row], expected[2])
                np.testing.assert_array_equal(f[f"context/{modality}"][row], np.delete(expected, 2, axis=0))


def test_the_trainer_reads_nibabels_neighbours_and_inference_assembles_the_same(small_artifact: Path,
                                                                                small_cases: Path) -> None:
    artifact = Artifact.open(small_artifact)
    assert artifact.context == 1
    rows = artifact.rows_of("train")[:3]
    dataset = SliceDataset(RowReader(small_artifact, ["t1c", "t2f"], context=1, stored_context=1), rows)
    config = FitConfig(data=str(small_artifact), modality="all", context=1)
    for position, row in enumerate(rows):
        case = small_cases / str(artifact.case_ids[row])
        z = int(artifact.slice_index[row])
        image = dataset[position][0].numpy()  # (2 channels x 3 slices, H, W)
        expected = np.concatenate([_neighbours(case_volume(case, f"-{m}"), z, 2, 1) for m in ("t1c", "t2f")])
        np.testing.assert_array_equal(image, expected)
        (found,) = find_cases(case)
        volumes = read_case(found, config.channels, Geometry.of(config))
        stacked = volume_inputs(volumes.images, np.array([z]), 1)[0]  # what `network_probabilities` feeds the network
        every = SliceDataset(RowReader(small_artifact, list(MODALITIES), context=1, stored_context=1), [row])[0][0].numpy()
        np.testing.assert_array_equal(stacked, every)


def test_volume_inputs_zero_pad_beyond_the_edges() -> None:
    stack = np.arange(2 * 2 * 2 * 3, dtype=np.int16).reshape(2, 2, 2, 3) + 1  # (C, H, W, S): three slices
    out = volume_inputs(stack, np.array([0, 2]), 1)
    assert out.shape == (2, 6, 2, 2)
    np.testing.assert_array_equal(out[0, 0], 0)  # before the first slice: zeros
    np.testing.assert_array_equal(out[0, 1], stack[0, :, :, 0])
    np.testing.assert_array_equal(out[0, 2], stack[0, :, :, 1])
    np.testing.assert_array_equal(out[1, 5], 0)  # after the last slice of the second channel: zeros
    np.testing.assert_array_equal(out[1, 3], stack[1, :, :, 1])


def test_more_context_than_the_file_holds_is_one_line(small_artifact: Path, tmp_path: Path) -> None:
    line = one_error_line(CliRunner().invoke(main, ["fit", str(small_artifact), "-m", "all", "--out", str(tmp_path),
                                                    *FAST, "--context", "2"]))
    assert "holds 1 neighbouring slice(s)" in line and "--context 1 or less" in line
    assert list(tmp_path.iterdir()) == []


def test_a_volume_too_thin_for_the_context(small_cases: Path, tmp_path: Path) -> None:
    case = sorted(small_cases.iterdir())[0]
    thin = tmp_path / "thin" / case.name
    thin.mkdir(parents=True)
    for path in case.iterdir():
        image = nib.load(path)
        nib.save(image.slicer[:, :, 14:16], thin / path.name)  # two slices
    with pytest.raises(BuildError, match="fewer than the 5 that --context 2 needs"):
        build(thin.parent, tmp_path / "x.h5", BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0,
                                                            rule=SliceRule(context=2)))
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(CaseError, match="fewer than the 3 a model with --context 1 needs"):
        Geometry(context=1).check(case.name, (96, 96, 2))

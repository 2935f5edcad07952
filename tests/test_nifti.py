"""The streaming slice reader gives exactly what nibabel gives, for every storage variant BraTS files come in."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from builder.nifti import NiftiReadError, read_header, read_slices

from conftest import read_volume


def _save(path: Path, data: np.ndarray, slope: float | None = None, inter: float = 0.0) -> Path:
    image = nib.Nifti1Image(data, np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
        image.set_data_dtype(np.int16)
    nib.save(image, path)
    return path


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(-500, 3000, (24, 20, 16), dtype=np.int16)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_slices_equal_nibabel(tmp_path: Path, volume: np.ndarray, name: str, dtype: type) -> None:
    path = _save(tmp_path / name, volume.astype(dtype))
    expected = read_volume(path)
    slices, info = read_slices(path, [0, 7, 15])
    assert info.shape == (24, 20, 16)
    assert slices.dtype == expected.dtype
    for row, z in enumerate([0, 7, 15]):
        np.testing.assert_array_equal(slices[row], expected[:, :, z])


def test_scaled_values_equal_nibabel(tmp_path: Path, volume: np.ndarray) -> None:
    path = _save(tmp_path / "scaled.nii.gz", volume.astype(np.float32) * 0.5 + 3, slope=0.5, inter=3.0)
    expected = read_volume(path)[:, :, 5]
    got, info = read_slices(path, [5])
    assert info.slope == 0.5
    assert got.dtype == expected.dtype and info.value_dtype == expected.dtype
    np.testing.assert_array_equal(got[0], expected)


def test_big_endian_and_concatenated_gzip(tmp_path: Path, volume: np.ndarray) -> None:
    plain = _save(tmp_path / "v.nii", volume.astype(">i2"))
    raw = plain.read_bytes()
    joined = tmp_path / "joined.nii.gz"
    joined.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))  # two gzip members
    got, _ = read_slices(joined, [9])
    np.testing.assert_array_equal(got[0], volume[:, :, 9])


def test_truncated_and_missing_files_raise_clear_errors(tmp_path: Path, volume: np.ndarray) -> None:
    path = _save(tmp_path / "v.nii.gz", volume)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(NiftiReadError, match="truncated|corrupt"):
        read_slices(path, [15])
    with pytest.raises(NiftiReadError, match="missing"):
        read_header(tmp_path / "absent.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not gzip at all" * 50)
    with pytest.raises(NiftiReadError):
        read_header(tmp_path / "junk.nii.gz")

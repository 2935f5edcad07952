"""Synthetic cases look like the real BraTS 2023 release, and their contrast is the one the generator promises."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from builder.format import MODALITIES
from builder.synth import AFFINE, synth_case


def _load(case: Path, suffix: str) -> nib.Nifti1Image:
    return nib.load(case / f"{case.name}-{suffix}.nii.gz")


def test_layout_names_shapes_dtypes(cases_dir: Path) -> None:
    case = cases_dir / "BraTS-GLI-00000-000"
    assert case.is_dir()
    names = sorted(p.name for p in case.iterdir())
    assert names == sorted(f"BraTS-GLI-00000-000-{s}.nii.gz" for s in (*MODALITIES, "seg"))
    for suffix in MODALITIES:
        image = _load(case, suffix)
        assert image.shape == (240, 240, 155)
        assert image.get_data_dtype() == np.int16
        assert np.allclose(image.affine, AFFINE)
        assert np.allclose(image.header.get_zooms(), (1, 1, 1))
    seg = np.asanyarray(_load(case, "seg").dataobj)
    assert seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg > 0).any()


def test_same_seed_same_case_other_seed_other_case() -> None:
    a, b, c = synth_case(3, seed=7), synth_case(3, seed=7), synth_case(3, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["seg"], c["seg"])


def test_contrast_differs_by_modality_like_real_mri() -> None:
    """Oedema bright on T2w/FLAIR; the enhancing rim bright on T1c only; FLAIR can hardly tell rim from oedema."""
    volumes = next(v for v in map(synth_case, range(10), [0] * 10) if set(np.unique(v["seg"])) == {0, 1, 2, 3})
    seg = volumes["seg"]
    mean = {m: {label: volumes[m][seg == label].mean() for label in (1, 2, 3)} for m in MODALITIES}
    wm = {m: np.median(volumes[m][(seg == 0) & (volumes[m] > 0)]) for m in MODALITIES}
    assert mean["t2f"][2] > 1.5 * wm["t2f"] and mean["t2w"][2] > 1.5 * wm["t2w"]
    assert mean["t1c"][3] > 2 * mean["t1c"][2]
    assert abs(mean["t2f"][3] - mean["t2f"][2]) < 0.1 * mean["t2f"][2]
    assert abs(mean["t1n"][3] - mean["t1n"][2]) < 0.1 * mean["t1n"][2]

"""Whole-volume BraTS scores against values worked out by hand on small constructed volumes."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.scoring import MAX_HD95, hd95, lesion_wise, score_case, score_region

SHAPE = (40, 30, 30)
ONE_MM = (1.0, 1.0, 1.0)


def cube(corner: tuple[int, int, int], size: tuple[int, int, int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Surface voxels by explicit 6-neighbour tests and all pairwise distances: an independent HD95."""

    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inside = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inside &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inside) * np.asarray(spacing)

    pa, pb = surface(a), surface(b)
    distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_two_lesions_within_the_dilation_are_one_lesion() -> None:
    a, b = cube((5, 5, 5), (4, 4, 4)), cube((15, 5, 5), (4, 4, 4))  # 6 voxels apart: merged (3 + 3 dilation)
    scores = lesion_wise(a, a | b, ONE_MM)
    assert scores["lesion_tp"] == 1 and scores["lesion_fn"] == 0 and scores["lesion_fp"] == 0
    assert scores["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert scores["lesion_hd95"] == pytest.approx(hd95(a, a | b, ONE_MM))


def test_two_lesions_beyond_the_dilation_are_scored_apart() -> None:
    a, b = cube((5, 5, 5), (4, 4, 4)), cube((16, 5, 5), (4, 4, 4))  # 7 voxels apart: two lesions
    scores = lesion_wise(a, a | b, ONE_MM)
    assert (scores["lesion_tp"], scores["lesion_fn"], scores["lesion_fp"]) == (1, 1, 0)
    assert scores["lesion_dice"] == pytest.approx((1 + 0) / 2)
    assert scores["lesion_hd95"] == pytest.approx((0 + MAX_HD95) / 2)


def test_a_40_voxel_lesion_is_left_out() -> None:
    big, small = cube((5, 5, 5), (5, 5, 5)), cube((25, 20, 20), (2, 4, 5))  # 125 and 40 voxels, far apart
    scores = lesion_wise(big, big | small, ONE_MM)
    assert scores["lesion_dice"] == 1.0 and scores["lesion_hd95"] == 0.0
    assert (scores["lesion_tp"], scores["lesion_fn"]) == (1, 0)
    legacy = score_region(big, big | small, ONE_MM)
    assert legacy["dice"] == pytest.approx(2 * 125 / (125 + 165))
    assert legacy["sensitivity"] == pytest.approx(125 / 165)


def test_a_false_positive_lesion_scores_zero_and_374() -> None:
    truth = cube((5, 5, 5), (5, 5, 5))
    pred = truth | cube((30, 20, 20), (1, 1, 3))
    scores = lesion_wise(pred, truth, ONE_MM)
    assert scores["lesion_fp"] == 1
    assert scores["lesion_dice"] == pytest.approx(0.5)
    assert scores["lesion_hd95"] == pytest.approx(MAX_HD95 / 2)


def test_a_prediction_within_reach_of_a_lesion_is_no_false_positive() -> None:
    truth = cube((5, 5, 5), (5, 5, 5))
    speck = cube((12, 7, 7), (1, 1, 1))  # 3 voxels beyond the lesion: inside its dilation
    scores = lesion_wise(truth | speck, truth, ONE_MM)
    assert scores["lesion_fp"] == 0 and scores["lesion_tp"] == 1
    assert scores["lesion_dice"] == pytest.approx(2 * 125 / 251)


def test_anisotropic_spacing_scales_distances_and_volumes() -> None:
    spacing = (1.0, 1.0, 2.5)
    truth, pred = cube((5, 5, 5), (1, 1, 1)), cube((5, 5, 9), (1, 1, 1))
    assert hd95(pred, truth, spacing) == pytest.approx(4 * 2.5)
    # 30 voxels of 2.5 mm^3 are 75 mm^3: above the 50 mm^3 threshold, so a missed one counts
    lesion = cube((5, 5, 5), (2, 3, 5))
    assert lesion_wise(np.zeros(SHAPE, bool), lesion, spacing)["lesion_fn"] == 1
    assert lesion_wise(np.zeros(SHAPE, bool), lesion, ONE_MM)["lesion_fn"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_pairwise_distances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.zeros((16, 14, 12), bool)
    b = np.zeros_like(a)
    a[3:10, 2:9, 2:8] = True
    b[5:13, 4:12, 3:10] = True
    a &= rng.random(a.shape) < 0.9
    b &= rng.random(b.shape) < 0.9
    spacing = (1.0, 0.8, 2.0)
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))


def test_empty_regions_follow_the_challenge() -> None:
    empty = np.zeros(SHAPE, bool)
    both = score_region(empty, empty, ONE_MM)
    assert (both["dice"], both["hd95"], both["lesion_dice"], both["lesion_hd95"], both["sensitivity"]) == (1, 0, 1, 0, 1)
    truth = cube((5, 5, 5), (5, 5, 5))
    missed = score_region(empty, truth, ONE_MM)
    assert (missed["dice"], missed["hd95"], missed["lesion_dice"], missed["lesion_hd95"]) == (0, MAX_HD95, 0, MAX_HD95)
    assert missed["sensitivity"] == 0 and missed["specificity"] == 1
    invented = score_region(truth, empty, ONE_MM)
    assert (invented["dice"], invented["lesion_dice"], invented["lesion_fp"]) == (0, 0, 1)
    assert invented["specificity"] == pytest.approx(1 - 125 / (empty.size))


def test_score_case_uses_the_brats_regions() -> None:
    truth = np.zeros(SHAPE, np.uint8)
    truth[cube((5, 5, 5), (9, 9, 9))] = 2  # oedema
    truth[cube((7, 7, 7), (5, 5, 5))] = 1  # necrosis inside
    pred = truth.copy()
    pred[pred == 1] = 3  # necrosis called enhancing: WT and TC right, ET invented
    scores = score_case(pred, truth, ONE_MM)
    assert scores["dice_WT"] == 1 and scores["dice_TC"] == 1
    assert scores["dice_ET"] == 0 and scores["lesion_fp_ET"] == 1 and scores["lesion_dice_ET"] == 0

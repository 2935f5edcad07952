"""Whole-volume BraTS scores against values worked out by hand on small constructed volumes."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.scoring.brats import MAX_HD95, hd95, lesion_wise, score_case, score_region

SHAPE = (40, 30, 30)
ONE_MM = (1.0, 1.0, 1.0)


def cube(corner: tuple[int, int, int], size: tuple[int, int, int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def box_hd95(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...], spacing: tuple[float, ...]) -> float:
    """HD95 of two boxes (voxel ranges [start, stop) per axis) worked out from geometry alone, as the challenge defines
    it: surface elements sit at the voxel corners on each box's boundary, weighted by the marching-cubes area there
    (a face corner carries the face's area element, an edge corner half a diagonal strip, a vertex one small
    triangle), distances between corners are brute force, and 95% of one surface's area lies within the percentile."""
    s = np.asarray(spacing, float)

    def corners(box: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
        grid = np.stack(np.meshgrid(*[np.arange(lo, hi + 1) for lo, hi in box], indexing="ij"), -1).reshape(-1, 3)
        on_side = np.stack([(grid[:, i] == lo) | (grid[:, i] == hi) for i, (lo, hi) in enumerate(box)], 1)
        grid, on_side = grid[on_side.any(1)], on_side[on_side.any(1)]
        areas = []
        for sides in on_side:
            free = [i for i in range(3) if not sides[i]]
            if len(free) == 2:  # inside a face: the face's area element
                areas.append(s[free[0]] * s[free[1]])
            elif len(free) == 1:  # on an edge: a strip half a voxel diagonal wide
                other = [i for i in range(3) if sides[i]]
                areas.append(0.5 * s[free[0]] * np.hypot(s[other[0]], s[other[1]]))
            else:  # a vertex: the corner triangle
                areas.append(0.125 * np.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2))
        return grid * s, np.array(areas)

    (pa, wa), (pb, wb) = corners(a), corners(b)
    distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)

    def percentile(d: np.ndarray, w: np.ndarray) -> float:
        order = np.argsort(d)
        return float(d[order][min(np.searchsorted(np.cumsum(w[order]) / w.sum(), 0.95), len(d) - 1)])

    return max(percentile(distances.min(1), wa), percentile(distances.min(0), wb))


def box_mask(box: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(slice(lo, hi) for lo, hi in box)] = True
    return mask


BOXES = [
    (((5, 9), (5, 9), (5, 9)), ((7, 11), (5, 9), (5, 9))),  # shifted by 2 along the first axis
    (((5, 9), (5, 9), (5, 9)), ((4, 10), (4, 10), (4, 10))),  # one voxel grown all round
    (((5, 15), (6, 9), (5, 7)), ((8, 12), (6, 11), (4, 9))),  # crossing boxes of different shapes
]


@pytest.mark.parametrize("spacing", [ONE_MM, (1.0, 2.0, 3.0), (0.5, 1.2, 2.5)], ids=["1mm", "1x2x3", "anisotropic"])
@pytest.mark.parametrize("a, b", BOXES, ids=["shifted", "grown", "crossing"])
def test_hd95_of_boxes_worked_out_from_geometry(a, b, spacing) -> None:
    expected = box_hd95(a, b, spacing)
    assert hd95(box_mask(a), box_mask(b), spacing) == pytest.approx(expected, abs=0.01)
    assert hd95(box_mask(b), box_mask(a), spacing) == pytest.approx(expected, abs=0.01)


def test_hd95_weights_surface_area_not_voxels() -> None:
    # a 1-voxel-thin slab against the slab one voxel above: every surface element but the rim is 1 voxel (3 mm) away,
    # and the two big faces carry almost all the area, so the 95th percentile is one slice step along the thin axis
    spacing = (1.0, 1.0, 3.0)
    slab, above = ((5, 25), (5, 25), (5, 6)), ((5, 25), (5, 25), (6, 7))
    assert box_hd95(slab, above, spacing) == pytest.approx(3.0)
    assert hd95(box_mask(slab), box_mask(above), spacing) == pytest.approx(3.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_equals_the_challenges_surface_distance_code(seed: int) -> None:
    surface_distance = pytest.importorskip("surface_distance")  # DeepMind's code, which the challenge's calls
    rng = np.random.default_rng(seed)
    a = np.zeros((16, 14, 12), bool)
    b = np.zeros_like(a)
    a[3:10, 2:9, 2:8] = True
    b[5:13, 4:12, 3:10] = True
    a &= rng.random(a.shape) < 0.9
    b &= rng.random(b.shape) < 0.9
    spacing = (1.0, 0.8, 2.0)
    distances = surface_distance.compute_surface_distances(b, a, spacing)
    assert hd95(a, b, spacing) == pytest.approx(surface_distance.compute_robust_hausdorff(distances, 95), abs=1e-6)


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


def test_uncertainty_is_the_normalised_entropy_of_each_task() -> None:
    """Known answers: a sure voxel 0, a uniform guess 1; regions sum binary entropies over their three sigmoids."""
    from trainer.tasks import uncertainty

    softmax = np.array([[1.0, 0.25, 0.5], [0.0, 0.25, 0.5], [0.0, 0.25, 0.0], [0.0, 0.25, 0.0]])
    np.testing.assert_allclose(uncertainty(softmax, "multiclass"), [0.0, 1.0, 0.5], atol=1e-5)  # log 2 / log 4
    sigmoids = np.array([[1.0, 0.5, 0.9], [0.0, 0.5, 0.9], [1.0, 0.5, 0.5]])
    binary_09 = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)
    np.testing.assert_allclose(uncertainty(sigmoids, "regions"), [0.0, 1.0, (2 * binary_09 + 1) / 3], atol=1e-5)
    # float16, as inference hands probabilities on (its sure voxels found on the bits): the same within its precision
    for probs, task in ((softmax, "multiclass"), (sigmoids, "regions")):
        np.testing.assert_allclose(uncertainty(probs.astype(np.float16), task), uncertainty(probs, task), atol=1e-3)
    near = np.array([[0.0, 6e-8, 0.9995, 1.0]], dtype=np.float16)  # the smallest float16 above 0, the largest below 1
    assert (uncertainty(near, "regions") > 0).tolist() == [False, True, True, False]


def test_the_dice_of_uncertain_voxels_holds_the_errors_placed_there() -> None:
    """A hand-built case: the prediction misses 4 tumour voxels and adds 2, all of them where the map is most
    unsure; the surest half of the tumour is then right (Dice 1) and the other half holds every error."""
    from trainer.scoring.uncertainty import dice_by_uncertainty

    truth = np.zeros((1, 4, 5), np.uint8)
    truth[0, :, :3] = 2  # 12 voxels of oedema: WT
    pred = truth.copy()
    pred[0, 0, :3] = 0  # 3 missed
    pred[0, 1, 0] = 0  # 1 more missed
    pred[0, 3, 3:] = 2  # 2 false
    map_ = np.full(truth.shape, 0.1, np.float32)  # 14 voxels in prediction or truth: 8 right, 6 wrong
    map_[(pred > 0) != (truth > 0)] = 0.9
    map_[0, 2, 0] = 0.8  # one right voxel among the unsure: the 7 above the median (0.45)
    scores = dice_by_uncertainty(pred, truth, map_, ("WT", "ET"))
    assert scores["dice_WT_certain"] == 1.0  # 7 right voxels
    assert scores["dice_WT_uncertain"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 4))  # 1 right, 2 false, 4 missed
    assert "dice_ET_certain" not in scores  # neither map holds ET


def test_temperature_scaling_finds_the_temperature_that_made_the_targets() -> None:
    """Targets drawn from sigmoid(z / 2.5) while the model says sigmoid(z): the fitted temperature is 2.5 and the
    ECE falls; a softmax alike; neither moves a label; a fit that runs to its bound is a ValueError."""
    from trainer.scoring.calibration import Calibration, calibrate, fit_temperature, logits_of
    from trainer.tasks import REGION_THRESHOLD

    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(3, 200_000)).astype(np.float32)
    targets = rng.random(z.shape) < 1 / (1 + np.exp(-z / 2.5))
    said = (1 / (1 + np.exp(-z))).astype(np.float16)
    calibration, curves = calibrate(said, targets, "regions", "a test")
    assert calibration.temperatures == pytest.approx((2.5, 2.5, 2.5), rel=0.05)
    assert calibration.ece_after < calibration.ece_before / 3 and curves["before"] and curves["after"]
    assert np.array_equal(calibration.apply(said) > REGION_THRESHOLD, said > REGION_THRESHOLD)
    logits = rng.normal(0, 3, size=(4, 100_000)).astype(np.float32)
    truth = np.array([rng.choice(4, p=np.exp(c / 2) / np.exp(c / 2).sum()) for c in logits[:, :20_000].T])
    probs = np.exp(logits[:, :20_000]) / np.exp(logits[:, :20_000]).sum(0)
    assert fit_temperature(logits_of(probs, "multiclass"), truth, "multiclass") == pytest.approx(2.0, rel=0.1)
    held = probs.astype(np.float16)  # as the segmenter holds them
    softened = Calibration("multiclass", (2.0,), "a test", 0, 0).apply(held)
    assert np.array_equal(softened.argmax(0), held.argmax(0))
    with pytest.raises(ValueError, match="did not converge"):  # perfectly separated: the temperature runs to 0
        fit_temperature(logits_of(np.array([0.6, 0.4] * 50, np.float32), "regions"), np.array([True, False] * 50),
                        "regions")

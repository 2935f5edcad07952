"""Whole-volume scores of one case, as the BraTS 2023 challenge computes them (numpy and scipy.ndimage only).

Definitions follow the challenge's published metric code (rachitsaluja/BraTS-2023-Metrics) with the BraTS-GLI
parameters, per region WT {1,2,3}, TC {1,3}, ET {3}:

- *Legacy* whole-volume scores: Dice (1 when the region is empty in both), HD95 in mm (0 when empty in both,
  374 when empty in just one), sensitivity tp / (tp + fn) (1 when empty in both) and specificity tn / (tn + fp).
- *Lesion-wise* Dice and HD95: truth lesions are the 26-connected components of the truth after merging those
  whose 3-voxel dilations (18-neighbourhood, 3 iterations) touch; a truth lesion is matched by every predicted
  26-connected component that touches its dilation and scored against their union; truth lesions of 50 mm^3 or
  less are left out of the mean (their matches are not false positives); every predicted component that matches
  no truth lesion is a false positive scoring Dice 0 and HD95 374; a region empty in both scores Dice 1, HD95 0.

HD95 is computed as the challenge's code computes it (DeepMind's surface-distance, which the challenge's code calls):
the surface of a mask is made of surface elements at the voxel corners whose 2x2x2 neighbourhood is mixed, each
weighted by its area in mm^2 (the marching-cubes area of that neighbourhood's configuration at the voxel spacing,
from surface-distance's own table); the directed 95th percentile is the distance below which 95% of one surface's
area lies from the other surface, and HD95 is the larger of the two directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from builder.format import REGIONS

#: HD95 given to a missed or false-positive lesion, and to a region present in only one of the two volumes.
MAX_HD95 = 374.0
_CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)
_DILATION_18 = ndimage.generate_binary_structure(3, 2)
METRICS = ("dice", "hd95", "sensitivity", "specificity", "lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp",
           "lesion_fn")


@dataclass(frozen=True)
class LesionRule:
    """How lesions are merged and which are too small to count (the challenge's values for BraTS-GLI)."""

    dilation: int = 3
    min_volume_mm3: float = 50.0


def region_names(task: str) -> tuple[str, ...]:
    """The regions a task's label maps are scored on: a binary (whole tumour) model has WT only."""
    return ("WT",) if task == "binary" else tuple(REGIONS)


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (``builder.format.REGIONS``) in a label volume."""
    return np.isin(labels, REGIONS[region])


def dice_from_counts(tp: Any, fp: Any, fn: Any) -> Any:
    """The one Dice of brats2d: 2tp / (2tp + fp + fn), and 1 where prediction and truth are both empty.

    Arithmetic only, so it works alike on numbers, numpy arrays and torch tensors (on the device, no sync):
    training's per-slice region Dice, evaluate, compare and predict all call it.
    """
    denominator = 2 * tp + fp + fn
    empty = denominator == 0
    return (2 * tp + empty) / (denominator + empty)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    tp = int(np.count_nonzero(pred & truth))
    return float(dice_from_counts(tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp))


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``mask``'s voxels, grown by ``margin`` and clipped to the array."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


#: The 2x2x2 neighbourhood code of a voxel corner: one bit per voxel, as surface-distance numbers them.
_CORNER_BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@lru_cache(maxsize=16)
def _surfel_areas(spacing: tuple[float, ...]) -> np.ndarray:
    """Area in mm^2 of the surface element of each of the 256 neighbourhood codes at this voxel spacing."""
    from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

    return create_table_neighbour_code_to_surface_area(spacing)


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """The neighbourhood code of every voxel corner of ``mask`` (one more corner than voxels along each axis)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    codes = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.uint8)
    for (i, j, k), bit in np.ndenumerate(_CORNER_BITS):
        codes += bit * padded[i : i + codes.shape[0], j : j + codes.shape[1], k : k + codes.shape[2]]
    return codes


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The distance below which ``percent`` % of the surface area lies (surface-distance's robust Hausdorff)."""
    order = np.argsort(distances)
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = min(int(np.searchsorted(cumulative, percent / 100)), len(distances) - 1)
    return float(distances[order][index])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile Hausdorff distance in mm on area-weighted surface elements (0 when both are empty, 374 when
    one is), as the challenge computes it."""
    has_pred, has_truth = pred.any(), truth.any()
    if not (has_pred or has_truth):
        return 0.0
    if not (has_pred and has_truth):
        return MAX_HD95
    box = _box(pred | truth, 0)  # distances between surfaces inside a box holding both are exact, and much cheaper
    areas = _surfel_areas(tuple(float(s) for s in spacing))
    codes = [_corner_codes(mask[box]) for mask in (pred, truth)]
    surfaces = [(code != 0) & (code != 255) for code in codes]
    distance_to = [ndimage.distance_transform_edt(~surface, sampling=spacing) for surface in surfaces]
    pred_to_truth = _directed_percentile(distance_to[1][surfaces[0]], areas[codes[0][surfaces[0]]], 95)
    truth_to_pred = _directed_percentile(distance_to[0][surfaces[1]], areas[codes[1][surfaces[1]]], 95)
    return max(pred_to_truth, truth_to_pred)


@dataclass(frozen=True)
class LesionOverlap:
    """One region's predicted components against its truth lesions, matched as the challenge matches them and
    counted once. The lesion-wise Dice of any subset of the components then follows by arithmetic: how a clean-up
    rule, which keeps a subset, is scored without labelling the volume again (``trainer.scoring.cleanup``)."""

    box: tuple[slice, ...]  # where the work happens: the tumour and the lesions' reach
    components: np.ndarray  # predicted 26-connected components 1..P inside ``box``
    lesions: np.ndarray  # truth lesions 1..L (after merging) inside ``box``
    sizes: np.ndarray  # (P,) voxels of each component
    counted: np.ndarray  # (L,) whether each lesion is above the rule's minimum volume
    lesion_sizes: np.ndarray  # (L,) voxels of each lesion
    shared: np.ndarray  # (L, P) voxels lesion i and component j share
    touches: np.ndarray  # (L, P) whether component j touches lesion i's dilation (a match)

    @classmethod
    def of(cls, pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], rule: LesionRule = LesionRule()
           ) -> LesionOverlap:
        if not (pred.any() or truth.any()):
            box: tuple[slice, ...] = tuple(slice(0, 0) for _ in pred.shape)
        else:
            box = _box(pred | truth, rule.dilation + 1)  # all the work happens near the tumour
        pred, truth = pred[box], truth[box]
        components, count = ndimage.label(pred, _CONNECTED_26)
        merged, lesion_count = ndimage.label(ndimage.binary_dilation(truth, _DILATION_18, iterations=rule.dilation)
                                             if truth.size else truth, _CONNECTED_26)
        lesions = merged * truth
        joint = np.bincount((lesions.astype(np.int64) * (count + 1) + components).ravel(),
                            minlength=(lesion_count + 1) * (count + 1)).reshape(lesion_count + 1, count + 1)
        touches = np.zeros((lesion_count, count), dtype=bool)
        for lesion in range(1, lesion_count + 1):
            reach = ndimage.binary_dilation(lesions == lesion, _DILATION_18, iterations=rule.dilation)
            hits = np.unique(components[reach & pred])
            touches[lesion - 1, hits - 1] = True
        lesion_sizes = joint[1:].sum(1)
        return cls(box, components, lesions, joint[0, 1:] + joint[1:, 1:].sum(0),
                   lesion_sizes * float(np.prod(spacing)) > rule.min_volume_mm3, lesion_sizes, joint[1:, 1:], touches)

    def score(self, kept: np.ndarray | None = None) -> dict[str, float]:
        """Lesion-wise Dice and the counts of matched, false and missed lesions when only the components where
        ``kept`` (P booleans) is true are predicted (all of them by default)."""
        kept = np.ones(len(self.sizes), dtype=bool) if kept is None else kept
        hits = self.touches & kept[None]
        found = hits.any(1)
        fp = int(np.count_nonzero(kept & ~hits.any(0)))  # matching no lesion, small ones included
        matched = (hits * self.sizes[None]).sum(1)
        dices = 2 * (hits * self.shared).sum(1) / np.maximum(matched + self.lesion_sizes, 1)
        count = int(np.count_nonzero(self.counted)) + fp
        tp, fn = int(np.count_nonzero(found & self.counted)), int(np.count_nonzero(~found & self.counted))
        dice_value = float(dices[self.counted].sum() / count) if count else 1.0  # only lesions too small, or none
        return {"lesion_dice": dice_value, "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn}


def lesion_wise(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], rule: LesionRule = LesionRule(),
                distances: bool = True) -> dict[str, float]:
    """BraTS 2023 lesion-wise Dice and HD95 of one region, with the counts of matched, false and missed lesions
    (without ``distances``, the HD95 is left out: NaN, and the Dice costs a fraction of the time)."""
    overlap = LesionOverlap.of(pred, truth, spacing, rule)
    scores = overlap.score()
    count = int(np.count_nonzero(overlap.counted)) + scores["lesion_fp"]
    if count == 0:
        distance = 0.0
    elif not distances:
        distance = float("nan")
    else:
        distance = (sum(hd95(np.isin(overlap.components, np.flatnonzero(overlap.touches[i]) + 1),
                             overlap.lesions == i + 1, spacing) for i in np.flatnonzero(overlap.counted))
                    + MAX_HD95 * scores["lesion_fp"]) / count
    return {"lesion_dice": scores["lesion_dice"], "lesion_hd95": distance,
            **{k: scores[k] for k in ("lesion_tp", "lesion_fp", "lesion_fn")}}


def score_region(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], rule: LesionRule = LesionRule()
                 ) -> dict[str, float]:
    """Every score of METRICS for one region's boolean masks."""
    tp = int(np.count_nonzero(pred & truth))
    fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp
    tn = pred.size - tp - fp - fn
    return {
        "dice": dice(pred, truth),
        "hd95": hd95(pred, truth, spacing),
        "sensitivity": 1.0 if tp + fn == 0 and fp == 0 else tp / (tp + fn) if tp + fn else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        **lesion_wise(pred, truth, spacing, rule),
    }


def score_case(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], regions: tuple[str, ...] = tuple(REGIONS),
               rule: LesionRule = LesionRule()) -> dict[str, float]:
    """Scores of every region of two label volumes, keyed ``<metric>_<region>`` (e.g. ``lesion_dice_ET``)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the truth's {truth.shape}")
    out: dict[str, float] = {}
    for region in regions:
        scores = score_region(region_mask(pred, region), region_mask(truth, region), spacing, rule)
        out |= {f"{metric}_{region}": value for metric, value in scores.items()}
    return out

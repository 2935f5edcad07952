"""Whether a model's uncertainty points at its errors: the Dice of the voxels it is least sure of against the Dice
of those it is surest of. A useful map puts the errors in the first half."""

from __future__ import annotations

import numpy as np

from builder.format import REGIONS
from trainer.scoring.brats import dice, region_mask


def dice_by_uncertainty(pred: np.ndarray, truth: np.ndarray, uncertainty: np.ndarray,
                        regions: tuple[str, ...] = tuple(REGIONS)) -> dict[str, float]:
    """Per region, the voxels where the prediction or the truth holds it, split at their median uncertainty.

    Args:
        pred, truth: BraTS label maps (0-3), one shape.
        uncertainty: a map of that shape (``trainer.tasks.uncertainty``: 0 certain .. 1 a uniform guess).
        regions: which of WT, TC, ET.
    Returns:
        ``dice_{R}_uncertain`` (the voxels above the median) and ``dice_{R}_certain`` (the others); a region that
        neither map holds is left out.
    """
    out: dict[str, float] = {}
    for region in regions:
        p, t = region_mask(pred, region), region_mask(truth, region)
        union = p | t
        if not union.any():
            continue
        upper = np.zeros_like(union)
        upper[union] = uncertainty[union] > np.median(uncertainty[union])
        lower = union & ~upper
        out[f"dice_{region}_uncertain"] = dice(p & upper, t & upper)
        out[f"dice_{region}_certain"] = dice(p & lower, t & lower)
    return out

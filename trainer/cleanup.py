"""Clean-up of a predicted label volume, as BraTS pipelines do after a network (nnU-Net and most challenge entries).

A model that sees one slice at a time paints specks on slices far from the tumour; the 2023 lesion-wise
scores count every such speck as a false lesion (Dice 0, HD95 374). Two steps, on 26-connected components:

1. Whole-tumour components smaller than ``min_voxels``, or than ``min_share`` of the largest component, become
   background (a glioma is one lesion, or a few large ones).
2. When the volume holds fewer than ``min_et_voxels`` enhancing-tumour voxels, they become necrotic core: small
   ET predictions are mostly wrong, and a case without ET scores 1 only when none is predicted.

Label consistency (ET inside TC inside WT) holds by construction in a label map. Defaults were tuned on real
BraTS 2018 cases held out from training, never on the case being scored (README, "Whole volumes").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)
NCR, ET = 1, 3


@dataclass(frozen=True)
class CleanUp:
    min_voxels: int = 0
    min_share: float = 0.0
    min_et_voxels: int = 0


#: What ``--clean-up`` applies (see the README for the measurements behind these values).
DEFAULT_CLEAN_UP = CleanUp(min_voxels=0, min_share=0.0, min_et_voxels=0)


def clean_up(labels: np.ndarray, rule: CleanUp = DEFAULT_CLEAN_UP) -> np.ndarray:
    """A cleaned copy of a BraTS label volume."""
    out = labels.copy()
    components, count = ndimage.label(out > 0, _CONNECTED_26)
    if count:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        small = (sizes < rule.min_voxels) | (sizes < rule.min_share * sizes.max())
        small[0] = False
        out[small[components]] = 0
    if np.count_nonzero(out == ET) < rule.min_et_voxels:
        out[out == ET] = NCR
    return out

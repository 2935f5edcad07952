"""The one mapping from the label values of any BraTS release to the 2023 values the artifact stores.

Label 4 meant enhancing tumour up to BraTS 2021 (names like ``Brats18_…``, ``BraTS20_Training_…``,
``BraTS2021_…``). In a 2023-style name (``BraTS-GLI-…``) it is not tumour: BraTS 2024 post-treatment data uses it
for the resection cavity. So 4 becomes 3 only in the older namings, unless the user says what it means.
"""

from __future__ import annotations

import numpy as np

LEGACY_ET = 4
#: What label 4 may be declared to mean: ``auto`` (ET in pre-2023 names, refused in 2023 names), ``et``, ``background``.
LABEL4_CHOICES = ("auto", "et", "background")


def to_brats2023(values: np.ndarray, name: str, legacy_naming: bool, label4: str = "auto") -> np.ndarray | str:
    """Labels as uint8 in {0, 1, 2, 3}, or the reason (naming the file ``name``) they cannot be used.

    The result may share memory with ``values`` when they are already uint8: copy what you keep.
    """
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            return f"{name}: NaN or infinite label values"
        if not (values == np.round(values)).all():
            return f"{name}: non-integer label values"
    high = values.max(initial=0)
    low = values.min(initial=0) if values.dtype.kind != "u" else 0
    if low < 0 or high > LEGACY_ET:
        return f"{name}: label values outside 0..4 (found {low:g}..{high:g})"
    labels = values.astype(np.uint8, copy=False)
    if high == LEGACY_ET:
        meaning = label4 if label4 != "auto" else ("et" if legacy_naming else None)
        if meaning is None:
            return (f"{name}: label 4 in a BraTS 2023-style name is not enhancing tumour (BraTS 2024 uses it for "
                    "the resection cavity); say what it means with --label4 et or --label4 background")
        labels[labels == LEGACY_ET] = 3 if meaning == "et" else 0
    return labels

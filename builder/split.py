"""Train/val/test split by case, so that no patient's slices land in two splits."""

from __future__ import annotations

import numpy as np

from builder.format import SPLITS


def split_cases(case_ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Assign each case to one split at random from ``seed``; the result depends only on the set of ids.

    Val and test each get ``round(fraction * n)`` cases, at least one when the fraction is positive and
    there are at least three cases, so a small demo still has something to validate and test on.
    """
    ids = sorted(case_ids)
    n = len(ids)
    counts = {}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        counts[name] = round(fraction * n)
        if fraction > 0 and n >= 3:
            counts[name] = max(1, counts[name])
    if counts["val"] + counts["test"] >= n:
        raise ValueError(f"{n} cases are too few for val fraction {val_fraction} and test fraction {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    n_val, n_test = counts["val"], counts["test"]
    chosen = {"val": shuffled[:n_val], "test": shuffled[n_val : n_val + n_test], "train": shuffled[n_val + n_test :]}
    return {name: sorted(chosen[name]) for name in SPLITS}


def split_rows(row_case_ids: list[str], case_split: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Sorted row indices of each split, from the split of the cases the rows belong to."""
    split_of = {case: name for name, cases in case_split.items() for case in cases}
    rows: dict[str, list[int]] = {name: [] for name in SPLITS}
    for row, case in enumerate(row_case_ids):
        rows[split_of[case]].append(row)
    return {name: np.asarray(indices, dtype=np.int64) for name, indices in rows.items()}

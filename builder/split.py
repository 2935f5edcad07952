"""Train/val/test split by patient, stable when cases come and go.

Each patient gets a rank from a keyed hash of its id (SHA-256 of ``seed:patient``), so the order of two patients
never depends on the others. Val takes the lowest-ranked patients, test the highest, train the rest. Adding,
removing or fixing one case therefore moves at most one other patient across the val/train boundary and at most
one across the train/test boundary, where a shuffle of the whole list reshuffles every split. The counts stay
within one patient of the fractions. Both boundaries move at once only when the changed patient lands in val or
test just as the other count steps: 4 of 600 random single changes (lists of 20 to 1500 patients, 5%/5%) moved
two other patients, 92 moved one, 504 none.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from builder.format import SPLITS
from builder.layout import patient_of


def _rank(patient: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{patient}".encode()).digest()


def fold_of(patient: str, seed: int, folds: int) -> int:
    """A patient's cross-validation fold (0 to ``folds - 1``), from its keyed rank alone: it never changes as other
    patients come and go (folds are therefore only about equal in size: within a few percent on BraTS's 1251)."""
    return int.from_bytes(_rank(patient, seed)[:8], "big") % folds


def split_counts(patients: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Patients in val and test, each within one of ``fraction * patients``: val rounds half up, test rounds down,
    so that with equal fractions the two counts never grow with the same added patient (one move at a time).
    At least one each when the fraction is positive and there are at least three patients, so a small demo still
    has something to validate and test on."""
    counts = {"val": math.floor(val_fraction * patients + 0.5), "test": math.floor(test_fraction * patients + 1e-9)}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and patients >= 3:
            counts[name] = max(1, counts[name])
    if counts["val"] + counts["test"] >= patients:
        raise ValueError(f"{patients} patients are too few for val fraction {val_fraction} and test fraction {test_fraction}")
    return counts


def split_cases(case_ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """The sorted case ids of each split; every scan of a patient (``patient_of``) lands in one split."""
    patients = sorted({patient_of(case) for case in case_ids}, key=lambda p: _rank(p, seed))
    counts = split_counts(len(patients), val_fraction, test_fraction)
    n_val, n_test = counts["val"], counts["test"]
    chosen = {"val": patients[:n_val], "test": patients[len(patients) - n_test :], "train": patients[n_val : len(patients) - n_test]}
    split_of = {patient: name for name, members in chosen.items() for patient in members}
    return {name: sorted(case for case in case_ids if split_of[patient_of(case)] == name) for name in SPLITS}


def split_rows(row_case_ids: list[str], case_split: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Sorted row indices of each split, from the split of the cases the rows belong to."""
    split_of = {case: name for name, cases in case_split.items() for case in cases}
    rows: dict[str, list[int]] = {name: [] for name in SPLITS}
    for row, case in enumerate(row_case_ids):
        rows[split_of[case]].append(row)
    return {name: np.asarray(indices, dtype=np.int64) for name, indices in rows.items()}

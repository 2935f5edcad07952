"""Means over patients with 95% bootstrap intervals, and paired differences between approaches."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from builder.layout import patient_of

BOOTSTRAP_SAMPLES = 2000


def bootstrap_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (one per patient or case)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_patient(case_ids: Sequence[str], values: Sequence[float]) -> np.ndarray:
    """One value per patient (the mean over its scans), in sorted patient order: the unit to resample."""
    groups: dict[str, list[float]] = defaultdict(list)
    for case, value in zip(case_ids, values):
        groups[patient_of(case)].append(float(value))
    return np.array([np.mean(groups[p]) for p in sorted(groups)])


def summarise(case_ids: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """Mean over patients and its 95% bootstrap interval."""
    patients = per_patient(case_ids, values)
    low, high = bootstrap_interval(patients)
    return {"mean": float(patients.mean()) if patients.size else float("nan"), "ci_low": low, "ci_high": high,
            "patients": int(patients.size)}


def paired_difference(case_ids: Sequence[str], values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Mean of ``values - reference`` over the same patients, with its 95% paired-bootstrap interval."""
    differences = per_patient(case_ids, np.asarray(values, float) - np.asarray(reference, float))
    low, high = bootstrap_interval(differences)
    return {"mean": float(differences.mean()) if differences.size else float("nan"), "ci_low": low, "ci_high": high}

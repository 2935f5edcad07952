"""Means over patients with 95% bootstrap intervals (scipy's BCa), and paired differences between approaches.

The unit resampled is the patient (a patient's scans averaged first). Below ``MIN_PATIENTS`` patients no interval
is given: resampling three values says nothing about a population, and a printed interval would pretend it does.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy import stats

from builder.layout import patient_of

BOOTSTRAP_SAMPLES = 2000
#: The fewest patients an interval is computed for.
MIN_PATIENTS = 5
NO_INTERVAL = f"no interval: fewer than {MIN_PATIENTS} patients"
INTERVAL = "95% BCa bootstrap over patients"


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float | None, float | None]:
    """95% BCa bootstrap interval of the mean of ``values`` (one per patient), or (None, None) below MIN_PATIENTS."""
    values = np.asarray(values, dtype=float)
    if values.size < MIN_PATIENTS:
        return None, None
    if np.all(values == values[0]):  # BCa is undefined without spread; the interval is the point
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when resamples repeat themselves on tiny samples
        result = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_SAMPLES,
                                 method="BCa", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        low, high = np.percentile(values, [2.5, 97.5])  # BCa degenerate (e.g. one outlier): the plain range
    return float(low), float(high)


def per_patient(case_ids: Sequence[str], values: Sequence[float]) -> np.ndarray:
    """One value per patient (the mean over its scans), in sorted patient order: the unit to resample."""
    groups: dict[str, list[float]] = defaultdict(list)
    for case, value in zip(case_ids, values):
        groups[patient_of(case)].append(float(value))
    return np.array([np.mean(groups[p]) for p in sorted(groups)])


def summarise(case_ids: Sequence[str], values: Sequence[float]) -> dict[str, object]:
    """Mean over patients, its 95% BCa bootstrap interval (None below MIN_PATIENTS) and what the interval is."""
    patients = per_patient(case_ids, values)
    low, high = bootstrap_interval(patients)
    return {"mean": float(patients.mean()) if patients.size else None, "ci_low": low, "ci_high": high,
            "patients": int(patients.size), "interval": INTERVAL if low is not None else NO_INTERVAL}


def paired_difference(case_ids: Sequence[str], values: Sequence[float], reference: Sequence[float]
                      ) -> dict[str, object]:
    """Mean of ``values - reference`` over the same patients, with its 95% paired BCa bootstrap interval (the
    patients' differences resampled together)."""
    differences = per_patient(case_ids, np.asarray(values, float) - np.asarray(reference, float))
    low, high = bootstrap_interval(differences)
    return {"mean": float(differences.mean()) if differences.size else None, "ci_low": low, "ci_high": high,
            "interval": ("95% paired BCa bootstrap over patients" if low is not None else NO_INTERVAL)}

"""Clean-up of a predicted label volume, as BraTS pipelines do after a network (nnU-Net and most challenge entries),
and its choice on validation patients.

A model that sees one slice at a time paints specks and stray blobs away from the tumour; the 2023 lesion-wise
scores count every one as a false lesion (Dice 0, HD95 374). So, region by region from the outside in, on
26-connected components:

1. whole tumour: components smaller than its ``min_voxels``, or than ``min_share`` of the largest one, become
   background;
2. tumour core: such components become oedema (they stay in the whole tumour);
3. enhancing tumour: such components become necrosis (they stay in the core); and when fewer than
   ``min_et_voxels`` ET voxels remain, all of them do (a case without ET scores 1 only when none is predicted).

Each step moves voxels to the next region out, so ET stays inside TC inside WT.

Which rule suits a model is measured, not guessed: ``CleanUpTrial`` scores every rule of ``FAMILY`` on validation
(or out-of-fold) patients, keeps the best by mean lesion-wise Dice, and ``save_choice`` stores it in the run, where
``evaluate`` and ``predict`` find it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from trainer.outputs import write_json

_CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)
#: (region's labels, the label its dropped components get): outside in, so each step keeps the nesting.
_STEPS = (((1, 2, 3), 0), ((1, 3), 2), ((3,), 1))
#: Where a run keeps the clean-up chosen for it.
CHOICE_FILE = "clean_up.json"


@dataclass(frozen=True)
class CleanUp:
    """A clean-up rule: per-region minimum component sizes (WT, TC, ET voxels), a minimum share of the region's
    largest component, and a minimum count of ET voxels below which all ET becomes necrosis."""

    min_voxels: tuple[int, int, int] = (0, 0, 0)
    min_share: float = 0.0
    min_et_voxels: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleanUp:
        sizes = values.get("min_voxels", 0)
        sizes = (sizes,) * 3 if isinstance(sizes, (int, float)) else sizes
        return cls(tuple(int(v) for v in sizes), float(values.get("min_share", 0.0)),  # type: ignore[arg-type]
                   int(values.get("min_et_voxels", 0)))

    def describe(self) -> str:
        parts = []
        if any(self.min_voxels):
            parts.append("components under {} / {} / {} voxels (WT / TC / ET) dropped".format(*self.min_voxels))
        if self.min_share:
            parts.append(f"components under {self.min_share:.0%} of the region's largest dropped")
        if self.min_et_voxels:
            parts.append(f"ET relabelled necrosis when under {self.min_et_voxels} voxels")
        return "; ".join(parts) or "nothing removed"


#: What ``--clean-up`` applies to a run without a chosen rule: chosen on real held-out cases (README, "Whole
#: volumes"; benchmarks/real_cases.py).
DEFAULT_CLEAN_UP = CleanUp(min_share=0.3)

#: The rules ``--choose-clean-up`` tries, simplest first (ties go to the earlier): no clean-up; dropping components
#: under a share of the region's largest (10%, 30%, 50%); the BraTS 2023 glioma winner's absolute sizes (WT 250,
#: TC 150, ET 100 voxels) and twice those; each alone and with nnU-Net's BraTS rule of relabelling all ET as necrosis
#: when a volume holds fewer than 100, 300 or 750 ET voxels.
FAMILY: tuple[CleanUp, ...] = tuple(
    CleanUp(sizes, share, et)
    for et in (0, 100, 300, 750)
    for sizes, share in (((0, 0, 0), 0.0), ((0, 0, 0), 0.1), ((0, 0, 0), 0.3), ((0, 0, 0), 0.5),
                         ((250, 150, 100), 0.0), ((500, 300, 200), 0.0))
)


def _small_components(mask: np.ndarray, min_voxels: int, min_share: float) -> np.ndarray:
    components, count = ndimage.label(mask, _CONNECTED_26)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    small = (sizes < min_voxels) | (sizes < min_share * sizes.max())
    small[0] = False
    return small[components]


def drop_small(labels: np.ndarray, min_voxels: tuple[int, int, int], min_share: float) -> np.ndarray:
    """Steps 1-3 without the ET count: small components of WT, TC and ET moved to the next region out (a copy)."""
    out = labels.copy()
    tumour = np.flatnonzero(out.reshape(-1))
    if tumour.size == 0 or not (any(min_voxels) or min_share):
        return out
    box = ndimage.find_objects((out > 0).astype(np.uint8))[0]  # the work happens where the tumour is
    inside = out[box]  # a view: changed in place
    for (values, fallback), smallest in zip(_STEPS, min_voxels):
        inside[_small_components(np.isin(inside, values), smallest, min_share)] = fallback
    return out


def et_to_necrosis(labels: np.ndarray, min_et_voxels: int) -> np.ndarray:
    """All ET relabelled necrosis when fewer than ``min_et_voxels`` ET voxels are left (in place; returned)."""
    et = labels == 3
    if np.count_nonzero(et) < min_et_voxels:
        labels[et] = 1
    return labels


def clean_up(labels: np.ndarray, rule: CleanUp = DEFAULT_CLEAN_UP) -> np.ndarray:
    """A cleaned copy of a BraTS label volume (labels 0-3)."""
    return et_to_necrosis(drop_small(labels, rule.min_voxels, rule.min_share), rule.min_et_voxels)


@dataclass
class CleanUpTrial:
    """Scores every rule of ``rules`` on patients one at a time (their raw labels are not kept), then names the best
    by mean lesion-wise Dice over patients and regions. Rules that leave a volume alike share one scoring."""

    regions: Sequence[str]
    rules: Sequence[CleanUp] = FAMILY
    scores: dict[str, list[float]] = field(default_factory=dict)  # case -> mean lesion-wise Dice per rule

    def add(self, case_id: str, labels: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> None:
        from trainer.scoring.brats import lesion_wise, region_mask

        dropped: dict[tuple, np.ndarray] = {}  # the size rules are few: each applied once, the ET counts after
        seen: dict[bytes, float] = {}
        row = []
        for rule in self.rules:
            sizes = (rule.min_voxels, rule.min_share)
            if sizes not in dropped:
                dropped[sizes] = drop_small(labels, *sizes)
            cleaned = et_to_necrosis(dropped[sizes].copy(), rule.min_et_voxels)
            key = hashlib.blake2b(cleaned.tobytes(), digest_size=16).digest()
            if key not in seen:
                seen[key] = float(np.mean([lesion_wise(region_mask(cleaned, r), region_mask(truth, r), spacing,
                                                       distances=False)["lesion_dice"] for r in self.regions]))
            row.append(seen[key])
        self.scores[case_id] = row

    def table(self) -> list[dict[str, Any]]:
        """Every rule with its mean lesion-wise Dice over the patients scored (patients' time points averaged)."""
        from trainer.scoring.statistics import per_patient

        ids = list(self.scores)
        means = [float(per_patient(ids, [self.scores[c][i] for c in ids]).mean()) for i in range(len(self.rules))]
        return [{"rule": asdict(rule), "description": rule.describe(), "lesion_dice_mean": mean}
                for rule, mean in zip(self.rules, means)]

    def best(self) -> tuple[CleanUp, float]:
        table = self.table()
        index = max(range(len(table)), key=lambda i: (table[i]["lesion_dice_mean"], -i))
        return self.rules[index], table[index]["lesion_dice_mean"]


def save_choice(run_dir: Path, trial: CleanUpTrial, chosen_on: str, **about: Any) -> CleanUp:
    """Store the best rule of ``trial`` in ``run_dir`` (with every rule's score and what it was chosen on)."""
    rule, score = trial.best()
    write_json(run_dir / CHOICE_FILE, {"rule": asdict(rule), "description": rule.describe(), "chosen_on": chosen_on,
                                       "patients": len(trial.scores), "lesion_dice_mean": score, **about,
                                       "candidates": trial.table()})
    return rule


def load_choice(run_dir: Path) -> tuple[CleanUp, str] | None:
    """The rule chosen for ``run_dir`` and a line saying so, or None when none was chosen."""
    path = run_dir / CHOICE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        rule = CleanUp.from_dict(record["rule"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a clean-up choice brats2d wrote; delete it, or choose again with "
                         "`brats-train evaluate RUN --volumes DIR --split val --choose-clean-up`") from None
    return rule, f"the clean-up chosen for {run_dir.name} on {record.get('chosen_on', 'validation patients')}: {rule.describe()}"


def rule_for(clean: bool, run_dir: Path | None = None) -> tuple[CleanUp | None, str]:
    """The clean-up a whole-volume command applies and a line saying which: none with ``--no-clean-up``, else the
    rule chosen for ``run_dir`` (``save_choice``) if there is one, else ``DEFAULT_CLEAN_UP``. The one place where the
    ``--clean-up`` flag becomes a rule."""
    if not clean:
        return None, "no clean-up (--no-clean-up)"
    chosen = load_choice(run_dir) if run_dir is not None else None
    return chosen or (DEFAULT_CLEAN_UP, f"the default clean-up: {DEFAULT_CLEAN_UP.describe()}")

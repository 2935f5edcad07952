"""Clean-up of a predicted label volume, as BraTS pipelines do after a network (nnU-Net and most challenge entries),
and its choice on validation patients.

A model that sees one slice at a time paints specks and stray blobs away from the tumour; the 2023 lesion-wise
scores count every one as a false lesion (Dice 0, HD95 374). So, region by region from the outside in, on
26-connected components:

1. whole tumour: components that its ``RegionRule`` drops (too small, too small a share of the largest, or too
   uncertain: the region's probability over the component too low) become background;
2. tumour core: such components become oedema (they stay in the whole tumour);
3. enhancing tumour: such components become necrosis (they stay in the core); and when fewer than
   ``min_et_voxels`` ET voxels remain, all of them do (a case without ET scores 1 only when none is predicted).

Each step moves voxels to the next region out, so ET stays inside TC inside WT.

Which rule suits a model is measured, not guessed: ``CleanUpTrial`` scores every rule of ``REGION_FAMILY`` for
each region on validation (or out-of-fold) patients, keeps the best of each by mean lesion-wise Dice, and
``save_choice`` stores the result in the run, where ``evaluate`` and ``predict`` find it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from trainer.outputs import write_json

_CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)
#: (region, its labels, the label its dropped components get): outside in, so each step keeps the nesting.
_STEPS = (("WT", (1, 2, 3), 0), ("TC", (1, 3), 2), ("ET", (3,), 1))
#: Where a run keeps the clean-up chosen for it.
CHOICE_FILE = "clean_up.json"
#: How a component's confidence is taken from its region's probability over its voxels.
STATISTICS = ("max", "mean")


@dataclass(frozen=True)
class RegionRule:
    """Which components of one region stay: those of at least ``min_voxels`` voxels, at least ``min_share`` of the
    region's largest component, and a confidence (the ``statistic`` of the region's probability over the
    component's voxels) of at least ``min_confidence``. Confidence tells a small true satellite, which the network
    draws with certainty, from a speck of the same size that it half believes."""

    min_voxels: int = 0
    min_share: float = 0.0
    min_confidence: float = 0.0
    statistic: str = "max"

    @property
    def removes(self) -> bool:
        return bool(self.min_voxels or self.min_share or self.min_confidence)

    def keeps(self, components: Components) -> np.ndarray:
        """Which of ``components`` this rule keeps (one boolean each)."""
        sizes = components.sizes
        kept = (sizes >= self.min_voxels) & (sizes >= self.min_share * (sizes.max() if sizes.size else 0))
        if self.min_confidence:
            kept &= components.confidence(self.statistic) >= self.min_confidence
        return kept

    def describe(self) -> str:
        parts = [f"under {self.min_voxels} voxels" if self.min_voxels else "",
                 f"under {self.min_share:.0%} of the largest" if self.min_share else "",
                 f"{self.statistic} probability under {self.min_confidence:g}" if self.min_confidence else ""]
        return " or ".join(p for p in parts if p)


@dataclass(frozen=True)
class CleanUp:
    """A clean-up rule: one ``RegionRule`` per region (WT, TC, ET) and a minimum count of ET voxels below which
    all ET becomes necrosis."""

    regions: tuple[RegionRule, RegionRule, RegionRule] = (RegionRule(), RegionRule(), RegionRule())
    min_et_voxels: int = 0

    @classmethod
    def uniform(cls, min_voxels: tuple[int, int, int] = (0, 0, 0), min_share: float = 0.0,
                min_et_voxels: int = 0) -> CleanUp:
        """The rules of earlier releases: sizes per region, one share for all regions, no confidence."""
        return cls(tuple(RegionRule(int(v), float(min_share)) for v in min_voxels), int(min_et_voxels))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleanUp:
        """A rule as ``asdict`` wrote it, or as clean_up.json files of 0.3 and earlier hold it."""
        if "regions" not in values:
            sizes = values.get("min_voxels", 0)
            sizes = (sizes,) * 3 if isinstance(sizes, (int, float)) else sizes
            return cls.uniform(tuple(sizes), values.get("min_share", 0.0), values.get("min_et_voxels", 0))
        regions = tuple(RegionRule(int(r["min_voxels"]), float(r["min_share"]), float(r["min_confidence"]),
                                   str(r["statistic"])) for r in values["regions"])
        if len(regions) != 3 or any(r.statistic not in STATISTICS for r in regions):
            raise ValueError("a clean-up rule holds three region rules with a statistic of " + ", ".join(STATISTICS))
        return cls(regions, int(values.get("min_et_voxels", 0)))  # type: ignore[arg-type]

    @property
    def needs_confidence(self) -> bool:
        return any(r.min_confidence for r in self.regions)

    def describe(self) -> str:
        parts = [f"{name} components {rule.describe()} dropped" for (name, _, _), rule in zip(_STEPS, self.regions)
                 if rule.removes]
        if self.min_et_voxels:
            parts.append(f"ET relabelled necrosis when under {self.min_et_voxels} voxels")
        return "; ".join(parts) or "nothing removed"


@dataclass(frozen=True)
class Components:
    """The 26-connected components of one region's mask with what rules weigh them by."""

    labels: np.ndarray  # 1..n, 0 outside the mask
    sizes: np.ndarray  # (n,) voxels
    probability: np.ndarray | None  # the region's probability (0-1, or 0-255 as uint8), same shape as labels
    measured: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)  # statistic -> values

    @classmethod
    def of(cls, mask: np.ndarray, probability: np.ndarray | None = None) -> Components:
        labels, count = ndimage.label(mask, _CONNECTED_26)
        return cls(labels, np.bincount(labels.ravel(), minlength=count + 1)[1:], probability)

    def confidence(self, statistic: str) -> np.ndarray:
        """Each component's ``statistic`` of the region's probability (0-1)."""
        if self.probability is None:
            raise ValueError("this clean-up weighs components by their probability: pass the region probabilities")
        if statistic not in self.measured:  # a trial asks for each statistic hundreds of times
            index = np.arange(1, len(self.sizes) + 1)
            measure = ndimage.maximum if statistic == "max" else ndimage.mean
            values = np.asarray(measure(self.probability, self.labels, index), dtype=np.float64).reshape(-1)
            self.measured[statistic] = values / 255 if self.probability.dtype == np.uint8 else values
        return self.measured[statistic]


#: What ``--clean-up`` applies to a run without a chosen rule: chosen on real held-out cases (README, "Whole
#: volumes"; benchmarks/budget.py).
DEFAULT_CLEAN_UP = CleanUp.uniform(min_share=0.3)

#: The rules ``--choose-clean-up`` tries for each region, simplest first (ties go to the earlier): any of no
#: minimum size, 50 to 1000 voxels (the BraTS 2023 glioma winner used WT 250, TC 150, ET 100); no minimum share,
#: 10%, 30% or 50% of the region's largest component; and no minimum confidence, a maximum probability of 0.7 to
#: 0.95 or a mean probability of 0.6 to 0.8.
REGION_FAMILY: tuple[RegionRule, ...] = tuple(sorted(
    (RegionRule(size, share, confidence, statistic)
     for size in (0, 50, 100, 250, 500, 1000) for share in (0.0, 0.1, 0.3, 0.5)
     for statistic, confidence in (("max", 0.0), ("max", 0.7), ("max", 0.8), ("max", 0.9), ("max", 0.95),
                                   ("mean", 0.6), ("mean", 0.7), ("mean", 0.8))),
    key=lambda r: (bool(r.min_voxels) + bool(r.min_share) + bool(r.min_confidence), r.min_confidence > 0,
                   r.statistic != "max", r.min_voxels, r.min_share, r.min_confidence)))
#: nnU-Net's BraTS rule, tried with every ET rule: all ET relabelled necrosis below 100, 300 or 750 ET voxels.
ET_COUNTS = (0, 100, 300, 750)


def _region_probability(confidence: np.ndarray | None, region: int, box: tuple[slice, ...]) -> np.ndarray | None:
    """One region's probability inside ``box`` (None without probabilities, or for a region a task lacks)."""
    return None if confidence is None or region >= len(confidence) else confidence[region][box]


def clean_up(labels: np.ndarray, rule: CleanUp = DEFAULT_CLEAN_UP, confidence: np.ndarray | None = None
             ) -> np.ndarray:
    """A cleaned copy of a BraTS label volume (labels 0-3): region by region from the outside in, the components
    ``rule`` drops move to the next region out; then the ET count. ``confidence``: the (regions, ...) region
    probabilities (``trainer.tasks.region_probabilities``; uint8 means 0-255), needed by rules that weigh them."""
    if rule.needs_confidence and confidence is None:
        raise ValueError(f"the clean-up '{rule.describe()}' weighs components by their probability: pass the region "
                         "probabilities")
    out = labels.copy()
    if np.any(out) and any(r.removes for r in rule.regions):
        box = ndimage.find_objects((out > 0).astype(np.uint8))[0]  # the work happens where the tumour is
        inside = out[box]  # a view: changed in place
        for index, ((_, values, fallback), region_rule) in enumerate(zip(_STEPS, rule.regions)):
            if region_rule.removes:
                found = Components.of(np.isin(inside, values), _region_probability(confidence, index, box))
                dropped = np.concatenate([[False], ~region_rule.keeps(found)])
                inside[dropped[found.labels]] = fallback
    et = out == 3
    if np.count_nonzero(et) < rule.min_et_voxels:
        out[et] = 1
    return out


@dataclass
class CleanUpTrial:
    """Scores every rule of ``REGION_FAMILY`` on patients one at a time (their volumes are not kept), region by
    region, then names the best rule of each region by its mean lesion-wise Dice over patients.

    Each region's rules are scored on the network's own components of that region (``LesionOverlap``: one
    labelling per region and patient, every rule by arithmetic), and the chosen ones are applied outside in. The
    regions are chosen apart: a WT rule that removes a whole component also removes the TC and ET inside it, which
    the scores of TC's and ET's rules do not see (their own rules mostly remove the same specks)."""

    regions: Sequence[str]
    rules: Sequence[RegionRule] = REGION_FAMILY
    et_counts: Sequence[int] = ET_COUNTS
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # case -> region -> Dice per candidate

    def candidates(self, region: str) -> list[tuple[RegionRule, int]]:
        """Region rules with the ET counts they are tried with (only ET's rules take a count)."""
        return [(rule, count) for rule in self.rules for count in (self.et_counts if region == "ET" else (0,))]

    def add(self, case_id: str, labels: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
            confidence: np.ndarray) -> None:
        """Score every candidate on one patient: raw ``labels``, its ``truth``, and the region probabilities
        (``confidence``, as ``clean_up`` takes them)."""
        from trainer.scoring.brats import LesionOverlap, region_mask

        row = {}
        for region in self.regions:
            index = [name for name, _, _ in _STEPS].index(region)
            overlap = LesionOverlap.of(region_mask(labels, region), region_mask(truth, region), spacing)
            found = Components(overlap.components, overlap.sizes, _region_probability(confidence, index, overlap.box))
            seen: dict[bytes, float] = {}
            scores = []
            for rule, count in self.candidates(region):
                kept = rule.keeps(found)
                if overlap.sizes[kept].sum() < count:
                    kept = np.zeros_like(kept)
                key = kept.tobytes()
                if key not in seen:
                    seen[key] = overlap.score(kept)["lesion_dice"]
                scores.append(seen[key])
            row[region] = scores
        self.scores[case_id] = row

    def table(self, region: str) -> list[dict[str, Any]]:
        """Every candidate of ``region`` with its mean lesion-wise Dice over the patients scored (a patient's time
        points averaged)."""
        from trainer.scoring.statistics import per_patient

        ids = list(self.scores)
        return [{"rule": asdict(rule), **({"min_et_voxels": count} if region == "ET" else {}),
                 "lesion_dice_mean": float(per_patient(ids, [self.scores[c][region][i] for c in ids]).mean())}
                for i, (rule, count) in enumerate(self.candidates(region))]

    def ranking(self, top: int = 10) -> dict[str, list[dict[str, Any]]]:
        """Each region's ``top`` candidates by score, and the first (nothing removed) for comparison."""
        out = {}
        for region in self.regions:
            table = self.table(region)
            order = sorted(range(len(table)), key=lambda i: (-table[i]["lesion_dice_mean"], i))[:top]
            out[region] = [table[i] for i in ([0] if 0 not in order else []) + order]
        return out

    def best(self) -> tuple[CleanUp, float]:
        """The rule of the best candidate of each region (the earlier on ties), and their mean lesion-wise Dice."""
        chosen, means = {}, []
        for region in self.regions:
            table = self.table(region)
            index = max(range(len(table)), key=lambda i: (table[i]["lesion_dice_mean"], -i))
            chosen[region] = self.candidates(region)[index]
            means.append(table[index]["lesion_dice_mean"])
        rules = tuple(chosen.get(name, (RegionRule(), 0))[0] for name, _, _ in _STEPS)
        return CleanUp(rules, chosen.get("ET", (RegionRule(), 0))[1]), float(np.mean(means))  # type: ignore[arg-type]


def save_choice(run_dir: Path, trial: CleanUpTrial, chosen_on: str, **about: Any) -> CleanUp:
    """Store the best rule of ``trial`` in ``run_dir`` (with every rule's score and what it was chosen on)."""
    rule, score = trial.best()
    write_json(run_dir / CHOICE_FILE, {"rule": asdict(rule), "description": rule.describe(), "chosen_on": chosen_on,
                                       "patients": len(trial.scores), "lesion_dice_mean": score, **about,
                                       "candidates": trial.ranking()})
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

"""Whether uncertainty points at the errors, on real patients: the Dice of the voxels above and below the median
uncertainty (trainer.scoring.uncertainty) of the held-out patients that benchmarks/budget.py predicted, from its
cache (region probabilities stored with every prediction; the clean-up is left out: these are the raw masks).

    python benchmarks/uncertainty.py [--rows planes@30min,axial@500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budget import CACHE, FOLDS, REAL, REGIONS, Fold, Row, cached, truths  # noqa: E402

from builder.layout import find_cases  # noqa: E402
from trainer.scoring.uncertainty import dice_by_uncertainty  # noqa: E402
from trainer.tasks import uncertainty  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="planes@30min,axial@30min,axial@500")
    args = parser.parse_args()
    patients = sorted(c.case_id for c in find_cases(REAL))
    folds = [Fold.of(CACHE, patients, index) for index in range(FOLDS)]
    truth = truths(REAL, patients)
    print("| row | held-out patients | " + " | ".join(f"{r} Dice, uncertain / certain half" for r in REGIONS)
          + " |\n|---|---|" + "---|" * len(REGIONS))
    for text in args.rows.split(","):
        scores: list[dict[str, float]] = []
        for _, patient, saved in cached(folds, Row.parse(text)):
            if saved["held_out"]:
                entropy = uncertainty(saved["regions"].astype(np.float32) / 255, "regions")
                scores.append(dice_by_uncertainty(saved["labels"], truth[patient][0], entropy))
        if scores:
            cells = [f"{np.mean([s[f'dice_{r}_uncertain'] for s in scores]):.3f} / "
                     f"{np.mean([s[f'dice_{r}_certain'] for s in scores]):.3f}" for r in REGIONS]
            print(f"| {text} | {len(scores)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

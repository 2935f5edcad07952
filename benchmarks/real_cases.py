"""Whole-volume scores on the real BraTS 2018 cases in ../shared/real-brats18, leave one patient out in turn.

For each of the six patients: build an artifact from the other five (every tumour slice; with and without
background slices), train early fusion under a small CPU budget with `brats-train fit`'s own function, segment
the held-out patient's whole volume, and score it (BraTS 2023 lesion-wise and legacy scores). Then choose the
clean-up for each held-out patient on the *other* folds' predictions only (never on the case being scored).

    python benchmarks/real_cases.py [--steps 240] [--folds 6] [--background 0,8]

Prints the tables the README quotes; writes benchmarks/.cache/real_cases/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from builder.layout import find_cases  # noqa: E402
from trainer.cleanup import CleanUp, clean_up  # noqa: E402
from trainer.model import load_model  # noqa: E402
from trainer.scoring import score_case  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.train import fit  # noqa: E402
from trainer.volumes import Geometry, read_case, segment_case  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"
CACHE = Path(__file__).resolve().parent / ".cache" / "real_cases"
GRID = [CleanUp(v, s, e) for v, s, e in itertools.product((0, 1000), (0.0, 0.1, 0.3), (0, 500))]
HEADLINE = ("lesion_dice_WT", "lesion_dice_TC", "lesion_dice_ET", "dice_WT", "dice_TC", "dice_ET",
            "lesion_fp_WT", "lesion_fp_TC", "lesion_fp_ET", "lesion_hd95_WT")


def fold(held_out: str, cases: list, background: int, steps: int, work: Path) -> dict:
    """Train on the other patients, predict the held-out one; its raw labels and scores without clean-up."""
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if case.case_id != held_out and not (source / case.case_id).exists():
            os.symlink(case.files["seg"].parent, source / case.case_id)
    data = work / "data.h5"
    if not data.exists():
        build(source, data, BuildOptions(jobs=2, val_fraction=0.2, test_fraction=0, progress=False,
                                         rule=SliceRule(per_case=None, background=background)))
    run = work / "run"
    if not (run / "best.pt").exists():
        config = FitConfig(data=str(data), modality="all", encoder="resnet18", encoder_weights=None, batch_size=16,
                           crop=128, epochs=1000, max_steps=steps, patience=1000, workers=1, device="cpu")
        fit(config, run_dir=run)
    model, saved = load_model(run / "best.pt")
    config = FitConfig.from_dict({**saved, "device": "cpu"})
    (case,) = [c for c in cases if c.case_id == held_out]
    volumes = read_case(case, config.channels, Geometry.of(config))
    labels, result = segment_case(model, config, volumes, torch.device("cpu"), rule=None, progress=False)
    tumour_free = ~volumes.truth.any(axis=(0, 1))
    predicted = np.count_nonzero(labels, axis=(0, 1))
    np.save(work / "labels.npy", labels)
    return {"case_id": held_out, "off_tumour_share": float(predicted[tumour_free].sum() / max(predicted.sum(), 1)),
            "slices_per_second": result.slices_per_second, **score_case(labels, volumes.truth, volumes.spacing)}


def tuned(folds: list[dict], cases: list, work: Path) -> tuple[list[dict], CleanUp]:
    """Each fold scored with the clean-up that is best on the other folds; and the best rule over all folds."""
    truths = {}
    for case in cases:
        volumes = read_case(case, ("t1n",), Geometry())
        truths[case.case_id] = (volumes.truth, volumes.spacing)
    table = {}  # (rule index, case) -> mean lesion-wise Dice over regions
    scored = {}
    for i, rule in enumerate(GRID):
        for f in folds:
            labels = np.load(work / f["case_id"] / "labels.npy")
            truth, spacing = truths[f["case_id"]]
            scored[i, f["case_id"]] = score_case(clean_up(labels, rule), truth, spacing)
            table[i, f["case_id"]] = np.mean([scored[i, f["case_id"]][f"lesion_dice_{r}"] for r in ("WT", "TC", "ET")])
    ids = [f["case_id"] for f in folds]
    out = []
    for case_id in ids:
        others = [c for c in ids if c != case_id]
        best = max(range(len(GRID)), key=lambda i: np.mean([table[i, c] for c in others]))
        out.append({"case_id": case_id, "rule": asdict(GRID[best]), **scored[best, case_id]})
    overall = max(range(len(GRID)), key=lambda i: np.mean([table[i, c] for c in ids]))
    return out, GRID[overall]


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| case | " + " | ".join(HEADLINE) + " |")
    print("|---|" + "---|" * len(HEADLINE))
    for row in rows:
        print(f"| {row['case_id']} | " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                                                 for k in HEADLINE) + " |")
    print("| mean | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k in HEADLINE) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--background", default="0,8", help="background slices per case to compare")
    args = parser.parse_args()
    if not REAL.is_dir():
        sys.exit(f"{REAL}: the real cases are not here (they sit beside the repository in shared/)")
    torch.set_num_threads(2)
    cases = find_cases(REAL)
    held_out = [c.case_id for c in cases][: args.folds]
    results = {}
    for background in (int(k) for k in args.background.split(",")):
        folds = [fold(case_id, cases, background, args.steps, CACHE / f"bg{background}" / case_id) for case_id in held_out]
        show(f"background slices {background}: raw predictions (no clean-up); tumour share off tumour slices "
             f"{np.mean([f['off_tumour_share'] for f in folds]):.3f}", folds)
        cleaned, overall = tuned(folds, [c for c in cases if c.case_id in held_out], CACHE / f"bg{background}")
        show(f"background slices {background}: clean-up chosen on the other folds; best over all folds {overall}", cleaned)
        results[background] = {"raw": folds, "cleaned": cleaned, "best_rule": asdict(overall)}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "results.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()

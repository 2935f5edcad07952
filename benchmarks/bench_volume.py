"""Whole-volume prediction, recipe by recipe, against the one-model pass of the previous release, and against its
scoring, side by side in one run, with the functions users run (`trainer.inference.ensemble.Segmenter`, which calls
`trainer.inference.slices.network_probabilities`, and `trainer.inference.cases.score`).

Prints seconds per volume for: whole slices (the previous release's pass: every brain slice at 256x256), the brain's
bounding box (today's default), + context 1, + test-time mirroring, three planes, three planes + mirroring; each as a
ratio to the previous release's pass (target for the recommended recipe on a CPU: at most 3x), and scoring / one
pass (target: below 2). Uses the real BraTS 2018 cases beside the repository when there, else synthetic ones, and
untrained Unet/resnet18 early-fusion models (the cost of a pass does not depend on the weights; an untrained model
paints hundreds of false lesions: the slowest case for scoring).

    python benchmarks/bench_volume.py [--cases 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.layout import find_cases  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.inference.cases import score  # noqa: E402
from trainer.inference.ensemble import Member, Segmenter  # noqa: E402
from trainer.training.model import build_model  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"


def member(plane_axis: int, context: int, device: torch.device) -> Member:
    config = FitConfig(data="", modality="all", encoder="resnet18", encoder_weights=None, device=str(device),
                       slice_axis=plane_axis, context=context, plane=("sagittal", "coronal", "axial")[plane_axis])
    torch.manual_seed(0)
    model = build_model(config.arch, config.encoder, None, config.in_channels, config.classes).to(device).eval()
    return Member(Path(config.plane), model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if REAL.is_dir():
        source = REAL
    else:
        from common import synthetic_cases

        source = synthetic_cases(args.cases)
    cases = find_cases(source)[: args.cases]
    axial, axial_context = member(2, 0, device), member(2, 1, device)
    planes = [axial, member(1, 0, device), member(0, 0, device)]
    recipes = {
        "whole slices, one model (previous release)": Segmenter.of([axial], device),
        "brain box, one model (default)": Segmenter.of([axial], device),
        "brain box, context 1": Segmenter.of([axial_context], device),
        "brain box, test-time mirroring (4 passes)": Segmenter.of([axial], device, tta=True),
        "three planes": Segmenter.of(planes, device),
        "three planes, test-time mirroring": Segmenter.of(planes, device, tta=True),
    }
    recipes["whole slices, one model (previous release)"].brain_box = False
    print(f"{len(cases)} cases from {source}, untrained Unet/resnet18 early fusion, {device} "
          f"({torch.get_num_threads()} threads)")
    seconds: dict[str, list[float]] = {name: [] for name in recipes}
    scoring = []
    for case in cases:
        volumes = recipes["brain box, one model (default)"].read(case)
        for name, segmenter in recipes.items():
            started = time.perf_counter()
            labels = segmenter.segment(volumes, progress=False).labels
            seconds[name].append(time.perf_counter() - started)
            if name.startswith("whole"):
                scoring.append(score(labels, volumes, "multiclass")["score_seconds"])
        print(f"{case.case_id}: " + ", ".join(f"{name.split(' (')[0]} {s[-1]:.1f} s" for name, s in seconds.items()))
    reference = np.median(seconds["whole slices, one model (previous release)"])
    print("\n| recipe | seconds per volume | vs the previous release's pass |\n|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {np.median(values):.1f} | {np.median(values) / reference:.2f}x |")
    print(f"\nscoring / one pass (whole slices): {np.median(scoring) / reference:.2f} (target < 2)")


if __name__ == "__main__":
    main()

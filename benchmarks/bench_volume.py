"""Whole-volume prediction against its scoring, side by side in one run, with the functions users run.

Segments each case with `trainer.volumes.segment_case` (brain slices only) and scores it with
`trainer.volumes.score` (BraTS 2023 lesion-wise and legacy scores, three regions), and prints slices/s and the
ratio scoring / prediction (target: below 2). Uses the real BraTS 2018 cases beside the repository when there,
else synthetic ones, and a run folder's best.pt when given (an untrained model paints hundreds of false
lesions: the slowest case for scoring).

    python benchmarks/bench_volume.py [--run RUN_DIR] [--cases 3]
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
from trainer.cleanup import DEFAULT_CLEAN_UP  # noqa: E402
from trainer.model import build_model, load_model  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.volumes import Geometry, read_case, score, segment_case  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run folder (default: an untrained Unet/resnet34)")
    parser.add_argument("--cases", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.run:
        model, saved = load_model(args.run / "best.pt", device)
        config = FitConfig.from_dict({**saved, "device": str(device)})
    else:
        config = FitConfig(data="", modality="all", encoder_weights=None, device=str(device))
        model = build_model(config.arch, config.encoder, None, len(config.channels), config.classes).to(device).eval()
    if REAL.is_dir():
        source = REAL
    else:
        from common import synthetic_cases

        source = synthetic_cases(args.cases)
    cases = find_cases(source)[: args.cases]
    print(f"{len(cases)} cases from {source}, {config.arch}/{config.encoder} "
          f"({'trained: ' + str(args.run) if args.run else 'untrained'}), {device}")
    ratios = []
    for case in cases:
        volumes = read_case(case, config.channels, Geometry.of(config))
        started = time.perf_counter()
        labels, run = segment_case(model, config, volumes, device, DEFAULT_CLEAN_UP, progress=False)
        predicted = time.perf_counter() - started
        scored = score(labels, volumes, config.task)["score_seconds"]
        ratios.append(scored / predicted)
        print(f"{case.case_id}: {run.brain_slices} brain slices of {volumes.images.shape[-1]}, prediction "
              f"{predicted:.2f} s ({run.slices_per_second:.1f} slices/s), scoring {scored:.2f} s, "
              f"ratio {scored / predicted:.2f}")
    print(f"scoring / prediction: median {np.median(ratios):.2f} (target < 2)")


if __name__ == "__main__":
    main()

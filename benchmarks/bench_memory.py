"""Does a training run's memory stay flat however big the file? The same number of training steps (and
validation after each epoch) on a 60-row, a 1251-row and a 20,000-row artifact, each in a fresh process tree
(DataLoader workers included); peak RSS side by side."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import replicated_artifact, report, tree_peak_rss_mb  # noqa: E402

STEPS = 24


def peak_for(artifact: Path, out: Path) -> float:
    return tree_peak_rss_mb(
        "from trainer.config import FitConfig\nfrom trainer.training.loop import fit\n"
        f"fit(FitConfig(data={str(artifact)!r}, modality='t2f', encoder='resnet18', encoder_weights=None,\n"
        f"    batch_size=8, workers=2, crop=128, epochs=1000, patience=1000, max_steps={STEPS}, device='cpu',\n"
        f"    out={str(out)!r}))\n"
    )


def main() -> None:
    import tempfile

    # The 60-row file gets a 15% val split (9 rows): with 5% (3 rows) its validation batches would be smaller
    # than the others' and the comparison would measure batch size, not file size.
    files = {60: replicated_artifact(60, "rows60val15", val_fraction=0.15)}
    files |= {n: replicated_artifact(n, f"rows{n}") for n in (1251, 20000)}
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, path in files.items():
            peaks[n] = peak_for(path, Path(tmp))
            print(f"{n:>6} rows ({path.stat().st_size / 1e6:7.1f} MB file): peak RSS of the run's processes "
                  f"{peaks[n]:.0f} MB", flush=True)
    report("peak memory, 1251-row file / 60-row file", peaks[1251] / peaks[60], "<= 1.05", peaks[1251] / peaks[60] <= 1.05)
    report("peak memory, 20000-row file / 60-row file", peaks[20000] / peaks[60], "<= 1.05", peaks[20000] / peaks[60] <= 1.05)


if __name__ == "__main__":
    main()

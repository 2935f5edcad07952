"""The GPU checks of the budget work in one command that fits 8 minutes of a lent H100/H200 and needs no network.

Here, where the real patients and PyPI are, once:

    python benchmarks/gpu_suite.py --bundle

writes benchmarks/.gpu/ (ignored by git): the wheels the machine lacks (nibabel, segmentation-models-pytorch), the
Blosc filter the artifact needs (hdf5plugin's own, alone: its wheel is 46 MB), and the 26 real patients of
../shared/real-brats18, unchanged, in parts that each fit one call of the device tool (64 MiB a call). It prints the
calls to make: one per part, carrying that part alone (a warm machine keeps what the earlier calls carried), the
last one running

    bash benchmarks/gpu_suite.sh     # there: $OUT/gpu_suite.json and $OUT/gpu_suite.md, rewritten after each section

Sections, in the order they matter; one that would not end before the 8 minutes is skipped and said so:
1. the budget curve: fold 0 of benchmarks/budget.py (the same 19 training and 7 held-out patients, the same models
   and clean-up choice), on whole 240x240 slices (padded to 256), batch 64, bf16 AMP: axial at 1000 and 3000 steps
   (snapshots of one constant-rate run), then three planes at 1000 steps each;
2. `fit` against the bare `train_step` it calls (benchmarks/steps.py), images/s on a 1251-row synthetic file;
3. `brats-train compare` on that file (five models, 2 epochs each), timed as a user runs it.
nnU-Net 2d is not in it: nnunetv2 with its dependencies (SimpleITK alone is 50 MB) and the data do not fit the
carry. Put the card, torch version and figures in the README.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from budget import REAL, REGIONS, Fold, Machine, Row, predict, score_row, table, truths  # noqa: E402

BUNDLE = HERE / ".gpu"
PART_BYTES = 60 * 2**20  # the tool carries 64 MiB a call, the working tree (under 1 MiB) and the wheels included
WHEELS = ("nibabel==5.4.2", "segmentation-models-pytorch==0.6.0")
GPU = Machine(device="cuda", batch_size=64, crop=None, workers=8, build_jobs=16)
ROWS = ("axial@1000", "axial@3000", "planes@1000")
#: --smoke: the budget sections at toy size on this CPU, to check the script before a lease.
SMOKE = Machine(batch_size=4, crop=64)
SMOKE_ROWS = ("axial@4", "axial@8", "axial@12")  # one plane: the planes path is budget.py's, run on the CPU
BUDGET_S = 8 * 60
#: Seconds each section was estimated to need on an H200 (checked against the clock before it starts).
ESTIMATES = {"axial@1000": 120, "axial@3000": 150, "fit against train_step": 90, "compare, 1251 rows": 90,
             "planes@1000": 200}


def bundle() -> None:
    """benchmarks/.gpu/: site/ (wheels and the Blosc filter), part-K/ (patients), and the calls to make."""
    shutil.rmtree(BUNDLE, ignore_errors=True)
    wheels, site = BUNDLE / "wheels", BUNDLE / "site"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "any", "-d", str(wheels),
                    *WHEELS], check=True)
    import hdf5plugin

    plugin = site / "hdf5plugin"
    shutil.copytree(Path(hdf5plugin.__file__).parent, plugin, ignore=shutil.ignore_patterns("__pycache__", "test.py"))
    for library in (plugin / "plugins").iterdir():
        if library.name != "libh5blosc.so":  # the artifact's only filter (builder.writer)
            library.unlink()
    subprocess.run(["strip", str(plugin / "plugins" / "libh5blosc.so")], check=True)
    used = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    parts: list[list[Path]] = [[]]
    for patient in sorted(p for p in REAL.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in patient.iterdir())
        if used + size > PART_BYTES:
            parts.append([])
            used = 0
        parts[-1].append(patient)
        used += size
    for index, patients in enumerate(parts):
        for patient in patients:
            shutil.copytree(patient, BUNDLE / f"part-{index}" / patient.name)
    print(f"{BUNDLE}: {sum(len(p) for p in parts)} patients in {len(parts)} parts. Make these device calls in a row "
          "(a machine stays warm 30 s between calls):")
    for index in range(len(parts)):
        carry = [f"benchmarks/.gpu/part-{index}"] + (["benchmarks/.gpu/wheels", "benchmarks/.gpu/site"] if index == 0
                                                     else [])
        command = "bash benchmarks/gpu_suite.sh" if index == len(parts) - 1 else "ls benchmarks/.gpu"
        print(f"  run(command={command!r}, carry={carry}" + (", timeout_s=560)" if index == len(parts) - 1 else ")"))


def gathered() -> Path:
    """One folder of links to every carried patient."""
    folder = BUNDLE / "patients"
    folder.mkdir(exist_ok=True)
    for patient in BUNDLE.glob("part-*/*"):
        if not (folder / patient.name).exists():
            (folder / patient.name).symlink_to(patient.resolve(), target_is_directory=True)
    return folder


class Suite:
    """Runs sections inside the budget and rewrites the JSON and table after each."""

    def __init__(self, out: Path, card: str) -> None:
        import torch

        self.out, self.started = out, time.perf_counter()
        self.results: dict = {"card": card, "torch": torch.__version__,
                              "budget_s": BUDGET_S, "sections": {}}
        self.tables: list[str] = []

    def section(self, name: str, work: Callable[[], tuple[dict, str]], estimate: float) -> None:
        left = BUDGET_S - (time.perf_counter() - self.started)
        if left < estimate:
            self.results["sections"][name] = {"skipped": f"{left:.0f} s left, about {estimate:.0f} s needed"}
            self.tables.append(f"{name}: skipped ({left:.0f} s left of {BUDGET_S}, about {estimate:.0f} needed)")
        else:
            begun = time.perf_counter()
            figures, text = work()
            self.results["sections"][name] = {**figures, "seconds": time.perf_counter() - begun}
            self.tables.append(text)
        print(self.tables[-1], flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=float))
        (self.out / "gpu_suite.md").write_text(f"{self.results['card']}, torch {self.results['torch']}\n\n"
                                               + "\n\n".join(self.tables) + "\n")


def budget_row(fold: Fold, row: Row, truth: dict) -> tuple[dict, str]:
    """One row of the GPU budget curve, scored as budget.py scores it."""
    predict(fold, row)
    result = score_row([fold], row, truth)
    assert result is not None
    return result, table([result])


def fit_against_step(data: Path) -> tuple[dict, str]:
    """Images/s of `fit` (bench_gpu.py's 5 epochs) and of its bare train_step, same settings."""
    import torch
    from bench_gpu import fit_epochs

    from trainer.config import FitConfig
    from trainer.data.artifact import Artifact

    from steps import bare_step_rate

    base = FitConfig(data=str(data), modality="t2f", encoder="resnet34", encoder_weights=None, batch_size=64,
                     workers=8, device="cuda", quiet=True)
    bare, memory = bare_step_rate(base, Artifact.open(data), torch.device("cuda"), 8, 60)
    epochs = fit_epochs(base, BUNDLE / "runs")
    rate = sum(float(r["train_images_per_s"]) for r in epochs) / len(epochs)
    return ({"bare_images_per_s": bare, "fit_images_per_s": rate, "peak_gib": memory},
            f"fit against its bare train_step (Unet/resnet34, t2f, batch 64, 1251 rows): {rate:.0f} against "
            f"{bare:.0f} images/s ({rate / bare:.2f}x), peak {memory:.1f} GiB")


def compare_rows(data: Path) -> tuple[dict, str]:
    """`brats-train compare` as a user runs it."""
    begun = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer", "compare", str(data), "--encoder", "resnet18",
                    "--encoder-weights", "none", "--epochs", "2", "--batch-size", "64",
                    "--out", str(BUNDLE / "compare")], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - begun
    return {"compare_s": seconds}, f"brats-train compare on 1251 rows (five Unet/resnet18, 2 epochs each): {seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="store_true", help=f"write {BUNDLE} here, from {REAL}")
    parser.add_argument("--out", type=Path, default=HERE / ".cache" / "gpu")
    parser.add_argument("--smoke", action="store_true", help="the budget sections at toy size on this CPU (minutes)")
    args = parser.parse_args()
    if args.bundle:
        bundle()
        return
    import torch

    if not (args.smoke or torch.cuda.is_available()):
        sys.exit("gpu_suite.py needs a CUDA device: run it with bash benchmarks/gpu_suite.sh on a lent machine "
                 "(or --smoke here)")
    suite = Suite(args.out, "CPU (--smoke)" if args.smoke else torch.cuda.get_device_name())
    rows = SMOKE_ROWS if args.smoke else ROWS
    needs = [0 if args.smoke else ESTIMATES[key] for key in ROWS]
    source = gathered()
    patients = sorted(p.name for p in source.iterdir())
    if len(patients) != 26:
        sys.exit(f"{len(patients)} patients carried, 26 wanted: carry every part that `--bundle` printed")
    fold = Fold.of(BUNDLE / ("smoke" if args.smoke else "budget"), patients, 0, source=source,
                   machine=SMOKE if args.smoke else GPU)
    truth = truths(source, list(fold.held_out) + list(fold.training))
    from common import replicated_artifact

    @functools.cache
    def synthetic() -> Path:  # made once, for the first section that needs it
        return replicated_artifact(1251, "rows1251", source_cases=60)

    for key, need in zip(rows[:2], needs):
        suite.section(key, lambda key=key: budget_row(fold, Row.parse(key), truth), need)
    if not args.smoke:  # both run code the test suite and make bench already run on the CPU
        suite.section("fit against train_step", lambda: fit_against_step(synthetic()), ESTIMATES["fit against train_step"])
        suite.section("compare, 1251 rows", lambda: compare_rows(synthetic()), ESTIMATES["compare, 1251 rows"])
    suite.section(rows[2], lambda: budget_row(fold, Row.parse(rows[2]), truth), needs[2])
    print(f"lesion-wise Dice as BraTS 2023 defines it; regions {', '.join(REGIONS)}; written to {args.out}")


if __name__ == "__main__":
    main()

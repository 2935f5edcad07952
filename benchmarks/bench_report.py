"""What `evaluate --volumes --report` costs next to the evaluation itself (target: under 10%), side by side in one
run, and the README's screenshot of a report.

Timing: a budget.py run of fold 0 (axial, 500 steps) on its validation patients from ../shared/real-brats18,
`evaluate_volumes` (the function the command calls) with and without the report, rounds alternating. Screenshot: the
report of `make demo`'s early-fusion run on its synthetic test cases (no real patient in the repository), taken by
headless Chromium at 1366 px into benchmarks/report.png.

    python benchmarks/bench_report.py [--screenshot]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from budget import CACHE, REAL  # noqa: E402

from trainer.commands.evaluate import evaluate_volumes  # noqa: E402
from trainer.inference.options import VolumeOptions  # noqa: E402

ROUNDS = 2


def main() -> None:
    screenshot = "--screenshot" in sys.argv[1:]
    runs = sorted(CACHE.glob("fold0-*/snap-axial-d256-p19-500"))
    if not runs or not REAL.is_dir():
        sys.exit("needs budget.py's fold-0 axial@500 run and ../shared/real-brats18: run budget.py --folds 0 first")
    work = Path(tempfile.mkdtemp())
    run = shutil.copytree(runs[0], work / "run")
    options = VolumeOptions(device="cpu")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    shares = []
    for round_ in range(ROUNDS):
        for with_report in (False, True) if round_ % 2 == 0 else (True, False):
            started = time.perf_counter()
            result = evaluate_volumes(run, REAL, "val", options=options, with_report=with_report)
            seconds[with_report].append(time.perf_counter() - started)
            if with_report:
                shares.append(result["report_seconds"] / result["evaluation_seconds"])
    plain, reported = min(seconds[False]), min(seconds[True])
    print(f"evaluate --volumes on {result['cases_scored']} real val patients: {plain:.1f} s, with --report "
          f"{reported:.1f} s ({reported / plain:.2f}x); the report's own share of the evaluation: "
          f"{', '.join(f'{s:.1%}' for s in shares)} (target under 10%)")
    demo = Path("runs/demo/all")
    synthetic = Path("datasets/synthetic")
    chromium = shutil.which("chromium")
    if not screenshot:
        pass
    elif demo.is_dir() and synthetic.is_dir() and chromium:
        copy = shutil.copytree(demo, work / "demo")
        evaluate_volumes(copy, synthetic, "test", options=options, with_report=True)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={work / 'profile'}", "--window-size=1366,900",
                        f"--screenshot={HERE / 'report.png'}", (copy / "test_volumes.html").as_uri()],
                       check=True, capture_output=True)
        print(f"screenshot: {HERE / 'report.png'}")
    else:
        print("no screenshot: needs `make demo`'s runs/demo/all and datasets/synthetic, and chromium")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

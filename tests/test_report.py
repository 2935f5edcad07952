"""`evaluate --volumes --report`: one self-contained HTML page, checked as text (every patient, every picture a
PNG, nothing fetched from outside) and in a real browser (headless Chromium from Debian: the DOM after its script
ran, the console, a screenshot)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import ReportPage, one_error_line, trainer_cli, writable_copy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(small_run: Path, small_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = writable_copy(small_run, tmp_path_factory.mktemp("report"))
    result = trainer_cli("evaluate", run, "--volumes", small_cases, "--split", "test", "--device", "cpu", "--report")
    assert result.exit_code == 0, result.output
    return run / "test_volumes.html"


def test_the_report_holds_every_patient_and_needs_nothing_outside(report: Path) -> None:
    page = ReportPage()
    page.feed(report.read_text())
    with open(report.with_suffix(".csv")) as handle:
        scored = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert sorted(row[0] for row in page.rows) == sorted(scored)
    assert len(page.images) == len(scored)
    for source in page.images:  # every picture decodes as a PNG
        assert source.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert picture.format == "PNG" and picture.width > 200
    assert all(a.startswith("data:") for a in page.addresses)  # no server, no network
    means = [sum(float(scored[row[0]][f"lesion_dice_{r}"]) for r in ("WT", "TC", "ET")) for row in page.rows]
    assert means == sorted(means)  # worst first
    for row in page.rows:  # the table shows the CSV's numbers
        assert row[1] == f"{float(scored[row[0]]['lesion_dice_WT']):.3f}"
    assert all(0 <= float(row["dice_WT_uncertain"]) <= 1 for row in scored.values())  # uncertainty against error
    summary = json.loads(report.with_suffix(".json").read_text())
    assert summary["report_seconds"] > 0 and summary["evaluation_seconds"] > 0
    assert "max-width: 1100px" in report.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: `apt-get install chromium` (make setup and .ci/run do)")
def test_the_report_in_a_real_browser(report: Path, tmp_path: Path) -> None:
    """Headless Chromium: after its script ran every picture is decoded, the console holds no error, and a
    screenshot at a laptop's 1366 px is taken (the README's)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = re.search(r'id="pictures">(\d+) of (\d+) pictures shown<', dom.stdout)
    assert shown and shown.group(1) == shown.group(2) != "0", dom.stdout[-500:]
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", dom.stderr), dom.stderr[-2000:]
    screenshot = tmp_path / "report.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1366,900", "--hide-scrollbars",
                           report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and Image.open(screenshot).size == (1366, 900), shot.stderr[-2000:]


def test_a_report_without_volumes_or_with_a_choice_is_one_line(small_run: Path, small_cases: Path,
                                                               tmp_path: Path) -> None:
    run = writable_copy(small_run, tmp_path)
    assert "give --volumes" in trainer_cli("evaluate", run, "--report").output
    line = one_error_line(trainer_cli("evaluate", run, "--volumes", small_cases, "--split", "val", "--report",
                                      "--choose-clean-up", "--device", "cpu"))
    assert "choose it first" in line and not list(run.glob("*.html"))


def test_a_stored_calibration_is_used_later_and_an_unfit_one_is_one_line(small_run: Path, small_cases: Path,
                                                                         tmp_path: Path) -> None:
    """predict applies the temperature stored for its members (its probabilities equal the calibration applied to
    the uncalibrated ones) and says so, with the same mask; --calibrate on a run that learned nothing (2 steps) does
    not converge: one line, nothing stored; on the test split it is refused."""
    import nibabel as nib
    import numpy as np

    from trainer.scoring.calibration import Calibration, save_calibration

    run = writable_copy(small_run, tmp_path)
    case = sorted(small_cases.iterdir())[0]
    raw = trainer_cli("predict", run, case, "--out", tmp_path / "raw", "--device", "cpu", "--save-probabilities")
    assert raw.exit_code == 0 and "calibrated" not in raw.output, raw.output
    calibration = Calibration("multiclass", (2.0,), "a test", 0.1, 0.05)
    save_calibration(run, calibration, {"before": [], "after": []}, members=[str(run)], tta=False)
    warm = trainer_cli("predict", run, case, "--out", tmp_path / "warm", "--device", "cpu", "--save-probabilities")
    assert warm.exit_code == 0 and "probabilities calibrated: temperature 2.00" in warm.output, warm.output
    before, after = (np.load(tmp_path / name / f"{case.name}.npz")["probabilities"] for name in ("raw", "warm"))
    np.testing.assert_allclose(after.astype(np.float32), calibration.apply(before), atol=2e-3)
    masks = [np.asanyarray(nib.load(tmp_path / name / f"{case.name}.nii.gz").dataobj) for name in ("raw", "warm")]
    assert np.array_equal(*masks)
    untrained = writable_copy(small_run, tmp_path / "untrained")
    line = one_error_line(trainer_cli("evaluate", untrained, "--volumes", small_cases, "--split", "val", "--device",
                                      "cpu", "--calibrate"))
    assert "did not converge" in line and not (untrained / "calibration.json").exists()
    line = one_error_line(trainer_cli("evaluate", untrained, "--volumes", small_cases, "--device", "cpu",
                                      "--calibrate"))
    assert "--split val" in line


def test_the_reliability_diagram_is_a_picture() -> None:
    from trainer.commands.report import reliability_png

    curve = [{"bin": b, "confidence": (b + 0.5) / 15, "accuracy": (b + 0.3) / 15, "voxels": 10} for b in range(15)]
    picture = Image.open(io.BytesIO(reliability_png({"before": curve, "after": curve})))
    assert picture.format == "PNG" and picture.width > 200

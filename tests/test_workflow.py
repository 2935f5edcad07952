"""The workflow nnU-Net, MONAI and Lightning users expect: folds and out-of-fold scores, folders in and out, re-runs
from a config, resumes that extend, logs to watch, exports, and runs that are cheap to keep."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from builder import __version__
from builder.build import BuildOptions, build
from builder.layout import patient_of
from builder.split import fold_of
from trainer.cli import main
from trainer.data.artifact import Artifact

from conftest import FAST, RESUMABLE, RESUMABLE_OPTIONS, cut_down, fit_killed, one_error_line, read_volume, trainer_cli


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# --- folds ----------------------------------------------------------------------------------------------------------

def test_folds_split_the_train_and_val_patients_and_never_the_test_ones(small_artifact: Path) -> None:
    artifact = Artifact.open(small_artifact)
    pool = set(artifact.cases_of("train")) | set(artifact.cases_of("val"))
    held = [set(artifact.with_folds(2, k).cases_of("val")) for k in range(2)]
    assert held[0] | held[1] == pool and not held[0] & held[1]
    for k in range(2):
        fold = artifact.with_folds(2, k)
        assert set(fold.cases_of("train")) == pool - held[k]
        assert fold.cases_of("test") == artifact.cases_of("test")
    seed = int(artifact.provenance["seed"])
    assert all(fold_of(patient_of(c), seed, 2) == k for k in range(2) for c in held[k])  # a patient's own rank


def test_a_fold_out_of_range_is_one_line(small_artifact: Path, tmp_path: Path) -> None:
    line = one_error_line(CliRunner().invoke(main, ["fit", str(small_artifact), "-m", "all", "--out", str(tmp_path),
                                                    *FAST, "--folds", "2", "--fold", "2"]))
    assert "--fold 2" in line and "0 to 1" in line and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def cross_validated(small_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """`cross-validate` end to end (2 fold runs, out-of-fold volumes, the clean-up chosen on them, the report) on an artifact of
    7 of the small cases (6 patients in the folds): (its artifact, the cases, the output folder); read-only."""
    folder = tmp_path_factory.mktemp("cv")
    cases = folder / "cases"
    for case in sorted(small_cases.iterdir())[:7]:
        shutil.copytree(case, cases / case.name)
    data = folder / "cv.h5"
    build(cases, data, BuildOptions(jobs=1, val_fraction=0.25, test_fraction=0.25, progress=False))
    result = trainer_cli("cross-validate", data, "--folds", "2", "--out", folder / "cv", *FAST, "--epochs", "1",
                         "--max-steps", "2", "--batch-size", "2", "--volumes", cases, "--choose-clean-up",
                         "--report")
    assert result.exit_code == 0, result.output
    return data, cases, folder / "cv"


def test_cross_validation_scores_out_of_fold(cross_validated: tuple[Path, Path, Path]) -> None:
    data, _, out = cross_validated
    rows = list(csv.DictReader(open(out / "oof_volumes.csv")))
    artifact = Artifact.open(data)
    pool = artifact.cases_of("train") + artifact.cases_of("val")
    assert sorted(r["case_id"] for r in rows) == sorted(pool) and len(pool) == 6
    for k in range(2):  # each patient scored from the run that held it out
        held = set(artifact.with_folds(2, k).cases_of("val"))
        assert {r["case_id"] for r in rows if r["fold"] == str(k)} == held
        choice = json.loads((out / f"fold-{k}" / "clean_up.json").read_text())
        assert choice["chosen_on"] == "the out-of-fold predictions of 2 folds: 6 patients"
        assert not (out / f"fold-{k}" / "last.pt").exists()  # finished runs keep best.pt only
    assert (out / "oof" / f"{rows[0]['case_id']}.npz").is_file() and "Out-of-fold" in (out / "oof.md").read_text()
    page = (out / "oof_volumes.html").read_text()  # the report: every patient in its table and with its views
    assert all(f"<td>{r['case_id']}</td>" in page for r in rows)
    assert page.count('src="data:image/png;base64,') == len(rows)


def test_fold_runs_ensemble_but_never_on_patients_one_of_them_saw(cross_validated: tuple[Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    data, cases, out = cross_validated
    test_case = Artifact.open(data).cases_of("test")[0]
    predicted = trainer_cli("predict", out, cases / test_case, "--out", tmp_path / "pred", "--device", "cpu")
    assert predicted.exit_code == 0 and "fold-0 (axial, context 0), fold-1 (axial, context 0)" in predicted.output
    runs = tmp_path / "runs"  # evaluate writes into the lead run: copies
    for k in range(2):
        shutil.copytree(out / f"fold-{k}", runs / f"fold-{k}")
    scored = trainer_cli("evaluate", runs / "fold-0", "--volumes", cases, "--ensemble", runs / "fold-1",
                         "--split", "val", "--device", "cpu")  # fold 1 trained on fold 0's held-out patients
    assert "trained on" in one_error_line(scored) and "must not have seen them" in scored.output


# --- folders in, folders out ---------------------------------------------------------------------------------------

def test_predict_takes_folders_and_writes_names_that_never_collide(small_run: Path, small_cases: Path,
                                                                    tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for case in sorted(small_cases.iterdir())[:2]:
        shutil.copytree(case, inputs / case.name)
    out = tmp_path / "out"
    first = trainer_cli("predict", small_run, inputs, "--out", out, "--device", "cpu", "--save-probabilities")
    assert first.exit_code == 0, first.output
    for case in sorted(inputs.iterdir()):
        mask = nib.load(out / f"{case.name}.nii.gz")
        assert mask.shape == nib.load(next(case.glob("*-t1n.nii.gz"))).shape
        saved = np.load(out / f"{case.name}.npz")
        probabilities = saved["probabilities"]
        assert probabilities.dtype == np.float16 and probabilities.shape == (4, *mask.shape)
        assert list(saved["outputs"]) == ["background", "NCR", "ED", "ET"]
        assert np.array_equal(saved["affine"], mask.affine)
        np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=0.01)
    assert not list(out.glob("*seg*"))
    again = trainer_cli("predict", small_run, inputs, "--out", out, "--device", "cpu")
    assert again.exit_code == 0 and again.output.count("written before by these models") == 2
    redone = trainer_cli("predict", small_run, inputs, "--out", out, "--device", "cpu", "--overwrite")
    assert redone.exit_code == 0 and redone.output.count(": wrote ") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no BraTS case folder" in one_error_line(CliRunner().invoke(
        main, ["predict", str(small_run), str(empty), "--out", str(out), "--device", "cpu"]))


def test_uncertainty_maps_match_the_saved_probabilities(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    """--save-uncertainty: the map is the normalised entropy of the probabilities --save-probabilities writes,
    computed here by hand, in the input's space and header; an ensemble of a run with its own copy disagrees
    nowhere; a scored case adds the Dice of its uncertain and its certain half."""
    case = sorted(small_cases.iterdir())[0]
    copy = shutil.copytree(small_run, tmp_path / "copy")
    out = tmp_path / "out"
    result = trainer_cli("predict", small_run, case, "--out", out, "--device", "cpu", "--save-uncertainty",
                         "--save-probabilities", "--ensemble", copy)
    assert result.exit_code == 0, result.output
    entropy_map = nib.load(out / f"{case.name}_uncertainty.nii.gz")
    image = nib.load(next(case.glob("*-t1n.nii.gz")))
    assert entropy_map.get_data_dtype() == np.float32 and np.array_equal(entropy_map.affine, image.affine)
    p = np.clip(np.load(out / f"{case.name}.npz")["probabilities"].astype(np.float64), 1e-7, 1)
    expected = -(p * np.log(p)).sum(0) / np.log(4)  # the multiclass softmax's four classes
    np.testing.assert_allclose(np.asanyarray(entropy_map.dataobj), expected, atol=2e-3)
    assert float(np.asanyarray(nib.load(out / f"{case.name}_disagreement.nii.gz").dataobj).max()) < 1e-3
    with open(out / "predict_scores.csv") as handle:
        row = next(csv.DictReader(handle))
    assert 0 <= float(row["dice_WT_uncertain"]) <= 1 and 0 <= float(row["dice_WT_certain"]) <= 1


def test_predicted_enhancing_tumour_follows_the_input_naming(small_run: Path, tmp_path: Path) -> None:
    from builder.layout import find_cases
    from builder.synth import write_case
    from trainer.commands.predict import et_label
    from trainer.inference.cases import Geometry, read_case, write_labels

    full = tmp_path / "full"
    write_case(full, 3, seed=0, layout="brats2021")  # a 2021 naming: its challenge expects ET as 4
    legacy = cut_down(full / "BraTS2021_00003", tmp_path / "legacy")
    (case,) = find_cases(legacy)
    volumes = read_case(case, ["t1n"], Geometry())
    labels = np.zeros(volumes.images.shape[1:], np.uint8)
    labels[10:20, 10:20, 5:10], labels[30:40, 30:40, 5:10], labels[50:60, 50:60, 5:10] = 1, 2, 3
    assert et_label("auto", volumes) == 4 and et_label("brats2023", volumes) == 3
    write_labels(labels, volumes, tmp_path / "mask.nii.gz", et_label("auto", volumes))
    np.testing.assert_array_equal(read_volume(tmp_path / "mask.nii.gz"),
                                  np.where(labels == 3, 4, labels))
    out = tmp_path / "out"  # and through the command, both conventions
    assert trainer_cli("predict", small_run, legacy, "--out", out, "--device", "cpu", "--no-clean-up").exit_code == 0
    written = read_volume(out / "BraTS2021_00003.nii.gz")
    assert trainer_cli("predict", small_run, legacy, "--out", tmp_path / "as2023", "--device", "cpu", "--no-clean-up",
                  "--labels", "brats2023").exit_code == 0
    as2023 = read_volume(tmp_path / "as2023" / "BraTS2021_00003.nii.gz")
    assert set(np.unique(written)) <= {0, 1, 2, 4} and set(np.unique(as2023)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(np.where(as2023 == 3, 4, as2023), written)


# --- re-runs --------------------------------------------------------------------------------------------------------

@pytest.fixture
def straight_run(resumable_run: Path) -> Path:
    """A 2-epoch run made in one go: what every resumed, extended or re-made run must equal."""
    return resumable_run


def _same_run(run: Path, straight: Path) -> None:
    """``run`` ends with ``straight``'s weights (both kept their resume state, --keep-last) and logged the same
    epochs."""
    mine, theirs = (torch.load(r / "last.pt", weights_only=True) for r in (run, straight))
    assert mine["epoch"] == theirs["epoch"] == 1
    for key, value in theirs["model"].items():
        assert torch.allclose(value.float(), mine["model"][key].float(), atol=1e-6), key
    rows, expected = _metrics(run), _metrics(straight)
    assert [r["epoch"] for r in rows] == ["0", "1"]  # integers stay integers across resumes
    for mine, theirs in zip(rows, expected, strict=True):
        for key in ("train_loss", "val_loss", "val_dice_mean"):
            assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=1e-6), (run, key)


def test_a_killed_run_resumes_to_what_one_straight_run_gives(small_artifact: Path, straight_run: Path,
                                                             tmp_path: Path) -> None:
    """Killed after its second epoch was logged and before that epoch's checkpoint, then resumed."""
    run = fit_killed(small_artifact, tmp_path / "runs", 1, **RESUMABLE_OPTIONS, epochs=2)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
    assert "stopped: KeyboardInterrupt" in (run / "log.txt").read_text()
    assert trainer_cli("fit", small_artifact, "--resume", run).exit_code == 0
    _same_run(run, straight_run)


def test_a_finished_run_extends_and_a_config_remakes_it(small_artifact: Path, straight_run: Path,
                                                        tmp_path: Path) -> None:
    """A 1-epoch run extended with --resume --epochs 2, and a run made again from the straight run's config.json."""
    assert trainer_cli("fit", small_artifact, "--out", tmp_path / "short", *RESUMABLE, "--epochs", "1").exit_code == 0
    (short,) = (tmp_path / "short").iterdir()
    line = one_error_line(CliRunner().invoke(main, ["fit", "--resume", str(short), "--lr", "0.01"]))
    assert "--lr 0.01" in line and "lr 0.001" in line and "--config" in line
    assert trainer_cli("fit", "--resume", short, "--epochs", "2").exit_code == 0
    _same_run(short, straight_run)
    assert trainer_cli("fit", "--config", straight_run / "config.json", "--out", tmp_path / "again").exit_code == 0
    (again,) = (tmp_path / "again").iterdir()
    _same_run(again, straight_run)
    config = json.loads((again / "config.json").read_text())
    assert Path(config["data"]).is_absolute() and config["data"] == str(small_artifact.resolve())


def test_configs_from_elsewhere_are_one_line(small_run: Path, tmp_path: Path) -> None:
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**json.loads((small_run / "config.json").read_text()), "config_version": 99}))
    assert "version 99" in one_error_line(CliRunner().invoke(main, ["fit", "--config", str(newer)]))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"approach": "t1n"}))
    assert "not a brats2d run configuration" in one_error_line(CliRunner().invoke(main, ["fit", "--config", str(other)]))


# --- watching a run -------------------------------------------------------------------------------------------------

def test_log_quiet_tensorboard_and_version(small_artifact: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = trainer_cli("fit", small_artifact, "-m", "t2f", "--out", tmp_path, *FAST, "--epochs", "2", "--quiet",
                    "--tensorboard")
    assert result.exit_code == 0 and result.output.strip().splitlines() == [f"run folder: {next(tmp_path.iterdir())}"]
    (run,) = tmp_path.iterdir()
    log = (run / "log.txt").read_text()
    assert "epoch 1:" in log and "epoch 2:" in log and "run " in log
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/dice_mean")] == pytest.approx(
        [float(r["val_dice_mean"]) for r in _metrics(run)])
    assert events.Tags()["images"] == ["samples"]
    from builder.cli import main as build_main

    for cli, name in ((main, "brats-train"), (build_main, "brats-build")):
        version = CliRunner().invoke(cli, ["--version"])
        assert version.exit_code == 0 and name in version.output and __version__ in version.output


def test_progress_lines_outside_a_terminal(small_cases: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from builder import progress
    from builder.build import BuildOptions, build

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)  # a line for every step: as one every 30 s on long work
    build(small_cases, tmp_path / "x.h5", BuildOptions(jobs=1, val_fraction=0.25, test_fraction=0.25))
    lines = capsys.readouterr().err.splitlines()
    assert "slices: 12/12 case in" in "\n".join(lines) and sum(line.startswith("slices: ") for line in lines) >= 12


# --- exports --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_gives_the_checkpoints_outputs(small_run: Path, tmp_path: Path, fmt: str) -> None:
    from trainer.training.model import load_model

    out = tmp_path / f"model.{fmt}"
    result = trainer_cli("export", small_run, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["input"]["channels"] == ["t1n", "t1c", "t2w", "t2f"] and sidecar["task"] == "multiclass"
    model, _ = load_model(small_run / "best.pt")
    slices = torch.randn(2, 4, 96, 64)
    with torch.no_grad():
        expected = model(slices).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(slices).detach().numpy()
    else:
        onnxruntime = pytest.importorskip("onnxruntime")
        got = onnxruntime.InferenceSession(str(out)).run(None, {"slices": slices.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_without_its_extra_is_one_line(small_run: Path, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    line = one_error_line(CliRunner().invoke(main, ["export", str(small_run), "--format", "onnx", "--out",
                                                    str(tmp_path / "m.onnx")]))
    assert "pip install 'brats2d[export]'" in line and not list(tmp_path.iterdir())

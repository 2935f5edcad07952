"""Region-based training, test-time mirroring, ensembles and the clean-up chosen on validation patients: each against
a small answer worked out by hand, and end to end through the commands."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.config import FitConfig
from trainer.inference.cases import CaseVolumes
from trainer.inference.ensemble import Member, Segmenter
from trainer.inference.slices import network_probabilities
from trainer.scoring.cleanup import CleanUp, CleanUpTrial, clean_up
from trainer.tasks import classes, encode, region_targets
from trainer.training.metrics import SegmentationMetrics
from trainer.training.step import make_loss

from conftest import one_error_line


def test_region_probabilities_become_nested_labels_as_nnunet_draws_them() -> None:
    # one row of five pixels: (WT, TC, ET) probabilities
    probs = torch.tensor([[0.2, 0.9, 0.9, 0.9, 0.3],  # WT
                          [0.1, 0.2, 0.8, 0.7, 0.2],  # TC
                          [0.0, 0.1, 0.3, 0.6, 0.9]])  # ET
    labels = classes(probs[None, :, None, :], "regions")[0, 0]
    # nothing; oedema; necrosis (TC, not ET); enhancing (all three); ET alone above 0.5 still drawn last: enhancing
    assert labels.tolist() == [0, 2, 1, 3, 3]
    masks = region_targets(labels[None])[0]
    assert masks[:, 4].tolist() == [1, 1, 1]  # whatever is drawn, ET lies in TC lies in WT
    assert torch.equal(encode(labels[None], "regions"), region_targets(labels[None]))


def test_region_loss_is_dice_plus_bce_on_the_three_masks() -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
    targets = region_targets(labels)
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
                + smp.losses.DiceLoss(mode="multilabel", from_logits=True)(logits, targets))
    assert make_loss("ce+dice", "regions")(logits, labels).item() == pytest.approx(expected.item())


def test_region_metrics_score_the_drawn_labels_like_multiclass() -> None:
    truth = torch.tensor([[[0, 1], [2, 3]]])
    certain = encode(truth, "regions") * 40 - 20  # logits whose sigmoids say the truth for certain
    regions = SegmentationMetrics("regions", torch.device("cpu"))
    regions.update(certain, truth)
    out = regions.compute()
    assert out["dice_WT"] == out["dice_TC"] == out["dice_ET"] == 1 and out["pixel_accuracy"] == 1
    assert out["mse"] == pytest.approx(0, abs=1e-8)
    wrong = certain.clone()
    wrong[0, 2, 1, 1] = -20  # ET missed at the ET pixel: it becomes necrosis (TC still there)
    regions = SegmentationMetrics("regions", torch.device("cpu"))
    regions.update(wrong, truth)
    out = regions.compute()
    assert out["dice_ET"] == 0 and out["dice_TC"] == 1 and out["pixel_accuracy"] == pytest.approx(3 / 4)
    assert out["mse"] == pytest.approx(1 / 12, abs=1e-6)  # one of 4 pixels x 3 outputs entirely wrong


class Lopsided(torch.nn.Module):
    """A 'model' whose output depends on where a pixel is, so that mirroring changes it: logits grow along both
    in-plane axes, scaled by the first input channel."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, _, h, w = inputs.shape
        ramp = torch.arange(h)[:, None] * 0.1 + torch.arange(w)[None, :] * 0.03
        first = inputs[:, :1]
        return torch.cat([-first * ramp, first * ramp, torch.zeros_like(first), first], 1)


def test_mirroring_averages_the_mirrored_passes_unmirrored() -> None:
    config = FitConfig(data="", modality="t1n", amp=False, device="cpu")
    images = np.zeros((1, 64, 64, 3), dtype=np.int16)
    images[0, 8:56, 4:60, 1] = np.random.default_rng(0).integers(100, 900, (48, 56))
    model = Lopsided().eval()
    mirrored = network_probabilities(model, config, images, torch.device("cpu"), tta=True, box=False).probabilities
    flips = [network_probabilities(model, config, images[:, ::a, ::b], torch.device("cpu"), box=False).probabilities[:, ::a, ::b]
             for a, b in ((1, 1), (-1, 1), (1, -1), (-1, -1))]
    np.testing.assert_allclose(mirrored.astype(np.float32), np.mean([f.astype(np.float32) for f in flips], 0),
                               atol=2e-3)  # float16 storage
    plain = flips[0]
    assert np.abs(mirrored.astype(np.float32) - plain.astype(np.float32)).max() > 0.05  # it did change something


def test_an_ensemble_averages_its_members(small_run: Path) -> None:
    from trainer.training.model import load_model

    model, saved = load_model(small_run / "best.pt")
    config = FitConfig.from_dict({**saved, "device": "cpu"})
    other = Lopsided().eval()
    images = np.random.default_rng(1).integers(0, 600, (4, 32, 32, 6)).astype(np.int16)
    ensemble = Segmenter.of([Member(small_run, model, config), Member(small_run, other, config)], torch.device("cpu"))
    # volumes read in another channel order: each member picks its own channels by name
    volumes = CaseVolumes("case", tuple(reversed(config.channels)), images[::-1], None, (1.0, 1.0, 1.0), None, None)
    result = ensemble.probabilities(volumes, progress=False)
    one = network_probabilities(model, config, images, torch.device("cpu"), progress=False).probabilities.astype(np.float32)
    two = network_probabilities(other, config, images, torch.device("cpu"), progress=False).probabilities.astype(np.float32)
    np.testing.assert_allclose(result.probabilities.astype(np.float32), (one + two) / 2, atol=2e-3)


def test_runs_that_cannot_be_averaged_are_refused(small_run: Path, small_cases: Path, tmp_path: Path) -> None:
    other = tmp_path / "regions"
    shutil.copytree(small_run, other)
    checkpoint = torch.load(other / "best.pt", weights_only=True)
    checkpoint["config"]["channels"] = ["t1n"]
    checkpoint["config"]["modality"] = "t1n"
    checkpoint["model"]["encoder.conv1.weight"] = checkpoint["model"]["encoder.conv1.weight"][:, :1]
    torch.save(checkpoint, other / "best.pt")
    result = CliRunner().invoke(main, ["predict", str(small_run), str(small_cases), "--ensemble", str(other),
                                       "--out", str(tmp_path / "out"), "--device", "cpu"])
    line = one_error_line(result)
    assert "cannot be ensembled" in line and str(other) in line and "modalities" in line
    assert not (tmp_path / "out").exists()


def test_clean_up_trial_keeps_the_rule_that_scores_best() -> None:
    truth = np.zeros((40, 40, 40), np.uint8)
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 3
    predicted = truth.copy()
    predicted[30:33, 30:33, 30:33] = 2  # a false lesion of 27 voxels
    trial = CleanUpTrial(("WT", "TC", "ET"), rules=(CleanUp(), CleanUp(min_share=0.3), CleanUp((250, 150, 100))))
    trial.add("BraTS-GLI-00001-000", predicted, truth, (1.0, 1.0, 1.0))
    table = trial.table()
    assert table[0]["lesion_dice_mean"] == pytest.approx((0.5 + 1 + 1) / 3)  # WT: one true, one false lesion
    assert table[1]["lesion_dice_mean"] == pytest.approx(1.0)  # 27 < 30% of the 1000-voxel lesion: dropped
    # the winner's sizes drop the false lesion, but also the 64-voxel core (under 150): TC and ET missed
    assert table[2]["lesion_dice_mean"] == pytest.approx((1 + 0 + 0) / 3)
    rule, score = trial.best()
    assert rule == CleanUp(min_share=0.3) and score == 1  # ties go to the earlier (simpler) rule
    assert np.array_equal(clean_up(predicted, rule), truth)


def test_clean_up_chosen_on_val_is_stored_used_and_never_chosen_on_test(small_run: Path, small_cases: Path,
                                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    refused = CliRunner().invoke(main, ["evaluate", str(run), "--volumes", str(small_cases), "--split", "test",
                                        "--choose-clean-up", "--device", "cpu"])
    assert "would tune on the patients being reported" in one_error_line(refused)
    chosen = CliRunner().invoke(main, ["evaluate", str(run), "--volumes", str(small_cases), "--split", "val",
                                       "--choose-clean-up", "--device", "cpu", "--limit", "2"])
    assert chosen.exit_code == 0, chosen.output
    record = json.loads((run / "clean_up.json").read_text())
    assert record["chosen_on"] == "the val split: 2 patients" and len(record["candidates"]) == 24
    best = max(c["lesion_dice_mean"] for c in record["candidates"])
    assert record["lesion_dice_mean"] == best
    rows = list(csv.DictReader(open(run / "val_volumes.csv")))
    assert np.mean([np.mean([float(r[f"lesion_dice_{x}"]) for x in ("WT", "TC", "ET")]) for r in rows]) == \
        pytest.approx(best)  # the val report is of the chosen rule
    later = CliRunner().invoke(main, ["predict", str(run), str(small_cases / rows[0]["case_id"]), "--out",
                                      str(tmp_path / "out"), "--device", "cpu"])
    assert later.exit_code == 0 and f"the clean-up chosen for {run.name} on the val split" in later.output

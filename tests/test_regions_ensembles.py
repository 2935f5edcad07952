"""Region-based training, test-time mirroring, ensembles and the clean-up chosen on validation patients: each against
a small answer worked out by hand, and end to end through the commands."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from trainer.cli import main
from trainer.config import FitConfig
from trainer.inference.cases import CaseVolumes
from trainer.inference.ensemble import Member, Segmenter
from trainer.inference.slices import network_probabilities
from trainer.scoring.brats import lesion_wise
from trainer.scoring.cleanup import CleanUp, CleanUpTrial, RegionRule, clean_up
from trainer.tasks import classes, encode, region_confidence, region_targets
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


def test_region_confidence_is_the_sum_of_each_regions_classes() -> None:
    softmax = np.array([[0.1, 0.7], [0.2, 0.1], [0.3, 0.1], [0.4, 0.1]], np.float16)  # background, NCR, ED, ET
    regions = region_confidence(softmax, "multiclass")
    expected = np.array([[0.9, 0.3], [0.6, 0.2], [0.4, 0.1]])  # WT: 1 - background, TC: NCR + ET, ET
    np.testing.assert_allclose(regions / 255, expected, atol=1 / 255)
    sigmoids = np.array([[0.9], [0.5], [0.0]], np.float32)
    assert region_confidence(sigmoids, "regions").tolist() == [[230], [128], [0]]
    np.testing.assert_allclose(region_confidence(softmax[:2], "binary") / 255, [[0.2, 0.1]], atol=1 / 255)  # tumour


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
    confidence = np.stack([np.isin(predicted, values) * np.uint8(250) for values in ((1, 2, 3), (1, 3), (3,))])
    trial = CleanUpTrial(("WT", "TC", "ET"), rules=(RegionRule(), RegionRule(min_share=0.3), RegionRule(250)),
                         et_counts=(0,))
    trial.add("BraTS-GLI-00001-000", predicted, truth, (1.0, 1.0, 1.0), confidence)
    wt, tc = [[row["lesion_dice_mean"] for row in trial.table(region)] for region in ("WT", "TC")]
    assert wt == pytest.approx([0.5, 1.0, 1.0])  # one true and one false lesion; 27 < 30% of 1000 and < 250: dropped
    assert tc == pytest.approx([1.0, 1.0, 0.0])  # 250 voxels would drop the 64-voxel core: a missed lesion
    rule, score = trial.best()
    assert rule == CleanUp((RegionRule(min_share=0.3), RegionRule(), RegionRule())) and score == 1  # ties: simpler
    assert np.array_equal(clean_up(predicted, rule, confidence), truth)


def test_clean_up_keeps_a_confident_satellite_and_drops_an_uncertain_speck() -> None:
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:15, 5:15, 5:15] = 2  # the main lesion
    labels[25:28, 25:28, 25:28] = 2  # a satellite of 27 voxels ...
    labels[32:35, 5:8, 5:8] = 2  # ... and a speck of 27 voxels: the same size, so sizes cannot tell them apart
    probability = np.zeros((3, *labels.shape), np.float32)
    probability[0][labels > 0] = 0.55
    probability[0][5:15, 5:15, 5:15] = 0.99
    probability[0][26, 26, 26] = 0.97  # the network is sure of the satellite's centre
    keep_sure = CleanUp((RegionRule(min_confidence=0.9), RegionRule(), RegionRule()))
    cleaned = clean_up(labels, keep_sure, probability)
    assert cleaned[26, 26, 26] == 2 and not cleaned[32:35, 5:8, 5:8].any() and (cleaned > 0).sum() == 1000 + 27
    by_mean = CleanUp((RegionRule(min_confidence=0.6, statistic="mean"), RegionRule(), RegionRule()))
    assert (clean_up(labels, by_mean, probability) > 0).sum() == 1000  # the satellite's mean is 0.57: dropped too
    as_bytes = np.rint(probability * 255).astype(np.uint8)  # what runs store: the same rule reads 0-255
    assert np.array_equal(clean_up(labels, keep_sure, as_bytes), cleaned)
    with pytest.raises(ValueError, match="region probabilities"):
        clean_up(labels, keep_sure)


def test_clean_up_trial_scores_each_rule_as_lesion_wise_scores_its_result() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        truth = ndimage.binary_dilation(rng.random((36, 36, 30)) > 0.998, iterations=2).astype(np.uint8) * 2
        predicted = (ndimage.binary_dilation(rng.random(truth.shape) > 0.998, iterations=int(rng.integers(1, 3)))
                     | ((truth > 0) & (rng.random(truth.shape) > 0.2))).astype(np.uint8) * 2
        confidence = (rng.random((3, *truth.shape)) * 255).astype(np.uint8)
        rules = (RegionRule(), RegionRule(30), RegionRule(min_share=0.4), RegionRule(min_confidence=0.99),
                 RegionRule(10, 0.1, 0.5, "mean"))
        trial = CleanUpTrial(("WT",), rules=rules)
        trial.add("BraTS-GLI-00001-000", predicted, truth, (1.0, 1.0, 1.5), confidence)
        for row, rule in zip(trial.table("WT"), rules):
            cleaned = clean_up(predicted, CleanUp((rule, RegionRule(), RegionRule())), confidence)
            assert row["lesion_dice_mean"] == pytest.approx(
                lesion_wise(cleaned > 0, truth > 0, (1.0, 1.0, 1.5), distances=False)["lesion_dice"])


def test_clean_up_rules_of_earlier_releases_still_load() -> None:
    earlier = {"min_voxels": [250, 150, 100], "min_share": 0.1, "min_et_voxels": 300}  # a 0.3 clean_up.json
    rule = CleanUp.from_dict(earlier)
    assert rule.regions[1] == RegionRule(150, 0.1) and rule.min_et_voxels == 300
    assert CleanUp.from_dict(asdict(rule)) == rule
    assert rule.describe() == ("WT components under 250 voxels or under 10% of the largest dropped; TC components "
                               "under 150 voxels or under 10% of the largest dropped; ET components under 100 voxels "
                               "or under 10% of the largest dropped; ET relabelled necrosis when under 300 voxels")


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
    regions = ("WT", "TC", "ET")
    assert record["chosen_on"] == "the val split: 2 patients" and tuple(record["candidates"]) == regions
    best = {r: max(c["lesion_dice_mean"] for c in record["candidates"][r]) for r in regions}
    assert record["lesion_dice_mean"] == pytest.approx(np.mean(list(best.values())))
    rows = list(csv.DictReader(open(run / "val_volumes.csv")))
    for region in regions:  # the val report is of the chosen rule
        assert np.mean([float(r[f"lesion_dice_{region}"]) for r in rows]) == pytest.approx(best[region])
    later = CliRunner().invoke(main, ["predict", str(run), str(small_cases / rows[0]["case_id"]), "--out",
                                      str(tmp_path / "out"), "--device", "cpu"])
    assert later.exit_code == 0 and f"the clean-up chosen for {run.name} on the val split" in later.output

"""Scores of whole volumes as the BraTS 2023 challenge computes them, the clean-up of predicted label volumes and its
choice, and the statistics reported over patients: numpy and scipy only, importable without torch (a test holds it
to that), so that anyone can score masks with the challenge's definitions.

- ``trainer.scoring.brats``: legacy and lesion-wise Dice and HD95 of one case (``score_case``), the one Dice
  (``dice_from_counts``) that training metrics use too;
- ``trainer.scoring.cleanup``: the clean-up rules, their choice on validation or out-of-fold patients, and
  ``rule_for``, the one conversion of ``--clean-up`` into a rule;
- ``trainer.scoring.statistics``: means over patients with BCa bootstrap intervals, paired differences.
"""

from trainer.scoring.brats import dice_from_counts, region_names, score_case
from trainer.scoring.cleanup import DEFAULT_CLEAN_UP, CleanUp, clean_up, rule_for
from trainer.scoring.statistics import paired_difference, summarise

__all__ = ["CleanUp", "DEFAULT_CLEAN_UP", "clean_up", "dice_from_counts", "paired_difference", "region_names",
           "rule_for", "score_case", "summarise"]

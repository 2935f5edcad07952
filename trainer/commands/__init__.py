"""The commands behind ``brats-train`` (``trainer.cli``): evaluate, predict, compare, cross-validate and export, and
the per-case tables they share (``tables``). Each is imported only when its command runs, so ``--help`` stays fast."""

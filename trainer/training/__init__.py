"""Training: the model and its checkpoints (``model``), the step and evaluation pass (``step``), the epoch loop
(``loop.fit``), run folders (``runs``), what a run logs and records (``history``), per-slice metrics (``metrics``),
pictures (``plots``), TensorBoard (``board``) and ranks (``distributed``). Imports data and scoring, never inference
or the commands."""

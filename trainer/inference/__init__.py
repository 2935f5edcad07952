"""Inference on whole volumes: a case read and written in its own space (``cases``), one network's pass over a
volume's slices (``slices``), and ``ensemble.Segmenter``, the one path every whole-volume command takes (an ensemble
of one run or many, mirrored or not, cleaned up by the lead run's rule); late fusion of single-modality models by
vote or mean (``fusion``). Imports data, training's model loader and scoring; nothing above it."""

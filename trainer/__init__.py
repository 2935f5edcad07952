"""brats2d trainer: 2D segmentation models that stream from the builder's HDF5 artifact.

Packages by workflow stage, each importing only from the stages before it (``tests/test_packaging.py`` holds them to
it): the base (``errors``, ``outputs``, ``tasks``, ``config``, ``device``), ``scoring`` (BraTS 2023 scores, clean-up,
statistics; no torch), ``data`` (the artifact, streaming, device-side inputs), ``training`` (model, step, loop,
runs), ``inference`` (whole volumes through ``Segmenter``), ``commands`` (evaluate, predict, compare,
cross-validate, export) and the CLI (``cli``, ``launch``).
"""

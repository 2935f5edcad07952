"""brats2d trainer: 2D segmentation models that stream from the builder's HDF5 artifact."""

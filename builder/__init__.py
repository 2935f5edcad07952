"""brats2d builder: BraTS case folders -> one chunked, checksummed HDF5 artifact (see datasets/FORMAT.md)."""

__version__ = "0.1.0"

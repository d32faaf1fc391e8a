"""indexcache: training-free IndexCache calibration for DSA sparse-attention models."""

__version__ = "0.2.0"

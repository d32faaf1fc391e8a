"""indexcache: training-free IndexCache calibration for DSA sparse-attention models."""

__version__ = "0.1.0"

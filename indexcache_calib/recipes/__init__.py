"""Recipes that produce the project's own assets.

- `build_data`: rebuilds `calibration_data/` (two domains of redistributable text).
- `train_tiny`: trains the tiny GlmMoeDsa checkpoints in `indexcache_calib/models/`.
"""

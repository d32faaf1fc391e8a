"""PNG plots written next to the layer map (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def calibration_plots(layer_map: dict, run_dir: Path) -> list[Path]:
    """Placeholder until the plotting module lands: writes nothing."""
    return []

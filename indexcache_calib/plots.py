"""PNG plots: loss against Full layers, the pattern strip, and the top-k overlap heatmap.

Figures are built with matplotlib's object API on the Agg canvas: no display, no pyplot global state.
Fixed sizes and no Software entry in the PNG metadata keep the files byte-identical for identical
inputs on one matplotlib version; each is written to a temp name and renamed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from indexcache_calib import artifact as art
from indexcache_calib.artifact import LOSS_PLOT, OVERLAP_PLOT, PATTERN_PLOT  # noqa: F401 (re-exported: diagnostics and tests read them here)

# matplotlib takes ~0.3 s to import: each drawing function imports it, so the modules that import this one
# for its file names (diagnostics) or that may skip the plots do not pay for it.

FULL_COLOUR, SHARED_COLOUR, FIXED_COLOUR, UNDECIDED_COLOUR = "#1f77b4", "#e8e8e8", "#9a9a9a", "#ff7f0e"
DPI = 120


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # deferred: slow import, see the note at the top

    # Constrained layout makes room for titles, labels and outside legends at any layer count.
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    art.atomic_write(path, buf.getvalue())
    return path


def _model_name(layer_map: dict) -> str:
    model = str(layer_map.get("provenance", {}).get("model", ""))
    return Path(model.rstrip("/")).name or model


def _layer_ticks(ax, n: int, axis: str = "x") -> None:
    # Every layer fits up to ~32; beyond that a tick every 5 or 10 keeps the labels readable.
    step = 1 if n <= 32 else 5 if n <= 80 else 10
    ticks = list(range(0, n, step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


def loss_plot(layer_map: dict, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator  # deferred: slow import, see the note at the top

    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    steps = sorted(layer_map["path"], key=lambda p: p["num_full"])
    ax.plot([p["num_full"] for p in steps], [p["loss"] for p in steps], marker="o", color=FULL_COLOUR,
            label="greedy search path")
    undecided = [p for p in steps if not p.get("decided", True)]
    if undecided:
        # Steps whose choice beat the runner-up by less than 2 paired standard errors: another draw of
        # calibration sequences could have flipped them.
        ax.scatter([p["num_full"] for p in undecided], [p["loss"] for p in undecided], marker="o", s=110,
                   facecolors="none", edgecolors=UNDECIDED_COLOUR, linewidths=1.6, zorder=3,
                   label="undecided step (< 2 paired SE over the runner-up)")
    ax.axhline(layer_map["loss"]["all_full"], color="#555555", linestyle=":", linewidth=1, label="all Full")
    for i, (ratio, u) in enumerate(sorted(layer_map.get("uniform", {}).items(), key=lambda kv: -kv[1]["num_full"])):
        ax.scatter([u["num_full"]], [u["loss"]], marker="s", s=50, color="#d62728", zorder=3,
                   label="uniform interleaving" if i == 0 else None)
        ax.annotate(f"uniform {ratio}", (u["num_full"], u["loss"]), textcoords="offset points", xytext=(6, 6),
                    fontsize=8, color="#d62728")
    chosen = layer_map["num_full"]
    ax.scatter([chosen], [layer_map["loss"]["final"]], marker="*", s=160, color=FULL_COLOUR, edgecolor="black",
               zorder=4, label=f"layer map ({chosen} Full)")
    ax.set_xlabel("Full layers (own indexer)")
    ax.set_ylabel("calibration loss (nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{_model_name(layer_map)}: loss vs Full layers ({layer_map['num_layers']} layers)", fontsize=10)
    return _save(fig, path)


def pattern_plot(layer_map: dict, path: Path) -> Path:
    # deferred: slow import, see the note at the top
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    pattern, n = layer_map["pattern"], layer_map["num_layers"]
    fixed = set(layer_map.get("fixed_shared_layers", []))
    codes = [[2 if i in fixed else 0 if c == "F" else 1 for i, c in enumerate(pattern)]]
    fig = _figure(max(6.0, min(16.0, 0.2 * n + 2)), 1.9)
    ax = fig.add_subplot()
    ax.imshow(codes, cmap=ListedColormap([FULL_COLOUR, SHARED_COLOUR, FIXED_COLOUR]), vmin=0, vmax=2,
              aspect="auto", interpolation="nearest")
    # Thin white separators so runs of equal layers still show their count; letters where they fit.
    for i in range(1, n):
        ax.axvline(i - 0.5, color="white", linewidth=0.6)
    if n <= 48:
        for i, c in enumerate(pattern):
            ax.text(i, 0, c, ha="center", va="center", fontsize=7, color="white" if codes[0][i] != 1 else "#444444")
    _layer_ticks(ax, n)
    ax.set_yticks([])
    ax.set_xlabel("layer")
    handles = [Patch(color=FULL_COLOUR, label="F (own indexer)"), Patch(facecolor=SHARED_COLOUR, edgecolor="#999999", label="S (reuses top-k)")]
    if fixed:
        handles.append(Patch(color=FIXED_COLOUR, label="S (no indexer weights)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(f"{_model_name(layer_map)}: {layer_map['num_full']} of {n} layers Full", fontsize=10)
    return _save(fig, path)


def calibration_plots(layer_map: dict, run_dir: Path) -> list[Path]:
    """The plots `calibrate` writes next to the layer map."""
    run_dir = Path(run_dir)
    return [loss_plot(layer_map, run_dir / LOSS_PLOT), pattern_plot(layer_map, run_dir / PATTERN_PLOT)]


def overlap_plot(matrix, layers: list[int], title: str, path: Path) -> Path:
    """Heatmap of the layer-by-layer top-k overlap; layers without an indexer (NaN) are drawn grey."""
    from matplotlib import colormaps  # deferred: slow import, see the note at the top

    n = len(layers)
    side = max(5.0, min(14.0, 0.18 * n + 3))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad=FIXED_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|T_i ∩ T_j| / k")
    if n <= 16:  # values are readable only on small matrices
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
    _layer_ticks(ax, n, "x")
    _layer_ticks(ax, n, "y")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)

"""IndexCache patterns: one char per absolute 0-based layer id, 'F' (full: runs its own indexer)
or 'S' (shared: reuses the top-k of the nearest preceding full layer). Pure functions, no torch."""

from __future__ import annotations

import math
from fractions import Fraction

from indexcache_calib.errors import CalibError, plural

FULL, SHARED = "F", "S"


def check_pattern(pattern: str, num_layers: int | None = None, fixed_shared: frozenset[int] = frozenset()) -> list[str]:
    """Every problem with `pattern`, as human-readable strings (empty list: valid)."""
    problems = []
    bad = sorted({c for c in pattern if c not in (FULL, SHARED)})
    if not pattern:
        problems.append("pattern is empty")
    if bad:
        problems.append(f"pattern may only contain 'F' and 'S', found {', '.join(repr(c) for c in bad)}")
    if pattern and pattern[0] != FULL:
        problems.append("layer 0 must be 'F': a shared layer needs a preceding full layer to read from")
    if num_layers is not None and len(pattern) != num_layers:
        problems.append(f"pattern has {plural(len(pattern), 'layer')}, the model has {num_layers}")
    for i in sorted(fixed_shared):
        if i < len(pattern) and pattern[i] == FULL:
            problems.append(f"layer {i} has no indexer weights in the checkpoint, so it must be 'S'")
    return problems


def validate_pattern(pattern: str, num_layers: int | None = None, fixed_shared: frozenset[int] = frozenset()) -> str:
    problems = check_pattern(pattern, num_layers, fixed_shared)
    if problems:
        raise CalibError(f"invalid pattern: {'; '.join(problems)}")
    return pattern


def full_layers(pattern: str, positions: list[int] | None = None) -> list[int]:
    """The full positions, as decoder layer ids when `positions` (the layer of each character) is given."""
    layer = positions or range(len(pattern))
    return [layer[i] for i, c in enumerate(pattern) if c == FULL]


def source_layers(pattern: str, positions: list[int] | None = None) -> list[int]:
    """For each position, the one whose selection it attends with: itself if full, else the nearest
    preceding full one; as decoder layer ids when `positions` is given."""
    layer = positions or range(len(pattern))
    sources, last = [], 0
    for i, c in enumerate(pattern):
        if c == FULL:
            last = i
        sources.append(layer[last])
    return sources


def indexer_types(pattern: str, positions: list[int] | None = None, num_layers: int | None = None) -> list[str]:
    """The per-decoder-layer list transformers and SGLang read. Layers that are not pattern positions
    (no indexer by architecture) read "full", the library's default for them: they never share."""
    if positions is None:
        return ["full" if c == FULL else "shared" for c in pattern]
    types = ["full"] * (num_layers if num_layers is not None else max(positions) + 1)
    for c, layer in zip(pattern, positions):
        types[layer] = "full" if c == FULL else "shared"
    return types


def flip(pattern: str, layer: int) -> str:
    return pattern[:layer] + SHARED + pattern[layer + 1 :]


def uniform_pattern(num_layers: int, every: int, fixed_shared: frozenset[int] = frozenset()) -> str:
    """Uniform interleaving as in the paper: one full layer every `every` layers, starting at layer 0."""
    return "".join(
        FULL if i % every == 0 and i not in fixed_shared else SHARED for i in range(num_layers)
    )


UNIFORM_EVERY = (2, 4, 8)  # the paper's ratios: uniform interleaving, and the path, are scored at each


def uniform_baselines(num_positions: int, fixed_shared: frozenset[int], num_full: int, runs,
                      ratios=UNIFORM_EVERY) -> dict[str, str]:
    """"1/N" -> the uniform interleaving a calibration scores as its baseline: those at the paper's ratios
    that keep at least `num_full` Full layers and that the library can run (`runs(pattern)` is None)."""
    out = {}
    for every in ratios:
        pattern = uniform_pattern(num_positions, every, fixed_shared)
        if num_positions >= every and pattern.count(FULL) >= num_full and runs(pattern) is None:
            out[f"1/{every}"] = pattern
    return out


def parse_ratio(spec: str) -> Fraction:
    """'1/4', '0.25' or '25%' -> Fraction; raises CalibError if it is not in (0, 1]."""
    text = spec.strip()
    try:
        if text.endswith("%"):
            value = Fraction(text[:-1]) / 100
        else:
            value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise CalibError(f"cannot read target {spec!r}", hint="use a fraction like 1/4, a decimal like 0.25, or --num-full N")
    if not 0 < value <= 1:
        raise CalibError(f"target {spec!r} must be a share of layers in (0, 1]", hint="e.g. --target 1/4")
    return value


def resolve_num_full(num_layers: int, target: str | None, num_full: int | None, fixed_shared: frozenset[int] = frozenset(),
                     fewest: int = 1) -> int:
    """Number of full layers the search stops at, of `num_layers` pattern positions. A ratio rounds up
    (1/4 of 47 layers -> 12, as in the paper). `fewest`: the least the model's library can run."""
    searchable = num_layers - len(fixed_shared)
    if (target is None) == (num_full is None):
        raise CalibError("give exactly one of --target and --num-full", hint="e.g. --target 1/4 or --num-full 12")
    if num_full is None:
        num_full = math.ceil(parse_ratio(target) * num_layers)
    if num_full < 1:
        raise CalibError(f"--num-full {num_full} is impossible: layer 0 always keeps its indexer, so at least 1 layer is full")
    if num_full < fewest:
        raise CalibError(
            f"target of {plural(num_full, 'full layer')} is impossible: the model's library runs no pattern with fewer than {fewest}",
            hint=f"choose at least {plural(fewest, 'full layer')}",
        )
    if num_full >= searchable:
        # All of them full is where the search starts: a target there has nothing to share.
        why = "is impossible" if num_full > searchable else "leaves nothing to share"
        has = plural(num_layers, "layer") + (f", {len(fixed_shared)} of them without indexer weights" if fixed_shared else "")
        most = searchable - 1
        raise CalibError(
            f"target of {plural(num_full, 'full layer')} {why}: the model has {has}",
            hint=f"choose at most {plural(most, 'full layer')}" if most >= max(1, fewest) else "this model has no layer to share",
        )
    return num_full

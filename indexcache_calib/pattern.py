"""IndexCache patterns: one char per absolute 0-based layer id, 'F' (full: runs its own indexer)
or 'S' (shared: reuses the top-k of the nearest preceding full layer). Pure functions, no torch."""

from __future__ import annotations

import json
import math
from fractions import Fraction

from indexcache_calib.errors import CalibError

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
        problems.append(f"pattern has {len(pattern)} layers, the model has {num_layers}")
    for i in sorted(fixed_shared):
        if i < len(pattern) and pattern[i] == FULL:
            problems.append(f"layer {i} has no indexer weights in the checkpoint, so it must be 'S'")
    return problems


def validate_pattern(pattern: str, num_layers: int | None = None, fixed_shared: frozenset[int] = frozenset()) -> str:
    problems = check_pattern(pattern, num_layers, fixed_shared)
    if problems:
        raise CalibError(f"invalid pattern: {'; '.join(problems)}")
    return pattern


def full_layers(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == FULL]


def source_layers(pattern: str) -> list[int]:
    """For each layer, the layer whose top-k it attends with: itself if full, else the nearest preceding full."""
    sources, last = [], 0
    for i, c in enumerate(pattern):
        if c == FULL:
            last = i
        sources.append(last)
    return sources


def indexer_types(pattern: str) -> list[str]:
    return ["full" if c == FULL else "shared" for c in pattern]


def flip(pattern: str, layer: int) -> str:
    return pattern[:layer] + SHARED + pattern[layer + 1 :]


def uniform_pattern(num_layers: int, every: int, fixed_shared: frozenset[int] = frozenset()) -> str:
    """Uniform interleaving as in the paper: one full layer every `every` layers, starting at layer 0."""
    return "".join(
        FULL if i % every == 0 and i not in fixed_shared else SHARED for i in range(num_layers)
    )


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


def resolve_num_full(num_layers: int, target: str | None, num_full: int | None, fixed_shared: frozenset[int] = frozenset()) -> int:
    """Number of full layers the search stops at. A ratio rounds up (1/4 of 47 layers -> 12, as in the paper)."""
    searchable = num_layers - len(fixed_shared)
    if (target is None) == (num_full is None):
        raise CalibError("give exactly one of --target and --num-full", hint="e.g. --target 1/4 or --num-full 12")
    if num_full is None:
        num_full = math.ceil(parse_ratio(target) * num_layers)
    if num_full < 1:
        raise CalibError(f"--num-full {num_full} is impossible: layer 0 always keeps its indexer, so at least 1 layer is full")
    if num_full > searchable:
        raise CalibError(
            f"target of {num_full} full layers is impossible: the model has {num_layers} layers"
            + (f", {len(fixed_shared)} of them without indexer weights" if fixed_shared else ""),
            hint=f"choose at most {searchable} full layers",
        )
    return num_full


def engine_overrides(pattern: str) -> dict:
    """Config overrides that every engine honours. Both keys are set because SGLang and transformers read
    `indexer_types` before `index_topk_pattern`, and checkpoints saved by transformers already carry
    `indexer_types`: a bare pattern would be silently ignored there."""
    return {"index_topk_pattern": pattern, "indexer_types": indexer_types(pattern)}


def engine_args(pattern: str) -> dict:
    overrides = json.dumps(engine_overrides(pattern), separators=(",", ":"))
    return {
        "vllm": {"flag": "--hf-overrides", "value": overrides, "args": f"--hf-overrides '{overrides}'"},
        "sglang": {"flag": "--json-model-override-args", "value": overrides, "args": f"--json-model-override-args '{overrides}'"},
    }

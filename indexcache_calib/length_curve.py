"""A pattern's cost across the lengths a deployment serves: the curve `indexcache evaluate --lengths`
measures, what a layer map carries of it (`LENGTH_CURVE`), and the minimum length it recommends for
index sharing where sharing costs more than a stated tolerance on shorter sequences.

Pure functions over evaluate's rows; the scoring itself is `diagnostics.evaluate`.
"""

from __future__ import annotations

import math

from indexcache_calib.errors import CalibError

LENGTH_CURVE = "length_curve"  # the layer map's key
DEFAULT_MAX_DELTA = 0.01  # nats over all-Full a user accepts from sharing (about 1% perplexity)

# Engines with a setting that turns index sharing off below a sequence length: the key each reads.
# SGLang's DeepSeek-V4 index-cache work (not merged upstream yet) reads it from the model config.
MIN_LENGTH_KEYS = {"sglang": "index_topk_min_seq_len"}
NO_MIN_LENGTH = {
    "vllm": "vLLM has no setting that turns index sharing off below a length",
    "transformers": "transformers has no setting that turns index sharing off below a length",
    "trtllm": "TensorRT-LLM has no setting that turns index sharing off below a length (its short-sequence "
              "skip bypasses the indexer itself, not the sharing)",
}


def parse_lengths(spec: str) -> list[int]:
    """'1024,2K,4k' -> [1024, 2048, 4096], sorted, without repeats."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            n = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            n = 0
        if n <= 0:
            raise CalibError(f"cannot read --lengths {spec!r}", hint="give token counts separated by commas, e.g. --lengths 1024,2048,4096 or 1K,2K,4K")
        out.append(n)
    return sorted(set(out))


def recommend(points: list[dict], max_delta: float) -> dict:
    """The shortest measured length from which the pattern's cost over all-Full stays within `max_delta`
    (point estimates) at every longer measured length. `min_seq_len` is None when none is needed (within
    at every length) and when none helps (over at the longest length)."""
    points = sorted(points, key=lambda p: p["seq_len"])
    lengths = [p["seq_len"] for p in points]
    over = [p for p in points if p["delta"] > max_delta]
    span = f"{lengths[0]:,}" if len(lengths) == 1 else f"{lengths[0]:,} to {lengths[-1]:,}"
    if not over:
        return {"min_seq_len": None, "max_delta": max_delta,
                "text": f"within {max_delta:g} nats of all-Full at every length measured ({span} tokens): no minimum length needed"}
    if over[-1] is points[-1]:
        return {"min_seq_len": None, "max_delta": max_delta,
                "text": f"costs {over[-1]['delta']:+.4f} nats at {lengths[-1]:,} tokens, the longest measured, more than "
                        f"{max_delta:g}: no minimum length brings it within; keep more layers Full"}
    first = lengths[lengths.index(over[-1]["seq_len"]) + 1]
    return {"min_seq_len": first, "max_delta": max_delta,
            "text": f"costs more than {max_delta:g} nats below {first:,} tokens (at {over[-1]['seq_len']:,}: "
                    f"{over[-1]['delta']:+.4f}): share indices from {first:,} tokens on"}


def points_of(rows: list[dict], name: str) -> list[dict]:
    """One entry's points, from evaluate's rows (one row per entry and length)."""
    keep = ("seq_len", "sequences", "loss", "delta", "paired_se", "mean_overlap", "layer_overlap")
    return [{k: r[k] for k in keep} for r in rows if r["name"] == name]


def curve(rows: list[dict], name: str, max_delta: float, data: dict) -> dict:
    """What a layer map carries: the entry's points, all-Full's and uniform's at each length, where they
    were measured (`data`: file, its sha256, seed, sequences), and the recommendation."""
    points = points_of(rows, name)
    for p in points:
        same = [r for r in rows if r["seq_len"] == p["seq_len"]]
        p["all_full_loss"] = next(r["loss"] for r in same if r["kind"] == "all-F")
        p["uniform"] = {r["name"].split()[-1]: r["delta"] for r in same if r["kind"] == "uniform"}
    return {**data, "points": points, "recommendation": recommend(points, max_delta)}


def check_max_delta(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise CalibError(f"--max-delta {value} is not a number of nats >= 0")
    return value


def engine_setting(lm: dict, engine: str) -> tuple[dict, str | None]:
    """The config keys that carry the layer map's recommended minimum length to `engine`, and a note for
    the user (None when the layer map carries no curve)."""
    rec = (lm.get(LENGTH_CURVE) or {}).get("recommendation")
    if not rec:
        return {}, None
    n = rec.get("min_seq_len")
    if n is None:
        return {}, f"length curve: {rec['text']}"
    if engine in MIN_LENGTH_KEYS:
        key = MIN_LENGTH_KEYS[engine]
        return {key: n}, (f"length curve: {rec['text']}; {key}={n} is read by SGLang's DeepSeek-V4 index-cache "
                          "work (not merged upstream): other builds ignore it")
    return {}, f"length curve: {rec['text']}; {NO_MIN_LENGTH[engine]}: serve sequences of at least {n:,} tokens with this pattern, or accept the cost"


def plot(rows: list[dict], path, title: str):
    """Each entry's loss over all-Full against the length, with its paired SE."""
    from indexcache_calib.plots import _figure, _save

    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["name"] for r in rows if r["kind"] != "all-F"):
        pts = [r for r in rows if r["name"] == name]
        ax.errorbar([p["seq_len"] for p in pts], [p["delta"] for p in pts],
                    yerr=[p["paired_se"] or 0.0 for p in pts], marker="o", capsize=3, label=name,
                    linestyle="--" if pts[0]["kind"] == "uniform" else "-")
    ax.axhline(0.0, color="#9a9a9a", linewidth=0.8)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("loss - all-Full (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)

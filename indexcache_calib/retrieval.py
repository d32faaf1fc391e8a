"""Retrieval results: from each pattern's per-probe scores to the rows `evaluate --retrieval` prints, the
breakdown by depth, and what a layer map records of them (`RETRIEVAL`, printed by `show`).

Pure functions; the probes are `probes.py`, the scoring `diagnostics.evaluate_retrieval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from indexcache_calib.stats import mean_se

RETRIEVAL = "retrieval"  # the layer map's key
DEPTH_BINS = 4  # the breakdown by depth: quarters of the haystack


@dataclass
class ProbeScores:
    """One pattern on one set of probes: per probe, its summed answer-token loss, answer length and exact match."""

    sums: list[float]
    lengths: list[int]
    exact: list[bool]


def depth_bin(depth: float) -> int:
    return min(DEPTH_BINS - 1, int(depth * DEPTH_BINS))


def _loss(s: ProbeScores, idx: list[int]) -> float:
    return math.fsum(s.sums[i] for i in idx) / sum(s.lengths[i] for i in idx)


def summarize(s: ProbeScores, ref: ProbeScores, idx: list[int]) -> dict:
    """Exact match and answer loss (mean over the answer tokens) of the probes `idx`, and their differences
    from `ref` (all-Full) with paired standard errors over those probes."""
    em = [float(s.exact[i]) for i in idx]
    em_diff = [float(s.exact[i]) - float(ref.exact[i]) for i in idx]
    scale = sum(s.lengths[i] for i in idx) / len(idx)  # per probe, its loss difference in the unit of the mean
    loss_diff = [(s.sums[i] - ref.sums[i]) / scale for i in idx]
    _, em_se = mean_se(em_diff)
    _, loss_se = mean_se(loss_diff)
    return {
        "probes": len(idx),
        "exact_match": math.fsum(em) / len(em),
        "exact_match_delta": math.fsum(em_diff) / len(em_diff),
        "exact_match_se": em_se,
        "answer_loss": _loss(s, idx),
        "delta": _loss(s, idx) - _loss(ref, idx),
        "paired_se": loss_se,
    }


def rows_for(entry: dict, probes, scores: ProbeScores, ref: ProbeScores, is_reference: bool) -> list[dict]:
    """One row per probe kind for one entry at one length, with its breakdown by depth. `entry`: the fields
    every evaluate row carries (name, kind, pattern, num_full)."""
    rows = []
    for kind in dict.fromkeys(p.kind for p in probes):
        idx = [i for i, p in enumerate(probes) if p.kind == kind]
        row = {**entry, "probe": kind, "seq_len": probes[idx[0]].seq_len, **summarize(scores, ref, idx)}
        if is_reference:
            row.update(exact_match_delta=None, exact_match_se=None, delta=None, paired_se=None)
        bins = []
        for b in range(DEPTH_BINS):
            sub = [i for i in idx if depth_bin(probes[i].depth) == b]
            if sub:
                bins.append({"depth": f"{b / DEPTH_BINS:.0%}-{(b + 1) / DEPTH_BINS:.0%}", "probes": len(sub),
                             "exact_match": sum(scores.exact[i] for i in sub) / len(sub), "answer_loss": _loss(scores, sub)})
        row["by_depth"] = bins
        rows.append(row)
    return rows


def record(rows: list[dict], name: str, meta: dict) -> dict:
    """What a layer map carries: the entry's rows, all-Full's exact match and answer loss beside each, uniform's
    exact match at the same length and kind, and how the probes were made (`meta`)."""
    points = []
    for r in rows:
        if r["name"] != name:
            continue
        same = [x for x in rows if x["seq_len"] == r["seq_len"] and x["probe"] == r["probe"]]
        ref = next(x for x in same if x["kind"] == "all-F")
        keep = ("probe", "seq_len", "probes", "exact_match", "exact_match_delta", "exact_match_se", "answer_loss",
                "delta", "paired_se", "by_depth")
        points.append({**{k: r[k] for k in keep}, "all_full_exact_match": ref["exact_match"],
                       "all_full_answer_loss": ref["answer_loss"],
                       "uniform_exact_match": {x["name"].split()[-1]: x["exact_match"] for x in same if x["kind"] == "uniform"}})
    return {**meta, "points": points}


def lines(rec: dict) -> list[str]:
    """`show`'s plain lines for a recorded retrieval result."""
    out = [f"retrieval (indexcache evaluate --retrieval on {rec.get('data')}, {rec.get('num_samples')} probes per kind "
           f"and length, seed {rec.get('seed')}):"]
    for p in rec["points"]:
        se = "" if p.get("exact_match_se") is None else f" ± {p['exact_match_se']:.2f}"
        uniform = ", ".join(f"uniform {k} {v:.2f}" for k, v in sorted(p.get("uniform_exact_match", {}).items()))
        out.append(f"  {p['seq_len']:,} tokens, {p['probe']}: exact match {p['exact_match']:.2f} "
                   f"(all-Full {p['all_full_exact_match']:.2f}, {p['exact_match_delta']:+.2f}{se}); answer loss "
                   f"{p['answer_loss']:.3f} ({p['delta']:+.3f} nats)" + (f"; {uniform}" if uniform else ""))
    return out

"""Benchmarks (`make bench`): every number is a ratio measured side by side in one run.

  python -m indexcache_calib.bench search      naive, exact, fast and race side by side on the trained models
  python -m indexcache_calib.bench draws       fast and race against exact (Algorithm 1's answer) over calibration draws
  python -m indexcache_calib.bench race        race against fast and exact on 64 calibration sequences
  python -m indexcache_calib.bench project     every search's work at the paper's scale (from the --dry-run estimates)
  python -m indexcache_calib.bench indexer     indexer peak memory, chunked vs unchunked, long sequence
  python -m indexcache_calib.bench parallel    candidate-parallel speedup, 2 processes vs 1
  python -m indexcache_calib.bench gpu         both searches on random DSA models on a GPU

Results are printed and written as JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path("outputs/bench")


def _save(name: str, data) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tokens(model_spec: str, data: str, seq_len: int, samples: int, seed: int = 0):
    from transformers import AutoTokenizer

    from indexcache_calib.data import pack, read_documents
    from indexcache_calib.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model_spec).location, local_files_only=True)
    return pack(read_documents(data, tok).texts, tok, seq_len, samples, seed)[0]


def _load(model_spec: str, device_map: str = "cpu"):
    from indexcache_calib.model import load_with_layout

    return load_with_layout(model_spec, device_map=device_map)


def compare_searches(model, layout, ids, heldout_ids, batch_size: int = 4, ratios=(2, 4, 8), label: str = "",
                     cache_device: str = "cpu", reference: str = "naive") -> dict:
    """Run `reference` and the fast search down to the smallest ratio on the same tokens and compare
    what they chose."""
    import torch

    from indexcache_calib.pattern import uniform_pattern
    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import greedy_search, paired, path

    n = layout.num_positions
    start = "F" * n
    floor = math.ceil(n / max(ratios))
    runs = {}
    for strategy in (reference, "fast"):
        runner = PatternRunner(model, layout, ids, batch_size=batch_size, measure_overlap=False,
                               cache_device="none" if strategy == "naive" else cache_device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        base, steps = greedy_search(start, floor, runner, layout.fixed_shared, search=strategy)
        wall = time.perf_counter() - t0
        runs[strategy] = {
            "steps": steps, "path": path(start, base.loss, steps), "wall_s": wall,
            "layer_forwards": runner.counters.layer_forwards, "patterns": runner.counters.patterns_scored,
            "peak_cache_bytes": runner.counters.peak_cache_bytes,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        runner.close()
        print(f"  {label} {strategy}: {wall:.1f}s, {runs[strategy]['layer_forwards']} layer-forwards", flush=True)
    held = PatternRunner(model, layout, heldout_ids, batch_size=batch_size, measure_overlap=False, cache_device="none")
    by_ratio = {}
    for r in ratios:
        k = math.ceil(n / r)
        pick = {s: next(p for p in runs[s]["path"] if p["num_full"] == k) for s in runs}
        uni = uniform_pattern(n, r, layout.fixed_shared)
        row = {"num_full": k, "identical": pick[reference]["pattern"] == pick["fast"]["pattern"]}
        scores = {}
        for s in runs:
            step = next(st for st in runs[s]["steps"] if st.pattern.count("F") == k)
            scores[s] = {"calib": step.scores[step.chosen], "heldout": held.score(pick[s]["pattern"])}
            row[f"{s}_pattern"] = pick[s]["pattern"]
            row[f"{s}_calib_loss"] = pick[s]["loss"]
            row[f"{s}_heldout_loss"] = scores[s]["heldout"].loss
        row["uniform_pattern"] = uni
        row["uniform_heldout_loss"] = held.score(uni).loss
        for split in ("calib", "heldout"):
            ref = row[f"{reference}_{split}_loss"]
            row[f"{split}_rel_diff"] = (row[f"fast_{split}_loss"] - ref) / ref
            # The paired standard error over sequences says whether such a difference is resolvable at all.
            se = paired(scores["fast"][split], scores[reference][split])[1]
            row[f"{split}_rel_se"] = se / ref if se is not None else None
        by_ratio[f"1/{r}"] = row
    # Where the fast search picked another layer from the same base, was the pick within one paired
    # standard error (over calibration sequences) of the best? Bases diverge after the first miss.
    misses = []
    for fs, ns in zip(runs["fast"]["steps"], runs[reference]["steps"]):
        if fs.base != ns.base:
            break
        if fs.chosen != ns.chosen:
            mean, se = paired(ns.scores[fs.chosen], ns.scores[ns.chosen])
            misses.append({"step": fs.step, "fast": fs.chosen, reference: ns.chosen, "loss_gap": mean, "paired_se": se,
                           "within_one_se": se is not None and mean <= se})
    summary = {
        "layers": n, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "heldout_sequences": int(heldout_ids.shape[0]),
        "forwards_ratio": runs["fast"]["layer_forwards"] / runs[reference]["layer_forwards"],
        "wall_ratio": runs["fast"]["wall_s"] / runs[reference]["wall_s"],
        "ratios": by_ratio, "misses_before_divergence": misses, "reference": reference,
    }
    for s in runs:
        summary[s] = {k: v for k, v in runs[s].items() if k not in ("steps", "path")}
        summary[s]["path"] = runs[s]["path"]
    return summary


SEARCH_CASES = {"tiny-dsa": (8, 512), "tiny-dsa-deep": (4, 256)}  # model: (sequences, tokens each)


SEARCH_ORDER = ("naive", "exact", "fast", "race")


def bench_search(args) -> None:
    """Every search on the same calibration tokens, side by side in one process, down to 1/8: tokens
    through decoder layers and wall time as ratios, and each search's patterns against exact's."""
    device = "cuda:0" if args.device == "cuda" else "cpu"
    for spec in args.models:
        samples, seq = SEARCH_CASES[spec]
        model, layout = _load(spec, device_map=device)
        n = layout.num_layers
        floor = math.ceil(n / max(RATIOS))
        ids = _tokens(spec, args.data, seq, samples)
        runs = {}
        for strategy in SEARCH_ORDER:
            runs[strategy] = _run(strategy, model, layout, ids, floor, device=device)
            print(f"  {spec} {strategy}: {runs[strategy]['wall_s']:.0f}s, {runs[strategy]['tokens']:,} tokens", flush=True)
        result = {"model": spec, "device": device, "layers": n, "sequences": samples, "seq_len": seq, "searches": {}}
        for strategy, run in runs.items():
            row = compare_to_exact(runs["exact"], run, n)
            row.update({k: run[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")})
            row.update({"tokens_vs_naive": run["tokens"] / runs["naive"]["tokens"], "tokens_vs_exact": run["tokens"] / runs["exact"]["tokens"],
                        "wall_vs_naive": run["wall_s"] / runs["naive"]["wall_s"]})
            result["searches"][strategy] = row
        result["exact_undecided_steps"] = _undecided(runs["exact"])
        result["exact_steps"] = len(runs["exact"]["steps"])
        # exact is Algorithm 1 with prefix reuse: the same steps and losses as naive's, bit for bit.
        result["exact_steps_equal_naive"] = runs["exact"]["steps"] == runs["naive"]["steps"]
        _save(f"search_{spec}", result)  # one file per model: a long run keeps what it finished
        del model
    print_search({spec: json.loads((OUT / f"search_{spec}.json").read_text())
                  for spec in SEARCH_CASES if (OUT / f"search_{spec}.json").exists()})


def print_search(results: dict) -> None:
    print("\n| model | device | calibration tokens | search | tokens through decoder layers | vs naive | vs exact | wall | wall vs naive "
          "| same F-set as exact 1/2, 1/4, 1/8 | loss gap vs exact ± paired SE (1/2; 1/4; 1/8) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, r in results.items():
        for name in SEARCH_ORDER:
            s = r["searches"][name]
            same = ", ".join("yes" if row["identical"] else "no" for row in s["ratios"].values())
            gaps = "; ".join(f"{row['gap']:+.5f} ± {row['gap_se'] or 0:.5f}" for row in s["ratios"].values())
            print(f"| {spec} | {r['device']} | {r['sequences']}x{r['seq_len']} | {name} | {s['tokens']:,} | {s['tokens_vs_naive']:.3f} | "
                  f"{s['tokens_vs_exact']:.3f} | {s['wall_s']:.0f} s | {s['wall_vs_naive']:.3f} | {same} | {gaps} |")
    for spec, r in results.items():
        print(f"{spec}: exact's steps equal naive's: {'yes' if r['exact_steps_equal_naive'] else 'NO'}; "
              f"{len(r['exact_undecided_steps'])} of {r['exact_steps']} steps undecided (< 2 paired SE): {r['exact_undecided_steps']}")


# -- calibration draws ---------------------------------------------------------------------

def _run(strategy: str, model, layout, ids, floor: int, batch_size: int = 1, device: str = "cpu", **search_opts) -> dict:
    """One greedy search from all-F down to `floor` full layers, with the work the runner counted."""
    from dataclasses import asdict

    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import greedy_search

    runner = PatternRunner(model, layout, ids, batch_size=batch_size, measure_overlap=False,
                           cache_device="none" if strategy == "naive" else "gpu" if device.startswith("cuda") else "cpu")
    t0 = time.perf_counter()
    base, steps = greedy_search("F" * layout.num_layers, floor, runner, layout.fixed_shared, search=strategy, **search_opts)
    wall = time.perf_counter() - t0
    counters = runner.counters
    runner.close()
    return {"strategy": strategy, "base": asdict(base), "steps": [s.to_json() for s in steps], "wall_s": wall,
            "layer_forwards": counters.layer_forwards, "tokens": counters.tokens, "patterns": counters.patterns_scored}


def _cached_run(spec: str, model, layout, ids, floor: int, strategy: str, name: str | None = None,
                fresh: bool = False, **search_opts) -> dict:
    """`_run`, kept under outputs/bench/ keyed by the tokens' sha256 and the search's name, so a rerun with
    another setting reuses every search it already ran (their tokens and decisions do not depend on when
    they ran; their wall times are marked as from an earlier run). Exact's runs are the references every
    cheaper search is compared with, so they live in outputs/bench/exact/."""
    from indexcache_calib.data import tokens_sha256

    sha = tokens_sha256(ids)
    stem = f"{spec}_{ids.shape[0]}x{ids.shape[1]}_{sha[:16]}"
    name = name or strategy
    path = OUT / "exact" / f"{stem}.json" if name == "exact" else \
        OUT / "runs" / f"{stem}_{''.join(c if c.isalnum() or c in '.-' else '_' for c in name)}.json"
    if path.exists() and not fresh:
        data = json.loads(path.read_text())
        if data.get("tokens_sha256") == sha and data.get("floor") == floor:
            return data
    data = _run(strategy, model, layout, ids, floor, **search_opts)
    data.update({"tokens_sha256": sha, "floor": floor, "model": spec})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True) + "\n")
    return {**data, "ran_here": True}


def _reference(spec: str, model, layout, ids, floor: int, fresh: bool = False) -> dict:
    """Algorithm 1's search (`exact`) on these tokens, computed once per draw (see `_cached_run`)."""
    return _cached_run(spec, model, layout, ids, floor, "exact", fresh=fresh)


class OffPath(Exception):
    """A replayed search asked for a pattern the recorded search never scored."""


class TraceEvaluator:
    """An evaluator that answers from a recorded `exact` search (every candidate of every step, with
    per-sequence losses): other searches can be replayed on it for as long as they stay on its path.
    It counts layer-forwards as the runner does: a candidate runs from its flipped layer, a candidate is
    never run again on sequences it was scored on in the same step (the runner keeps what each round
    computed, within its cache), and committing a candidate costs only the sequences it was not yet scored on."""

    def __init__(self, trace: dict, num_layers: int, batch_size: int = 1):
        from indexcache_calib.pattern import flip
        from indexcache_calib.search import Score, Step

        self.num_layers, self.batch_size = num_layers, batch_size
        base = Score(**trace["base"])
        self.scores = {"F" * num_layers: base}
        for d in trace["steps"]:
            s = Step.from_json(d)
            self.scores.update({flip(s.base, c): sc for c, sc in s.scores.items()})
        self.num_sequences = len(base.seq_losses)
        self.num_batches = math.ceil(self.num_sequences / batch_size)
        self.layer_forwards, self.base = 0, None
        self._seen: dict[str, set[int]] = {}  # this step's candidates: the sequences each was scored on

    def _restart(self, pattern: str) -> int:
        if self.base is None:
            return 0
        diff = [i for i, (a, b) in enumerate(zip(self.base, pattern)) if a != b]
        return diff[0] if len(diff) == 1 else 0

    def _lookup(self, pattern: str):
        if pattern not in self.scores:
            raise OffPath(pattern)
        return self.scores[pattern]

    def _charge(self, pattern: str, start: int, ids) -> None:
        seen = self._seen.setdefault(pattern, set()) if start else set()
        new = [i for i in ids if i not in seen]
        seen.update(new)
        self.layer_forwards += (self.num_layers - start) * len(new)

    def set_base(self, pattern: str):
        sc = self._lookup(pattern)
        self._charge(pattern, self._restart(pattern), range(self.num_sequences))
        self.base, self._seen = pattern, {}
        return sc

    def score(self, pattern: str, batches=None):
        from indexcache_calib.search import Score

        sc = self._lookup(pattern)
        start = self._restart(pattern)
        if batches is None:
            self._charge(pattern, start, range(self.num_sequences))
            return sc
        ids = [i for b in batches for i in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_sequences))]
        self._charge(pattern, start, ids)
        losses = [sc.seq_losses[i] for i in ids]
        return Score(math.fsum(losses) / len(losses), losses)


def replay(trace: dict, num_layers: int, strategy: str, **search_opts) -> dict:
    """Replay `strategy` on a recorded exact search: its decisions while it stays on the recorded path,
    the first step where it leaves it, and the layer-forwards it would have done."""
    from indexcache_calib.search import greedy_search

    ev = TraceEvaluator(trace, num_layers)
    steps: list = []
    try:
        greedy_search("F" * num_layers, trace["floor"], ev, search=strategy, on_step=steps.append, **search_opts)
        left = None
    except OffPath:
        left = len(steps) + 1
    return {"steps": steps, "left_path_at": left, "layer_forwards": ev.layer_forwards}


RATIOS = (2, 4, 8)


def compare_to_exact(ref: dict, run: dict, num_layers: int) -> dict:
    """A search's path against Algorithm 1's (`exact`) on the same tokens: where it first chose another
    layer and whether exact's choice there was decided (>= 2 paired SE over its runner-up), and at 1/2,
    1/4 and 1/8 whether the F-sets are the same and the calibration loss gap (this search minus exact,
    both scored on every sequence) with its paired standard error."""
    from indexcache_calib.search import Step, paired

    exact = [Step.from_json(d) for d in ref["steps"]]
    steps = [Step.from_json(d) for d in run["steps"]]
    fork = next((i for i, (a, b) in enumerate(zip(steps, exact)) if a.chosen != b.chosen), None)
    out: dict = {"fork": None, "ratios": {}}
    if fork is not None:
        c = exact[fork].confidence
        out["fork"] = {"step": fork + 1, "chosen": steps[fork].chosen, "exact_chosen": exact[fork].chosen,
                       "exact_runner_up": c.runner_up, "exact_gap": c.gap, "exact_gap_se": c.se,
                       "exact_decided": c.decided}
    for r in RATIOS:
        k = math.ceil(num_layers / r)
        e = next(s for s in exact if s.pattern.count("F") == k)
        g = next(s for s in steps if s.pattern.count("F") == k)
        gap, se = paired(g.scores[g.chosen], e.scores[e.chosen])
        same = g.pattern == e.pattern
        out["ratios"][f"1/{r}"] = {
            "num_full": k, "identical": same, "pattern": g.pattern, "exact_pattern": e.pattern,
            "loss": g.loss, "exact_loss": e.loss, "gap": gap, "gap_se": se, "rel_gap": gap / e.loss,
            "within_one_se": gap <= (se or 0.0),
            # A different F-set is acceptable only where the paths parted at a step exact did not decide.
            "forked_undecided": same or (fork is not None and fork < e.step and not out["fork"]["exact_decided"]),
        }
    out["meets_bar"] = all(row["forked_undecided"] and row["within_one_se"] for row in out["ratios"].values())
    return out


def bench_draws(args) -> None:
    """Cheaper searches against Algorithm 1's answer on several random draws of calibration sequences.

    One draw is one greedy path, and near-ties make paths fork, so a single comparison says little. The
    reference is `exact`, Algorithm 1 bit for bit (tested); its runs are kept under outputs/bench/exact/
    keyed by the tokens' sha256 and reused by later invocations (cost is counted in layer-forwards, which
    do not depend on when a search ran). Naive's layer-forwards are counted from the config: they do not
    depend on the picks.
    """
    from indexcache_calib.dryrun import search_work

    spec = args.model
    seq = args.seq_len or SEARCH_CASES[spec][1]
    model, layout = _load(spec)
    n = layout.num_layers
    floor = math.ceil(n / max(RATIOS))
    for samples in args.samples:
        for seed in args.seeds:
            ids = _tokens(spec, args.data, seq, samples, seed=seed)
            ref = _reference(spec, model, layout, ids, floor)
            naive = search_work(n, layout.fixed_shared, floor, "naive", int(ids.shape[0]))["layer_forwards"]
            result = {"model": spec, "layers": n, "sequences": int(ids.shape[0]), "seq_len": seq, "seed": seed,
                      "tokens_sha256": ref["tokens_sha256"], "naive_layer_forwards": naive,
                      "exact": {k: ref[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")},
                      "exact_undecided_steps": _undecided(ref), "exact_steps": len(ref["steps"]), "searches": {}}
            searches = [(s, s, {}) for s in args.strategies] + tolerance_races(args.tolerance)
            for strategy, kind, opts in searches:
                run = _run(kind, model, layout, ids, floor, **opts)
                row = compare_to_exact(ref, run, n)
                row.update({k: run[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")})
                row.update({"vs_exact": run["layer_forwards"] / ref["layer_forwards"], "vs_naive": run["layer_forwards"] / naive,
                            "candidate_sequences": sum(len(sc["seq_losses"]) for st in run["steps"] for sc in st["scores"].values())})
                result["searches"][strategy] = row
                print(f"  {spec} {samples}x{seq} draw {seed}: {strategy} {row['vs_exact']:.3f} of exact's layer-forwards, "
                      f"{'meets' if row['meets_bar'] else 'MISSES'} the bar", flush=True)
            _save(f"draws_{spec}_{samples}x{seq}_seed{seed}", result)
    print_draws(spec, args.samples, seq, args.seeds)


def _undecided(ref: dict) -> list[int]:
    from indexcache_calib.search import Step

    return [s.step for s in map(Step.from_json, ref["steps"]) if not s.confidence.decided]


def print_draws(spec: str, samples_list, seq: int, seeds) -> None:
    rows = []
    for samples in samples_list:
        for seed in seeds:
            f = OUT / f"draws_{spec}_{samples}x{seq}_seed{seed}.json"
            if f.exists():
                rows.append(json.loads(f.read_text()))
    print(f"\n{spec}: searches against Algorithm 1 (exact) on calibration draws; loss gaps are this search minus exact, "
          "relative, ± the paired standard error, calibration sequences")
    print("| sequences | draw | exact undecided steps | search | layer-forwards vs exact | vs naive | same F-set 1/2, 1/4, 1/8 "
          "| 1/2 | 1/4 | 1/8 | first fork (exact's margin there) | meets the bar |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, s in r["searches"].items():
            same = ", ".join("yes" if row["identical"] else "no" for row in s["ratios"].values())
            cells = " | ".join(f"{row['rel_gap']:+.3%} ± {(row['gap_se'] or 0) / row['exact_loss']:.3%}" for row in s["ratios"].values())
            f = s["fork"]
            fork = "none" if f is None else (
                f"step {f['step']}: {f['chosen']} for {f['exact_chosen']} ("
                + ("decided" if f["exact_decided"] else "undecided") + (f", {f['exact_gap'] / f['exact_gap_se']:.2f} SE" if f["exact_gap_se"] else "") + ")")
            print(f"| {r['sequences']} | {r['seed']} | {len(r['exact_undecided_steps'])} of {r['exact_steps']} | {name} | "
                  f"{s['vs_exact']:.3f} | {s['vs_naive']:.3f} | {same} | {cells} | {fork} | {'yes' if s['meets_bar'] else 'NO'} |")
    names = sorted({name for r in rows for name in r["searches"]})
    print(f"\n{spec}, summary: every search against exact, per number of calibration sequences")
    print("| sequences | search | draws | same F-set at 1/2, 1/4 and 1/8 | meets the bar | layer-forwards vs exact (min-max) | vs naive (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for samples in samples_list:
        for name in names:
            runs = [r["searches"][name] for r in rows if r["sequences"] == samples and name in r["searches"]]
            if not runs:
                continue
            same = sum(all(row["identical"] for row in s["ratios"].values()) for s in runs)
            ex, nv = [s["vs_exact"] for s in runs], [s["vs_naive"] for s in runs]
            print(f"| {samples} | {name} | {len(runs)} | {same} of {len(runs)} | {sum(s['meets_bar'] for s in runs)} of {len(runs)} | "
                  f"{min(ex):.2f}-{max(ex):.2f} | {min(nv):.2f}-{max(nv):.2f} |")
    for name in names:
        runs = [r["searches"][name] for r in rows if name in r["searches"]]
        met = sum(s["meets_bar"] for s in runs)
        ratio = sum(s["layer_forwards"] for s in runs) / sum(r["exact"]["layer_forwards"] for r in rows if name in r["searches"])
        naive = sum(s["layer_forwards"] for s in runs) / sum(r["naive_layer_forwards"] for r in rows if name in r["searches"])
        print(f"{name}: meets the bar on {met} of {len(runs)} draws; layer-forwards {ratio:.3f} of exact's, {naive:.3f} of naive's (summed over draws)")


# -- racing over calibration sequences ------------------------------------------------------------

RACE_CASE = ("tiny-dsa", 64, 512)  # model, sequences, tokens each
RACE_HELDOUT = 32  # held-out sequences each searched pattern is scored on


def tolerance_races(tolerances) -> list[tuple[str, str, dict]]:
    """(name, strategy, search options) of a race with each tolerance (nats per step, or "auto")."""
    from indexcache_calib.search import Race

    return [(f"race, tolerance {t}", "race", {"race": Race(tolerance=t)}) for t in tolerances]


def _tolerance(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _race_name(spec: str, samples: int, seq: int, seed: int) -> str:
    return f"race_{spec}_{samples}x{seq}" + (f"_seed{seed}" if seed else "")


def bench_race(args) -> None:
    """Racing against the default (fast) search and Algorithm 1 (exact) on many calibration sequences,
    down to 1/8: tokens through decoder layers, and the decisions and losses against exact's, on the
    calibration sequences and on held-out ones. The race runs as Algorithm 1's guarantee (no tolerance)
    and with each `--tolerance`."""
    from indexcache_calib.search import Step, race_summary

    spec = RACE_CASE[0]
    samples = args.samples or RACE_CASE[1]
    seq = args.seq_len or RACE_CASE[2]
    model, layout = _load(spec)
    n = layout.num_layers
    floor = math.ceil(n / max(RATIOS))
    ids = _tokens(spec, args.data, seq, samples, seed=args.seed)
    ref = _reference(spec, model, layout, ids, floor, fresh=args.fresh)
    result = {"model": spec, "layers": n, "sequences": samples, "seq_len": seq, "seed": args.seed,
              "exact": {k: ref[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")},
              "exact_ran_here": bool(ref.get("ran_here")), "exact_undecided_steps": _undecided(ref),
              "exact_steps": len(ref["steps"]), "searches": {}}
    searches = [("fast", "fast", {}), *([("race", "race", {})] if not args.no_plain_race else []),
                *tolerance_races(args.tolerance)]
    for name, strategy, opts in searches:
        run = _cached_run(spec, model, layout, ids, floor, strategy, name, fresh=args.fresh, **opts)
        row = compare_to_exact(ref, run, n)
        steps = [Step.from_json(d) for d in run["steps"]]
        used = [len(sc.seq_losses) for st in steps for sc in st.scores.values()]
        row.update({k: run[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")})
        row["ran_here"] = bool(run.get("ran_here"))
        row.update({"vs_exact": run["tokens"] / ref["tokens"], "candidates_scored": len(used),
                    "candidate_sequences": sum(used), "candidates_on_every_sequence": sum(u == samples for u in used)})
        if strategy == "race":
            row["shares"] = race_shares(steps, run["layer_forwards"], n, samples)
        if "race" in opts:
            row["tolerance"] = race_summary(steps, opts["race"])
        result["searches"][name] = row
        print(f"  {spec} {samples}x{seq}: {name} {run['wall_s']:.0f}s, {row['vs_exact']:.3f} of exact's tokens", flush=True)
    fast = result["searches"]["fast"]
    for s in result["searches"].values():
        s["vs_fast_tokens"], s["vs_fast_wall"] = s["tokens"] / fast["tokens"], s["wall_s"] / fast["wall_s"]
    result["heldout"] = _race_heldout(model, layout, args.heldout, seq, ref, result, n)
    result["race_settings"] = race_settings(ref, n, fast["layer_forwards"])
    _save(_race_name(spec, samples, seq, args.seed), result)
    print_race(result)


def race_shares(steps, layer_forwards: int, num_layers: int, samples: int) -> dict:
    """What `dryrun.search_work` models a race with, measured on one: the mean sequences a candidate that did
    not run to the end used, how many per step ran through every sequence (the winner included), and the
    layer-forwards beyond the candidates' own and the all-Full base (each step's cache refresh and any winner
    re-run), per step, in units of the winner's full run."""
    short = [len(sc.seq_losses) for st in steps for sc in st.scores.values() if len(sc.seq_losses) < samples]
    whole = sum(len(sc.seq_losses) == samples for st in steps for sc in st.scores.values())
    own = sum((num_layers - c) * len(sc.seq_losses) for st in steps for c, sc in st.scores.items())
    winner_runs = sum((num_layers - st.chosen) * samples for st in steps)
    return {"dropped_mean_sequences": sum(short) / len(short) if short else None,
            "finalists_per_step": whole / len(steps),
            "extra_per_step": (layer_forwards - num_layers * samples - own) / winner_runs}


def _race_heldout(model, layout, heldout: str, seq: int, ref: dict, result: dict, n: int) -> dict:
    """Each search's F-sets at 1/2, 1/4 and 1/8 scored on held-out sequences: loss gap to exact's, with
    the paired SE over those sequences (the same pattern gives exactly 0)."""
    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import Step, paired

    ids = _tokens(RACE_CASE[0], heldout, seq, RACE_HELDOUT)
    runner = PatternRunner(model, layout, ids, measure_overlap=False, cache_device="none")
    cache: dict = {}

    def score(pattern: str):
        if pattern not in cache:
            cache[pattern] = runner.score(pattern)
        return cache[pattern]

    exact = {s.pattern.count("F"): s.pattern for s in map(Step.from_json, ref["steps"])}
    out = {"data": heldout, "sequences": int(ids.shape[0]), "seq_len": seq, "searches": {}}
    for name, s in result["searches"].items():
        rows = {}
        for ratio, row in s["ratios"].items():
            mine, theirs = score(row["pattern"]), score(exact[row["num_full"]])
            gap, se = paired(mine, theirs)
            rows[ratio] = {"loss": mine.loss, "exact_loss": theirs.loss, "gap": gap, "gap_se": se,
                           "within_one_se": gap <= (se or 0.0)}
        out["searches"][name] = rows
    out["all_full_loss"] = score("F" * n).loss
    runner.close()
    return out


RACE_SETTINGS = [(alpha, first) for alpha in (0.05, 0.2, 0.4) for first in (2, 4, 8)]


def race_settings(ref: dict, num_layers: int, fast_layer_forwards: int) -> list[dict]:
    """The race replayed on exact's recorded trace at other settings (--race-alpha, --race-first): how its
    cost moves with the error bound. A replay stays valid while the race keeps exact's choices."""
    from indexcache_calib.search import Race

    rows = []
    for alpha, first in RACE_SETTINGS:
        r = replay(ref, num_layers, "race", race=Race(alpha, first))
        rows.append({"alpha": alpha, "first": first, "left_exact_path_at": r["left_path_at"],
                     "vs_exact": r["layer_forwards"] / ref["layer_forwards"], "vs_fast": r["layer_forwards"] / fast_layer_forwards})
    return rows


def print_race(r: dict) -> None:
    print(f"\n{r['model']}, {r['sequences']}x{r['seq_len']} calibration tokens (draw {r['seed']}), down to 1/8; "
          f"exact left {len(r['exact_undecided_steps'])} of {r['exact_steps']} steps undecided: {r['exact_undecided_steps']}")
    print("| search | tokens through decoder layers | vs exact | vs fast | wall vs fast | candidates scored | on every sequence "
          "| steps ended by the tolerance | same F-set 1/2, 1/4, 1/8 | calibration loss gap vs exact ± paired SE (1/2; 1/4; 1/8) "
          "| first fork | meets the bar |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| exact | {r['exact']['tokens']:,} | 1.000 | | {r['exact']['wall_s'] / r['searches']['fast']['wall_s']:.2f}"
          f"{'' if r['exact_ran_here'] else ' (earlier run)'} | | | | | | | |")
    for name, s in r["searches"].items():
        same = ", ".join("yes" if row["identical"] else "no" for row in s["ratios"].values())
        gaps = "; ".join(f"{row['gap']:+.5f} ± {row['gap_se'] or 0:.5f}" for row in s["ratios"].values())
        f = s["fork"]
        fork = "none" if f is None else f"step {f['step']} ({'decided' if f['exact_decided'] else 'undecided'} in exact)"
        ended = f"{s['tolerance']['steps_ended_early']} of {len(s['tolerance']['steps'])}" if "tolerance" in s else ""
        print(f"| {name} | {s['tokens']:,} | {s['vs_exact']:.3f} | {s['vs_fast_tokens']:.3f} | {s['vs_fast_wall']:.2f}{'' if s.get('ran_here', True) else ' (earlier run)'} | "
              f"{s['candidates_scored']} | {s['candidates_on_every_sequence']} | {ended} | {same} | {gaps} | {fork} | "
              f"{'yes' if s['meets_bar'] else 'NO'} |")
    for name, s in r["searches"].items():
        if "shares" in s:
            sh = s["shares"]
            print(f"{name}: a candidate stopped early used {sh['dropped_mean_sequences'] or 0:.1f} of {r['sequences']} sequences "
                  f"on average; {sh['finalists_per_step']:.2f} per step ran through every sequence; other work "
                  f"{sh['extra_per_step']:.2f} of a winner's run per step")
    h = r.get("heldout")
    if h:
        print(f"\nOn {h['sequences']} held-out sequences of {h['seq_len']} tokens ({h['data']}; all-Full {h['all_full_loss']:.5f}): "
              "loss gap vs exact's F-set ± paired SE")
        print("| search | 1/2 | 1/4 | 1/8 | within one SE at every ratio |")
        print("|---|---|---|---|---|")
        for name, rows in h["searches"].items():
            cells = " | ".join(f"{row['gap']:+.5f} ± {row['gap_se'] or 0:.5f}" for row in rows.values())
            print(f"| {name} | {cells} | {'yes' if all(row['within_one_se'] for row in rows.values()) else 'NO'} |")
    print("\nThe race replayed on exact's trace at other settings, no tolerance (layer-forwards; 'left' is the first "
          "step where it chose otherwise)")
    print("| --race-alpha | --race-first | vs exact | vs fast | left exact's path |")
    print("|---|---|---|---|---|")
    for row in r.get("race_settings", []):
        print(f"| {row['alpha']} | {row['first']} | {row['vs_exact']:.3f} | {row['vs_fast']:.3f} | {row['left_exact_path_at'] or 'never'} |")


# -- projection ------------------------------------------------------------------------------------

PAPER_SCALE = {"layers": (47, 61, 78), "sequences": 768, "seq_len": 200_000, "target": 4}


def bench_project(args) -> None:
    """Tokens through decoder layers of every search at the paper's scale, from the same estimates as
    `calibrate --dry-run` (naive's count is exact; the others are typical counts)."""
    from indexcache_calib.dryrun import RACE_BASIS, search_work

    columns = [(name, name, None) for name in SEARCH_ORDER] + [("race, tolerance auto", "race", "auto")]
    rows = []
    for n in PAPER_SCALE["layers"]:
        num_full = math.ceil(n / PAPER_SCALE["target"])
        row = {"layers": n, "num_full": num_full, "sequences": PAPER_SCALE["sequences"], "seq_len": PAPER_SCALE["seq_len"]}
        for name, search, tolerance in columns:
            w = search_work(n, frozenset(), num_full, search, PAPER_SCALE["sequences"], tolerance=tolerance)
            row[name] = w.get("layer_forwards", w.get("layer_forwards_typical")) * PAPER_SCALE["seq_len"]
        rows.append(row)
    _save("project", rows)
    print(f"\nTokens through decoder layers from all-F to 1/{PAPER_SCALE['target']}, {PAPER_SCALE['sequences']} sequences of "
          f"{PAPER_SCALE['seq_len']:,} tokens (naive: exact count; others: typical, as --dry-run estimates them)")
    print("| layers | Full at the end | " + " | ".join(name for name, _, _ in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = " | ".join(f"{r[name]:.3g} ({r[name] / r['naive']:.3f})" for name, _, _ in columns)
        print(f"| {r['layers']} | {r['num_full']} | {cells} |")
    print(f"race's numbers: {RACE_BASIS}")


# -- indexer memory --------------------------------------------------------------------------

def _indexer_child(seq: int, chunk: int | None, heads: int) -> None:
    """One indexer call at `seq` tokens in a fresh process; prints the peak memory it added."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    from indexcache_calib.families import GLM_CHUNKS
    from indexcache_calib.sharing import run_indexer
    from indexcache_calib.testing import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("glm", layers=1, hidden=128, index_topk=256, index_n_heads=heads, index_head_dim=64,
                      max_position_embeddings=seq)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    indexer = model.model.layers[0].self_attn.indexer
    with torch.no_grad():
        hs = torch.randn(1, seq, cfg.hidden_size)
        q_resid = torch.randn(1, seq, cfg.q_lora_rank)
        pos = torch.arange(seq).unsqueeze(0)
        cos, sin = model.model.rotary_emb(hs, pos)
        mask = torch.full((seq, seq), float("-inf")).triu_(1).unsqueeze(0)  # in place: no setup peak above the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        idx = run_indexer(indexer, (hs, q_resid, (cos, sin), mask, pos), {}, GLM_CHUNKS, 0 if chunk is None else chunk)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_added_bytes": (after - before) * 1024, "wall_s": wall,
                      "indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest()}))


def bench_indexer(args) -> None:
    rows = {}
    for chunk in (None, 1024, 256):
        cmd = [sys.executable, "-m", "indexcache_calib.bench", "_indexer-child", "--seq", str(args.seq), "--heads", str(args.heads)]
        if chunk:
            cmd += ["--chunk", str(chunk)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[str(chunk or "none")] = json.loads(p.stdout.strip().splitlines()[-1])
    whole = rows["none"]
    theory = args.heads * args.seq * args.seq * 4
    result = {"seq_len": args.seq, "index_heads": args.heads, "fp32_scores_unchunked_bytes": theory, "runs": rows}
    _save("indexer", result)
    print(f"\nindexer call at {args.seq} tokens, {args.heads} indexer heads (fp32 scores unchunked: {theory / 2**30:.2f} GiB)")
    print("| chunk | peak memory added | ratio to unchunked | wall | same top-k |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_added_bytes'] / 2**20:,.0f} MiB | {r['peak_added_bytes'] / whole['peak_added_bytes']:.3f} | "
              f"{r['wall_s']:.1f}s | {'yes' if r['indices_sha256'] == whole['indices_sha256'] else 'NO'} |")


# -- candidate-parallel ----------------------------------------------------------------------

def bench_parallel(args) -> None:
    """The same naive search with one 2-thread process and with two 1-thread processes."""
    tmp = Path(tempfile.mkdtemp(prefix="indexcache-bench-"))
    common = ["calibrate", "--model", args.model, "--data", args.data, "--seq-len", str(args.seq_len),
              "--num-samples", str(args.samples), "--batch-size", "2", "--target", "1/4", "--search", "naive",
              "--no-plots", "--no-overlap"]
    bin_dir = os.path.dirname(sys.executable)
    with socket.socket() as sock:  # a free port: a fixed one may be held by another run on this host
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    timings = {}
    for name, cmd, threads in [
        ("1 process", [sys.executable, "-m", "indexcache_calib", *common, "--out", str(tmp / "one")], "2"),
        ("2 processes", [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m",
                         "indexcache_calib", *common, "--out", str(tmp / "two")], "1"),
    ]:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        if p.returncode:
            raise SystemExit(f"Error: {name} exited {p.returncode}: {' '.join(cmd)}\n{p.stderr[-4000:]}")
        timings[name] = time.perf_counter() - t0
    maps = [json.loads((tmp / d / "layer_map.json").read_text()) for d in ("one", "two")]
    same = maps[0]["pattern"] == maps[1]["pattern"] and maps[0]["path"] == maps[1]["path"]
    result = {"timings_s": timings, "speedup": timings["1 process"] / timings["2 processes"], "identical": same,
              "search_seconds": {k: m["environment"]["search_seconds"] for k, m in zip(timings, maps)}}
    _save("parallel", result)
    s = result["search_seconds"]
    print(f"\ncandidate-parallel naive search on {args.model} ({args.samples}x{args.seq_len} tokens), same 2 cores:")
    print("| processes | wall incl. start-up | search only | same path |")
    print("|---|---|---|---|")
    for k in timings:
        print(f"| {k} | {timings[k]:.1f}s | {s[k]:.1f}s | {'yes' if same else 'NO'} |")
    print(f"search speedup: {s['1 process'] / s['2 processes']:.2f}x")


# -- GPU -----------------------------------------------------------------------------------

def bench_gpu(args) -> None:
    """Random tiny and mid-size DSA models on one GPU, a few thousand tokens, both searches."""
    import torch

    from indexcache_calib.testing import save_tiny

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    import transformers

    results = {"device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__}
    sizes = [("tiny", 12, 64, 2048, 2), ("mid", 24, 512, 4096, 2)] if not args.smoke else [("smoke", 6, 64, 128, 2)]
    for name, layers, hidden, seq, samples in sizes:
        d = tempfile.mkdtemp(prefix=f"indexcache-{name}-")
        save_tiny(d, "glm", layers, seed=0, weight_std=0.05, hidden=hidden, index_topk=min(256, seq // 4), vocab_size=4096,
                  index_n_heads=8, index_head_dim=64, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq)
        model, layout = _load(d, device_map=device)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 4096, (samples, seq), generator=g)
        held = torch.randint(3, 4096, (samples, seq), generator=g)
        r = compare_searches(model, layout, ids, held, batch_size=1, ratios=(2, 4), label=name)
        r.update({"hidden": hidden})
        for s in ("naive", "fast"):
            r[s].pop("path")
        results[name] = r
        del model
        torch.cuda.empty_cache()
    _save("gpu", results)
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']} (random weights: timings only)")
    print("| model | layers | hidden | tokens | naive wall | fast wall | wall ratio | layer-forwards ratio | peak GPU naive / fast | same F-sets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"
        same = ", ".join("yes" if row["identical"] else "no" for row in r["ratios"].values())
        print(f"| {name} | {r['layers']} | {r['hidden']} | {r['sequences']}x{r['seq_len']} | {r['naive']['wall_s']:.1f}s | "
              f"{r['fast']['wall_s']:.1f}s | {r['wall_ratio']:.3f} | {r['forwards_ratio']:.3f} | "
              f"{gib(r['naive']['peak_gpu_bytes'])} / {gib(r['fast']['peak_gpu_bytes'])} | {same} |")


def quiet(threads: int) -> None:
    """What every benchmark process sets first: offline, `threads` torch threads, no library chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--models", nargs="+", default=list(SEARCH_CASES), choices=list(SEARCH_CASES))
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--data", default="calibration_data/code.jsonl")
    d = sub.add_parser("draws")
    d.add_argument("--model", default="tiny-dsa", choices=list(SEARCH_CASES))
    d.add_argument("--samples", type=int, nargs="+", default=[4, 8], help="calibration sequences per draw")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's bench case)")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    d.add_argument("--strategies", nargs="*", default=["fast", "race"], choices=["fast", "race", "naive"],
                   help="searches compared with exact (none: only compute and keep exact's runs)")
    d.add_argument("--data", default="calibration_data/code.jsonl")
    d.add_argument("--tolerance", nargs="*", default=[], type=_tolerance,
                   help="also race with each of these tolerances (nats per step, or auto)")
    rc = sub.add_parser("race")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--data", default="calibration_data/code.jsonl")
    rc.add_argument("--fresh", action="store_true", help="rerun every search even if outputs/bench/ holds its run")
    rc.add_argument("--samples", type=int, default=None, help=f"calibration sequences (default {RACE_CASE[1]})")
    rc.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {RACE_CASE[2]})")
    rc.add_argument("--tolerance", nargs="*", default=["auto"], type=_tolerance,
                    help="race again with each of these tolerances (nats per step, or auto)")
    rc.add_argument("--no-plain-race", action="store_true", help="skip the race without a tolerance")
    rc.add_argument("--heldout", default="calibration_data/code.heldout.jsonl")
    sub.add_parser("project")
    i = sub.add_parser("indexer")
    i.add_argument("--seq", type=int, default=8192)
    i.add_argument("--heads", type=int, default=8)
    c = sub.add_parser("_indexer-child")
    c.add_argument("--seq", type=int)
    c.add_argument("--heads", type=int)
    c.add_argument("--chunk", type=int, default=None)
    par = sub.add_parser("parallel")
    par.add_argument("--model", default="tiny-dsa")
    par.add_argument("--data", default="calibration_data/code.jsonl")
    par.add_argument("--seq-len", type=int, default=256)
    par.add_argument("--samples", type=int, default=4)
    g = sub.add_parser("gpu")
    g.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script itself")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the searches (benchmarks share the host)")
    args = p.parse_args()
    quiet(args.threads)
    if args.cmd == "_indexer-child":
        _indexer_child(args.seq, args.chunk, args.heads)
    else:
        {"search": bench_search, "draws": bench_draws, "race": bench_race, "project": bench_project, "indexer": bench_indexer, "parallel": bench_parallel, "gpu": bench_gpu}[args.cmd](args)


if __name__ == "__main__":
    main()

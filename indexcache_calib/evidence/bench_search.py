"""The search benchmarks (docs/search-speed.md): every search side by side on the same tokens (`bench search`),
the race against exact, Algorithm 1's answer (`bench race`), and every search's work at the paper's scale
(`bench project`). Run through `python -m indexcache_calib.evidence.bench`."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

from indexcache_calib.evidence.common import OUT, _load, _save, _tokens

def compare_searches(model, layout, ids, heldout_ids, batch_size: int = 4, ratios=(2, 4, 8), label: str = "",
                     cache_device: str = "cpu", reference: str = "naive") -> dict:
    """Run `reference` and the default search (race) down to the smallest ratio on the same tokens and
    compare what they chose."""
    import torch

    from indexcache_calib.pattern import uniform_pattern
    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import greedy_search, paired, path

    n = layout.num_positions
    start = "F" * n
    floor = math.ceil(n / max(ratios))
    whole_at = frozenset(math.ceil(n / r) for r in ratios)
    runs = {}
    for strategy in (reference, "race"):
        runner = PatternRunner(model, layout, ids, batch_size=batch_size, measure_overlap=False,
                               cache_device="none" if strategy == "naive" else cache_device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        base, steps = greedy_search(start, floor, runner, layout.fixed_shared, search=strategy, whole_at=whole_at)
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
        row = {"num_full": k, "identical": pick[reference]["pattern"] == pick["race"]["pattern"]}
        scores = {}
        for s in runs:
            step = next(st for st in runs[s]["steps"] if st.pattern.count("F") == k)
            scores[s] = {"calib": step.whole, "heldout": held.score(pick[s]["pattern"])}
            row[f"{s}_pattern"] = pick[s]["pattern"]
            row[f"{s}_calib_loss"] = pick[s]["loss"]
            row[f"{s}_heldout_loss"] = scores[s]["heldout"].loss
        row["uniform_pattern"] = uni
        row["uniform_heldout_loss"] = held.score(uni).loss
        for split in ("calib", "heldout"):
            ref = row[f"{reference}_{split}_loss"]
            row[f"{split}_rel_diff"] = (row[f"race_{split}_loss"] - ref) / ref
            # The paired standard error over sequences says whether such a difference is resolvable at all.
            se = paired(scores["race"][split], scores[reference][split])[1]
            row[f"{split}_rel_se"] = se / ref if se is not None else None
        by_ratio[f"1/{r}"] = row
    summary = {
        "layers": n, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "heldout_sequences": int(heldout_ids.shape[0]),
        "forwards_ratio": runs["race"]["layer_forwards"] / runs[reference]["layer_forwards"],
        "wall_ratio": runs["race"]["wall_s"] / runs[reference]["wall_s"],
        "ratios": by_ratio, "reference": reference,
    }
    for s in runs:
        summary[s] = {k: v for k, v in runs[s].items() if k not in ("steps", "path")}
        summary[s]["path"] = runs[s]["path"]
    return summary


SEARCH_CASES = {"tiny-dsa": (8, 512), "tiny-dsa-deep": (4, 256)}  # model: (sequences, tokens each)


SEARCH_ORDER = ("naive", "exact", "race")
RATIOS = (2, 4, 8)


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


# -- running, and keeping, one search -------------------------------------------------------------

class _Counted:
    """The runner, with the work its end points take (the race's `set_base` after the start: the
    committed pattern scored on every sequence where a user reads its loss) counted apart."""

    def __init__(self, runner):
        self.runner, self.endpoint_layer_forwards, self.started = runner, 0, False
        self.num_batches, self.batch_size = runner.num_batches, runner.batch_size

    def set_base(self, pattern):
        before = self.runner.counters.layer_forwards
        score = self.runner.set_base(pattern)
        if self.started and self.runner._lazy:
            self.endpoint_layer_forwards += self.runner.counters.layer_forwards - before
        self.started = True
        return score

    def __getattr__(self, name):
        return getattr(self.runner, name)


def _run(strategy: str, model, layout, ids, floor: int, batch_size: int = 1, device: str = "cpu", **search_opts) -> dict:
    """One greedy search from all-F down to `floor` full layers, with the work the runner counted. The
    race scores the committed pattern on every sequence at 1/2, 1/4 and 1/8, as every other search does:
    its end points are exact too, and their work is counted (`endpoint_layer_forwards`)."""
    from dataclasses import asdict

    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import greedy_search

    n = layout.num_layers
    runner = PatternRunner(model, layout, ids, batch_size=batch_size, measure_overlap=False,
                           cache_device="none" if strategy == "naive" else "gpu" if device.startswith("cuda") else "cpu")
    counted = _Counted(runner)
    t0 = time.perf_counter()
    base, steps = greedy_search("F" * n, floor, counted, layout.fixed_shared, search=strategy,
                                whole_at=frozenset(math.ceil(n / r) for r in RATIOS), **search_opts)
    wall = time.perf_counter() - t0
    counters = runner.counters
    runner.close()
    return {"strategy": strategy, "base": asdict(base), "steps": [s.to_json() for s in steps], "wall_s": wall,
            "layer_forwards": counters.layer_forwards, "tokens": counters.tokens, "patterns": counters.patterns_scored,
            "base_layer_forwards": counters.base_layer_forwards, "endpoint_layer_forwards": counted.endpoint_layer_forwards}


def _search_source_sha() -> str:
    import hashlib

    from indexcache_calib import prefix_cache, runner, search

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (search, runner, prefix_cache))).hexdigest()


def _cached_run(spec: str, model, layout, ids, floor: int, strategy: str, name: str | None = None,
                fresh: bool = False, **search_opts) -> dict:
    """`_run`, kept under outputs/bench/ keyed by the tokens' sha256 and the search's name, so a rerun with
    another setting reuses every search it already ran (their tokens and decisions do not depend on when
    they ran; their wall times are marked as from an earlier run). A kept run of the race is reused only
    while search.py and runner.py are the ones it ran with. Exact's runs are the references every cheaper
    search is compared with, so they live in outputs/bench/exact/."""
    from indexcache_calib.data import tokens_sha256

    sha = tokens_sha256(ids)
    stem = f"{spec}_{ids.shape[0]}x{ids.shape[1]}_{sha[:16]}"
    name = name or strategy
    code = None if name == "exact" else _search_source_sha()
    path = OUT / "exact" / f"{stem}.json" if name == "exact" else \
        OUT / "runs" / f"{stem}_{''.join(c if c.isalnum() or c in '.-' else '_' for c in name)}.json"
    if path.exists() and not fresh:
        data = json.loads(path.read_text())
        if data.get("tokens_sha256") == sha and data.get("floor") == floor and data.get("code_sha256") == code:
            return data
    data = _run(strategy, model, layout, ids, floor, **search_opts)
    data.update({"tokens_sha256": sha, "floor": floor, "model": spec, "code_sha256": code})
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
    computed), committing a candidate costs only the sequences it was not yet scored on, and a race's lazy
    base (`rebase`) runs the committed pattern on a batch only when a candidate or `base_losses` needs
    it there, from the earliest layer committed since it last ran there."""

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
        self._stale: dict[int, int] = {}  # lazy base: batch -> the layer the base must rerun from there

    def _restart(self, pattern: str) -> int:
        if self.base is None:
            return 0
        diff = [i for i, (a, b) in enumerate(zip(self.base, pattern)) if a != b]
        return diff[0] if len(diff) == 1 else 0

    def _lookup(self, pattern: str):
        if pattern not in self.scores:
            raise OffPath(pattern)
        return self.scores[pattern]

    def _ids(self, batches) -> list[int]:
        return [i for b in batches for i in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_sequences))]

    def _charge(self, pattern: str, start: int, ids) -> None:
        seen = self._seen.setdefault(pattern, set()) if start else set()
        new = [i for i in ids if i not in seen]
        seen.update(new)
        self.layer_forwards += (self.num_layers - start) * len(new)

    def _catch_up(self, batches, upto: int) -> None:
        """The lazy base brought to where a candidate starting at `upto` needs it (the runner runs it
        to the last layer, which also gives its losses there)."""
        for b in batches:
            if b in self._stale and self._stale[b] < upto:
                self.layer_forwards += (self.num_layers - self._stale.pop(b)) * len(self._ids([b]))

    def set_base(self, pattern: str):
        sc = self._lookup(pattern)
        if self.base is not None and pattern == self.base:  # the lazy base, scored where not yet known
            self._catch_up(range(self.num_batches), self.num_layers)
            return sc
        self._charge(pattern, self._restart(pattern), range(self.num_sequences))
        self.base, self._seen, self._stale = pattern, {}, {}
        return sc

    def rebase(self, pattern: str) -> None:
        self._lookup(pattern)
        if pattern == self.base:
            return
        start = self._restart(pattern)
        kept = self._seen.get(pattern, set())
        for b in range(self.num_batches):
            if not set(self._ids([b])) <= kept:
                self._stale[b] = min(self._stale.get(b, start), start)
            else:
                self._stale.pop(b, None)
        self.base, self._seen = pattern, {}

    def base_losses(self, batches) -> list[float]:
        self._catch_up(batches, self.num_layers)
        losses = self._lookup(self.base).seq_losses
        return [losses[i] for i in self._ids(batches)]

    def score(self, pattern: str, batches=None):
        from indexcache_calib.search import Score

        sc = self._lookup(pattern)
        start = self._restart(pattern)
        todo = range(self.num_batches) if batches is None else batches
        if start:
            self._catch_up(todo, start)
        if batches is None:
            self._charge(pattern, start, range(self.num_sequences))
            return sc
        ids = self._ids(batches)
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
        gap, se = paired(g.whole, e.whole)
        same = g.pattern == e.pattern
        out["ratios"][f"1/{r}"] = {
            "num_full": k, "identical": same, "pattern": g.pattern, "exact_pattern": e.pattern,
            "loss": g.loss, "exact_loss": e.loss, "gap": gap, "gap_se": se, "rel_gap": gap / e.loss,
            "scored_on_every_sequence": g.whole.sequences is None,
        }
    return out


def _undecided(ref: dict) -> list[int]:
    from indexcache_calib.search import Step

    return [s.step for s in map(Step.from_json, ref["steps"]) if not s.confidence.decided]


# -- the race against Algorithm 1 ------------------------------------------------------------------

RACE_CASE = ("tiny-dsa", 64, 512)  # model, sequences, tokens each
RACE_HELDOUT = 32  # held-out sequences each searched pattern is scored on
# The targets: the race's tokens through decoder layers, end points included, as a share of exact's.
RACE_TARGETS = {64: 0.15, 256: 0.08}


def tolerance(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _race_name(spec: str, samples: int, seq: int, seed: int) -> str:
    return f"race_{spec}_{samples}x{seq}" + (f"_seed{seed}" if seed else "")


def bench_race(args) -> None:
    """The race (the default search) against Algorithm 1 (`exact`) on the same calibration tokens, down to
    1/8, for each seeded draw of sequences: tokens through decoder layers (the race's exact end points at
    1/2, 1/4 and 1/8 included) and wall time as ratios, the F-sets and their loss gaps to exact's on the
    calibration sequences and on held-out ones, and what the race measured per step (what `--dry-run`
    and `bench project` carry to other sizes). `--tolerance` races again with each of those tolerances."""
    from indexcache_calib.search import Race, Step, race_summary

    spec = args.model
    samples = args.samples or RACE_CASE[1]
    seq = args.seq_len or RACE_CASE[2]
    model, layout = _load(spec)
    n = layout.num_layers
    floor = math.ceil(n / max(RATIOS))
    for seed in args.seeds:
        ids = _tokens(spec, args.data, seq, samples, seed=seed)
        ref = _reference(spec, model, layout, ids, floor, fresh=args.fresh)
        result = {"model": spec, "layers": n, "sequences": samples, "seq_len": seq, "seed": seed,
                  "exact": {k: ref[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s")},
                  "exact_ran_here": bool(ref.get("ran_here")), "exact_undecided_steps": _undecided(ref),
                  "exact_steps": len(ref["steps"]), "target": RACE_TARGETS.get(samples), "searches": {}}
        for name, race in [("race", Race())] + [(f"race, tolerance {t}", Race(tolerance=t)) for t in args.tolerance]:
            run = _cached_run(spec, model, layout, ids, floor, "race", name, fresh=args.fresh, race=race)
            steps = [Step.from_json(d) for d in run["steps"]]
            row = compare_to_exact(ref, run, n)
            row.update({k: run[k] for k in ("layer_forwards", "tokens", "patterns", "wall_s", "base_layer_forwards",
                                            "endpoint_layer_forwards")})
            row.update({"ran_here": bool(run.get("ran_here")), "vs_exact": run["tokens"] / ref["tokens"],
                        "wall_vs_exact": run["wall_s"] / ref["wall_s"], "tolerance": race_summary(steps, race),
                        "shares": race_shares(steps, run, n, samples)})
            result["searches"][name] = row
            print(f"  {spec} {samples}x{seq} draw {seed}: {name} {row['vs_exact']:.3f} of exact's tokens", flush=True)
        result["heldout"] = _race_heldout(model, layout, args.heldout, seq, ref, result, n, spec)
        for name, row in result["searches"].items():
            held = result["heldout"]["searches"][name]
            row["heldout_within_one_se"] = all(r["within_one_se"] for r in held.values())
            row["meets_target"] = row["heldout_within_one_se"] and (result["target"] is None or row["vs_exact"] <= result["target"])
        _save(_race_name(spec, samples, seq, seed), result)
        print_race(result)
    if len(args.seeds) > 1:
        print_draws([json.loads((OUT / f"{_race_name(spec, samples, seq, s)}.json").read_text()) for s in args.seeds])


def race_shares(steps, run: dict, num_layers: int, samples: int) -> dict:
    """What `dryrun.search_work` models a race with, measured on one, as counts: the sequences a candidate
    raced at the first step (every candidate enters there), the candidates entered per later step and the
    sequences each raced, and the committed pattern's reruns per step (its layer-forwards, end points
    apart, over the mean tail of a candidate); the end points' work as a share of a whole forward each."""
    first = steps[0] if steps else None
    later = steps[1:]
    own = sum((num_layers - c) * len(sc.seq_losses) for st in steps for c, sc in st.scores.items())
    tail = sum(num_layers - c for c in range(1, num_layers)) / max(1, num_layers - 1)
    endpoints = sum(st.committed is not None for st in steps)
    steps_base = run["base_layer_forwards"] - run["endpoint_layer_forwards"]
    return {
        "first_step_sequences": (sum(len(sc.seq_losses) for sc in first.scores.values()) / len(first.scores)) if first else None,
        "entered_per_later_step": sum(len(st.scores) for st in later) / len(later) if later else None,
        "later_sequences": (sum(len(sc.seq_losses) for st in later for sc in st.scores.values())
                            / max(1, sum(len(st.scores) for st in later))) if later else None,
        "base_runs_per_step": steps_base / tail / max(1, len(steps)),
        "endpoint_share": run["endpoint_layer_forwards"] / max(1, endpoints) / (num_layers * samples),
        "candidates_own": own, "start": num_layers * samples,
    }


def _race_heldout(model, layout, heldout: str, seq: int, ref: dict, result: dict, n: int, spec: str) -> dict:
    """Each search's F-sets at 1/2, 1/4 and 1/8 scored on held-out sequences: loss gap to exact's, with
    the paired SE over those sequences (the same pattern gives exactly 0)."""
    from indexcache_calib.runner import PatternRunner
    from indexcache_calib.search import Step, paired

    ids = _tokens(spec, heldout, seq, RACE_HELDOUT)
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


def print_race(r: dict) -> None:
    target = f"; target at most {r['target']} of exact's tokens" if r["target"] else ""
    print(f"\n{r['model']}, {r['sequences']}x{r['seq_len']} calibration tokens (draw {r['seed']}), down to 1/8; exact left "
          f"{len(r['exact_undecided_steps'])} of {r['exact_steps']} steps undecided{target}")
    print("| search | tokens through decoder layers | vs exact | wall vs exact | candidates raced | steps that let candidates go "
          "within the tolerance | same F-set 1/2, 1/4, 1/8 | calibration gap vs exact ± paired SE (1/2; 1/4; 1/8) "
          "| held-out gap vs exact ± paired SE (1/2; 1/4; 1/8) | meets the target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| exact | {r['exact']['tokens']:,} | 1.000 | 1.00 | | | | | | |")
    h = r["heldout"]["searches"]
    for name, s in r["searches"].items():
        same = ", ".join("yes" if row["identical"] else "no" for row in s["ratios"].values())
        gaps = "; ".join("0" if row["identical"] else f"{row['gap']:+.5f} ± {row['gap_se'] or 0:.5f}" for row in s["ratios"].values())
        held = "; ".join("0" if s["ratios"][k]["identical"] else f"{row['gap']:+.5f} ± {row['gap_se'] or 0:.5f}"
                         for k, row in h[name].items())
        earlier = "" if s["ran_here"] and r["exact_ran_here"] else " (not side by side)"
        print(f"| {name} | {s['tokens']:,} | {s['vs_exact']:.3f} | {s['wall_vs_exact']:.2f}{earlier} | "
              f"{sum(len(x['entered']) for x in s['tolerance']['steps'])} | {s['tolerance']['steps_ended_early']} of "
              f"{len(s['tolerance']['steps'])} | {same} | {gaps} | {held} | {'yes' if s['meets_target'] else 'NO'} |")
    for name, s in r["searches"].items():
        sh = s["shares"]
        print(f"{name}: step 1 raced {sh['first_step_sequences'] or 0:.1f} sequences per candidate; later steps entered "
              f"{sh['entered_per_later_step'] or 0:.2f} candidates, {sh['later_sequences'] or 0:.1f} sequences each; the "
              f"committed pattern reran {sh['base_runs_per_step']:.2f} sequence-tails per step; each end point cost "
              f"{sh['endpoint_share']:.2f} of a whole forward")
    print(f"held-out: {r['heldout']['sequences']} sequences of {r['heldout']['seq_len']} tokens ({r['heldout']['data']}); "
          f"within one paired SE at every ratio: " + ", ".join(f"{name} {'yes' if s['heldout_within_one_se'] else 'NO'}"
                                                                for name, s in r["searches"].items()))


def print_draws(rows: list[dict]) -> None:
    """Over seeded draws: how often the race met each part of the bar, and its cost range."""
    r0 = rows[0]
    print(f"\n{r0['model']}, {r0['sequences']}x{r0['seq_len']}: the race against exact over {len(rows)} draws (seeds "
          f"{', '.join(str(r['seed']) for r in rows)})")
    print("| search | draws | same F-set at 1/2, 1/4 and 1/8 | held-out within one SE at every ratio | tokens vs exact (min-max) "
          "| exact's undecided steps (min-max) |")
    print("|---|---|---|---|---|---|")
    for name in rows[0]["searches"]:
        runs = [r["searches"][name] for r in rows]
        same = sum(all(x["identical"] for x in s["ratios"].values()) for s in runs)
        held = sum(s["heldout_within_one_se"] for s in runs)
        ratio = [s["vs_exact"] for s in runs]
        undecided = [len(r["exact_undecided_steps"]) for r in rows]
        print(f"| {name} | {len(runs)} | {same} of {len(runs)} | {held} of {len(runs)} | {min(ratio):.3f}-{max(ratio):.3f} | "
              f"{min(undecided)}-{max(undecided)} of {rows[0]['exact_steps']} |")


# -- projection ------------------------------------------------------------------------------------

PAPER_SCALE = {"layers": (47, 61, 78), "sequences": 768, "seq_len": 200_000, "target": 4}


def bench_project(args) -> None:
    """Tokens through decoder layers of every search at the paper's scale, from the same estimates as
    `calibrate --dry-run` (naive's count is exact; the others are typical counts)."""
    from indexcache_calib.dryrun import RACE_BASIS, search_work
    from indexcache_calib.pattern import uniform_pattern

    rows = []
    for n in PAPER_SCALE["layers"]:
        num_full = math.ceil(n / PAPER_SCALE["target"])
        ends = frozenset(uniform_pattern(n, every).count("F") for every in RATIOS) | {num_full}
        row = {"layers": n, "num_full": num_full, "sequences": PAPER_SCALE["sequences"], "seq_len": PAPER_SCALE["seq_len"]}
        for name in SEARCH_ORDER:
            w = search_work(n, frozenset(), num_full, name, PAPER_SCALE["sequences"], endpoints=ends)
            row[name] = w.get("layer_forwards", w.get("layer_forwards_typical")) * PAPER_SCALE["seq_len"]
            if name == "race":
                row["race_parts"] = {k: v * PAPER_SCALE["seq_len"] for k, v in w["parts"].items()}
        rows.append(row)
    _save("project", rows)
    print(f"\nTokens through decoder layers from all-F to 1/{PAPER_SCALE['target']}, {PAPER_SCALE['sequences']} sequences of "
          f"{PAPER_SCALE['seq_len']:,} tokens (naive: exact count; others: typical, as --dry-run estimates them)")
    print("| layers | Full at the end | " + " | ".join(SEARCH_ORDER) + " | race vs naive |")
    print("|---|---|" + "---|" * (len(SEARCH_ORDER) + 1))
    for r in rows:
        cells = " | ".join(f"{r[name]:.3g} ({r[name] / r['naive']:.3f})" for name in SEARCH_ORDER)
        print(f"| {r['layers']} | {r['num_full']} | {cells} | 1/{r['naive'] / r['race']:.0f} |")
    print("\nThe race's parts (tokens through decoder layers):")
    print("| layers | start (all-Full, every sequence) | first step | later steps | committed pattern's reruns | end points |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p = r["race_parts"]
        print(f"| {r['layers']} | {p['start']:.3g} | {p['first_step']:.3g} | {p['later_steps']:.3g} | {p['base']:.3g} | "
              f"{p['endpoints']:.3g} |")
    print(f"race's numbers: {RACE_BASIS}")

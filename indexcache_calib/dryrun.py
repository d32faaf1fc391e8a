"""`calibrate --dry-run`: what a run will need, worked out from the config alone (no weights load)."""

from __future__ import annotations

import os

from indexcache_calib.errors import CalibError, plural

# torch, accelerate and the pipeline modules are imported inside the functions that need them: the command line
# imports this module for `describe`, and `indexcache --help` must not load torch.


def size_str(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# Typical counts, measured on the embedded models; estimates only, since how many candidates are in
# doubt or tie depends on the model and the data.
# The fast search's steps after its first sweep re-score this share of the candidates exact would: 0.43-0.59
# with 4 to 64 calibration sequences (bench draws, bench race).
FAST_RESCORED = 0.5
# A race's typical step, measured by `bench race` on tiny-dsa (RACE_MEASURED): a candidate dropped before the
# end used RACE_DROPPED_SEQUENCES sequences on average, RACE_FINALISTS per step ran through every sequence
# (the winner and its near-ties), and the work beyond the candidates' own and the all-Full base came to
# RACE_EXTRA of the winner's full run per step.
# How soon a worse candidate is dropped depends on how noisy one sequence's loss is: at 64x512 it took 13.6
# sequences, at 256x128 (shorter, noisier sequences) 77.9. The larger count is the one used here.
RACE_MEASURED = "tiny-dsa at 256x128"
RACE_DROPPED_SEQUENCES = 77.9
RACE_FINALISTS = 3.64
RACE_EXTRA = 0.13
# With --tolerance auto (2 paired SE over every sequence), clearly worse candidates are dropped by the bound as
# before; of the near-ties that ran to the end without it, RACE_TOL_FINALISTS per step still do (the winner
# always does) and the others stop when the tolerance ends the step, after RACE_TOL_SHARE of the sequences on
# average. That is a share, not a count: the bound on a near-tie meets a tolerance of 2 SE over all N
# sequences after a fixed share of N (q^2 / (q^2 + 4) with the t quantile q, about half), whatever N is.
RACE_TOL_FINALISTS = 1.50
RACE_TOL_SHARE = 0.33
RACE_TOL_EXTRA = 0.11
RACE_BASIS = (f"typical: extrapolated from shares measured on {RACE_MEASURED} (bench race): a dropped candidate used "
              f"{RACE_DROPPED_SEQUENCES} sequences, {RACE_FINALISTS} per step ran to the end; with --tolerance auto, "
              f"{RACE_TOL_FINALISTS} per step ran to the end and the other near-ties stopped after {RACE_TOL_SHARE:.0%} of the "
              "sequences; at most: counted from the config, as naive's count is")


def race_looks(samples: int, race_first: int = 4, batch_size: int = 1) -> int:
    """How many times a race over `samples` sequences can drop candidates before the end (the rounds of
    search.race_rounds, less the last): 0 races nothing, 1 looks once, at `race_first` sequences, with
    too few degrees of freedom for its bound to drop much."""
    from indexcache_calib.search import race_rounds

    bs = max(1, batch_size)
    return len(race_rounds(-(-samples // bs), -(-race_first // bs))) - 1


def search_work(num_layers: int, fixed: frozenset[int], num_full: int, search: str, samples: int,
                positions: list[int] | None = None, race_first: int = 4, batch_size: int = 1,
                tolerance: float | str | None = None) -> dict:
    """Patterns scored and decoder-layer forwards (per sequence x samples). Exact for naive. For the
    others, an upper bound and a typical count, since how far each candidate runs, and how many are
    re-scored or raced to the end, depends on the scores: fast sweeps once, then typically re-scores
    FAST_RESCORED of each step's candidates; race typically drops all but RACE_FINALISTS candidates per
    step after RACE_DROPPED_SEQUENCES sequences.
    `positions`: the decoder layer of each pattern position (default: every layer); `fixed` are positions."""
    positions = list(range(num_layers)) if positions is None else positions
    cands = [positions[p] for p in range(1, len(positions)) if p not in fixed]
    steps = len(cands) + 1 - num_full
    naive_patterns = sum(len(cands) - s for s in range(steps))
    if search == "naive":
        return {"patterns": 1 + naive_patterns, "layer_forwards": (1 + naive_patterns) * num_layers * samples}
    # With prefix reuse, the candidate that flips layer l runs layers l..N-1; refreshing the cache after
    # committing l does the same once per step.
    sweep = sum(num_layers - l for l in cands)
    mean_tail = sweep / max(1, len(cands))
    upper = num_layers + sweep * steps + mean_tail * steps
    if search == "exact":  # every candidate every step, each from its own layer
        typical = num_layers + mean_tail * (naive_patterns + steps)
        return {"patterns": 1 + naive_patterns, "layer_forwards_at_most": int(upper * samples),
                "layer_forwards_typical": int(typical * samples)}
    if search == "race":
        looks = race_looks(samples, race_first, batch_size)
        if looks == 0:  # nothing to race: Algorithm 1's steps
            return search_work(num_layers, fixed, num_full, "exact", samples, positions)
        finalists = min(RACE_FINALISTS * steps, naive_patterns)
        # A dropped candidate has seen at least the first round.
        dropped = max(race_first, min(RACE_DROPPED_SEQUENCES, samples)) * (naive_patterns - finalists)
        if tolerance:  # a number of nats is modelled as auto: no tolerance was measured in nats
            whole = min(RACE_TOL_FINALISTS * steps, finalists)
            ended = (finalists - whole) * max(race_first, RACE_TOL_SHARE * samples)
            typical = num_layers * samples + mean_tail * (dropped + ended + (whole + RACE_TOL_EXTRA * steps) * samples)
        else:
            typical = num_layers * samples + mean_tail * (dropped + (finalists + RACE_EXTRA * steps) * samples)
        if looks == 1:
            # One look, at race_first sequences: its bound, with that few degrees of freedom, rarely drops
            # anything, and a race scores its candidates in pieces and its leader whole again, so it is no
            # cheaper than exact (measured dearer: 171,520 vs 147,456 tokens at 4x256).
            exact = search_work(num_layers, fixed, num_full, "exact", samples, positions)
            typical = max(typical, exact["layer_forwards_typical"] + mean_tail * RACE_EXTRA * steps * samples)
        # At most: every candidate on every sequence, and each winner once more, whole.
        return {"patterns_at_most": 1 + naive_patterns + steps,
                "layer_forwards_at_most": int((upper + mean_tail * steps) * samples),
                "layer_forwards_typical": int(min(typical, (upper + mean_tail * steps) * samples))}
    # fast: one full sweep, then a share of each step's candidates re-scored (those whose stale delta
    # could still win, see search._lazy).
    typical = num_layers + sweep + mean_tail * (FAST_RESCORED * (naive_patterns - len(cands)) + max(0, steps - 1))
    return {
        "patterns_at_most": 1 + naive_patterns,
        "layer_forwards_at_most": int(upper * samples),
        "layer_forwards_typical": int(typical * samples),
    }


def plan(opts, ckpt, num_full: int, attention: str = "dense") -> dict:
    """Memory and work estimates for `opts` on the checkpoint `ckpt` (a `model.Checkpoint`)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    from indexcache_calib.model import _auto_class, loading_config, parse_max_memory

    config, text = loading_config(ckpt), ckpt.text
    n, fixed = ckpt.num_layers, ckpt.fixed_shared
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        opts.dtype, getattr(config, "dtype", None) or torch.float32
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights():
        model = _auto_class(config).from_config(config, dtype=dtype)
    sizes = compute_module_sizes(model, dtype=dtype)
    total = sizes[""]
    max_memory = parse_max_memory(opts.max_memory)
    no_split = getattr(model, "_no_split_modules", None) or []
    try:
        if opts.device_map in ("auto", "balanced", "balanced_low_0"):
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                             low_zero=opts.device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    except Exception as e:  # accelerate raises plain errors for impossible budgets
        raise CalibError(f"cannot place the model: {e}", hint="raise --max-memory or set --offload-dir")
    per_device: dict[str, int] = {}
    for name, device in device_map.items():
        per_device[str(device)] = per_device.get(str(device), 0) + sizes[name]
    elem = torch.tensor([], dtype=dtype).element_size()
    b, s = opts.batch_size, opts.seq_len
    heads = ckpt.family.index_heads(text)
    from indexcache_calib.sharing import auto_chunk

    rows = auto_chunk(b, heads, s) if opts.indexer_chunk is None else (opts.indexer_chunk or s)
    rows = min(rows, s)
    indexer_peak = b * rows * heads * s * 4 + b * rows * s * 4  # fp32 per-head scores + summed scores
    # Dense: the model's own [B, 1, S, T] mask, kept per batch. Sparse: mask rows (and their fp32 bias)
    # come a query chunk at a time, within one attention chunk (attention.CHUNK_BYTES).
    from indexcache_calib.attention import CHUNK_BYTES

    mask = b * s * s * elem if attention == "dense" else min(b * s * s * 5, CHUNK_BYTES)
    samples = opts.num_samples
    hidden = text.hidden_size * ckpt.family.streams(text)  # hyper-connection streams each carry a copy
    cache = 0
    if opts.search != "naive" and opts.cache_device != "none":
        from indexcache_calib.runner import cache_bytes_estimate

        cache = cache_bytes_estimate(len(ckpt.positions), ckpt.budget, samples, s, hidden, elem)
    from indexcache_calib.search import SEARCHES

    race_first = getattr(opts, "race_first", 4)
    tolerance = getattr(opts, "tolerance", None) if opts.search == "race" else None
    if tolerance not in (None, "auto"):
        tolerance = float(tolerance) or None  # --tolerance 0 is the race without one
    work = search_work(n, fixed, num_full, opts.search, samples, ckpt.positions, race_first, b, tolerance)
    # Every search's work on this config, for choosing one: layer-forwards (per sequence) and tokens.
    by_search = {}
    for name in SEARCHES:
        w = search_work(n, fixed, num_full, name, samples, ckpt.positions, race_first, b, tolerance)
        lf = w.get("layer_forwards", w.get("layer_forwards_typical"))
        by_search[name] = {"layer_forwards": lf, "tokens": lf * s, "estimate": "exact" if name == "naive" else "typical"}
    if opts.search == "race" or by_search["race"]["layer_forwards"] != by_search["exact"]["layer_forwards"]:
        by_search["race"]["basis"] = RACE_BASIS + (
            f"; this estimate is for --tolerance {tolerance}" + ("" if tolerance == "auto" else ", modelled as auto's")
            if tolerance else "")
    warnings = []
    if opts.search == "race":
        looks = race_looks(samples, race_first, b)
        if looks <= 1:
            warnings.append(f"too few calibration sequences for racing to pay ({samples}, --race-first {race_first}: "
                            + ("nothing to race" if looks == 0 else "one look before the end")
                            + f"): race costs at least what exact does; use --search exact, or more than {2 * race_first} sequences")
        elif by_search["race"]["tokens"] >= by_search["exact"]["tokens"]:
            warnings.append("race's estimate is not below exact's on this config: --search exact costs no more")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cache and opts.cache_device == "cpu" and cache > host // 2:
        warnings.append(f"the activation cache ({size_str(cache)}) exceeds half of this host's memory ({size_str(host)}): use --cache-device disk")
    return {
        "warnings": warnings,
        "model_type": ckpt.config.model_type,
        "family": ckpt.family.name,
        "pattern_positions": len(ckpt.positions),
        "num_layers": n,
        "num_full_target": num_full,
        "weights_total": total,
        "weights_per_device": per_device,
        "dtype": str(dtype).replace("torch.", ""),
        "indexer_peak_per_layer": indexer_peak,
        "indexer_rows_per_call": rows,
        "attention": attention,
        "attention_mask_per_batch": mask,
        "activation_cache": cache,
        "activation_cache_device": opts.cache_device if cache else "none",
        "search": opts.search,
        "work": work,
        "work_by_search": by_search,
    }


def describe(p: dict) -> list[tuple[str, str]]:
    rows = [
        ("model", f"{p['model_type']}, {plural(p['num_layers'], 'layer')}, target {p['num_full_target']} full"),
        ("weights", f"{size_str(p['weights_total'])} in {p['dtype']}"),
    ]
    for device, size in sorted(p["weights_per_device"].items()):
        rows.append((f"  on {device}", size_str(size)))
    rows += [
        ("indexer peak", f"{size_str(p['indexer_peak_per_layer'])} per layer call ({p['indexer_rows_per_call']} query rows; --indexer-chunk lowers it)"),
        ("attention", p["attention"] + (" (top-k gathered per query chunk; nothing of size seq x seq)" if p["attention"] == "sparse"
                                        else " (the model's own path: seq x seq masks)")),
        ("attention mask", f"{size_str(p['attention_mask_per_batch'])} per batch"
                           + (" at most, a query chunk of rows at a time" if p["attention"] == "sparse" else "")),
        ("activation cache", f"{size_str(p['activation_cache'])} on {p['activation_cache_device']}"),
    ]
    w = p["work"]
    if "layer_forwards" in w:
        rows.append(("search (naive)", f"{w['patterns']} patterns, {w['layer_forwards']:,} layer-forwards"))
    else:
        rows.append((f"search ({p['search']})", f"typically {w['layer_forwards_typical']:,} layer-forwards, at most {w['layer_forwards_at_most']:,}"))
    naive = p["work_by_search"]["naive"]["tokens"]
    for name, v in p["work_by_search"].items():
        kind = "" if v["estimate"] == "exact" else "typically "
        rows.append((f"  tokens if {name}", f"{kind}{v['tokens']:,} through decoder layers ({v['tokens'] / naive:.3f} of naive)"))
    if "basis" in p["work_by_search"]["race"]:
        rows.append(("  race's numbers", p["work_by_search"]["race"]["basis"]))
    rows += [("warning", w) for w in p["warnings"]]
    return rows

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
# The race, measured by `bench race` on RACE_MEASURED (the race's `shares`): at the first step every
# candidate enters and raced RACE_FIRST_SEQUENCES sequences on average; each later step entered
# RACE_ENTERED candidates, which raced RACE_LATER_SEQUENCES sequences each; the committed pattern reran
# RACE_BASE_RUNS sequence-tails per step where a candidate needed it; and each end point (the committed
# pattern scored on every sequence) cost RACE_ENDPOINT_SHARE of a whole forward. The sequences are counts,
# carried as counts to other sizes: a tolerance in nats ends a near-tie after a count of sequences set by the
# zone and the pair's paired spread, not a share of them (the one extrapolation here).
RACE_MEASURED = "tiny-dsa at 256x128"
RACE_FIRST_SEQUENCES = 25.6
RACE_ENTERED = 3.0
RACE_LATER_SEQUENCES = 55.8
RACE_BASE_RUNS = 10.1
RACE_ENDPOINT_SHARE = 0.54
RACE_BASIS = (f"typical: the counts measured on {RACE_MEASURED} (bench race): {RACE_FIRST_SEQUENCES:g} sequences per "
              f"candidate at the first step, {RACE_ENTERED:g} candidates entered per later step racing "
              f"{RACE_LATER_SEQUENCES:g} sequences each, {RACE_BASE_RUNS:g} reruns of the committed pattern per step, each end "
              f"point {RACE_ENDPOINT_SHARE:g} of a whole forward; carried as counts (a tolerance in nats ends a near-tie "
              "after a count of sequences); at most: every candidate on every sequence, as exact")


def endpoint_counts(num_positions: int, fixed: frozenset[int], num_full: int) -> set[int]:
    """The numbers of Full layers whose patterns a calibration scores on every sequence: the target, and
    the ratios uniform interleaving is scored at (pattern.UNIFORM_EVERY)."""
    from indexcache_calib.pattern import UNIFORM_EVERY, uniform_pattern

    return {uniform_pattern(num_positions, every, fixed).count("F") for every in UNIFORM_EVERY} | {num_full}


def search_work(num_layers: int, fixed: frozenset[int], num_full: int, search: str, samples: int,
                positions: list[int] | None = None, tolerance: float | str | None = "auto",
                endpoints: frozenset[int] = frozenset(), uniform: int = 0) -> dict:
    """Patterns scored and decoder-layer forwards (per sequence x samples). Exact for naive. For the
    others, an upper bound and a typical count, since how far each candidate runs, and how many are
    entered or raced to the end, depends on the scores (see RACE_BASIS). `endpoints`: the numbers of Full
    layers at which the race scores the committed pattern on every sequence (exact and naive score every
    step's). `uniform`: the uniform baselines scored after the search, a whole forward each. `positions`: the
    decoder layer of each pattern position (default: every layer); `fixed` are positions."""
    positions = list(range(num_layers)) if positions is None else positions
    cands = [positions[p] for p in range(1, len(positions)) if p not in fixed]
    steps = len(cands) + 1 - num_full
    naive_patterns = sum(len(cands) - s for s in range(steps))
    if search == "naive":
        return {"patterns": 1 + naive_patterns + uniform, "layer_forwards": (1 + naive_patterns + uniform) * num_layers * samples}
    baselines = uniform * num_layers * samples
    # With prefix reuse, the candidate that flips layer l runs layers l..N-1; refreshing the cache after
    # committing l does the same once per step.
    sweep = sum(num_layers - l for l in cands)
    mean_tail = sweep / max(1, len(cands))
    upper = num_layers + sweep * steps + mean_tail * steps
    if search == "exact":  # every candidate every step, each from its own layer
        typical = num_layers + mean_tail * (naive_patterns + steps)
        return {"patterns": 1 + naive_patterns + uniform, "layer_forwards_at_most": int(upper * samples) + baselines,
                "layer_forwards_typical": int(typical * samples) + baselines}
    # race
    reached = [k for k in endpoints if num_full <= k <= len(cands)]
    ends = len(reached) * num_layers * samples
    at_most = int(upper * samples + ends) + baselines
    if not tolerance:  # no zone: near-ties run to every sequence; nothing measured says how many
        return {"patterns_at_most": 1 + naive_patterns + uniform, "layer_forwards_at_most": at_most, "layer_forwards_typical": at_most,
                "parts": {"start": num_layers * samples, "first_step": 0, "later_steps": 0, "base": 0, "endpoints": 0,
                          "uniform": baselines}}
    parts = {
        "start": num_layers * samples,
        "first_step": len(cands) * min(samples, RACE_FIRST_SEQUENCES) * mean_tail,
        "later_steps": sum(min(len(cands) - s, RACE_ENTERED) for s in range(1, steps)) * min(samples, RACE_LATER_SEQUENCES) * mean_tail,
        "base": steps * min(samples, RACE_BASE_RUNS) * mean_tail,
        "endpoints": RACE_ENDPOINT_SHARE * ends,
        "uniform": baselines,
    }
    typical = min(at_most, int(sum(parts.values())))
    return {"patterns_at_most": 1 + naive_patterns + uniform, "layer_forwards_at_most": at_most, "layer_forwards_typical": typical,
            "parts": {k: int(v) for k, v in parts.items()}}


def planned_dtype(opts, config):
    """The dtype the weights will load in: --dtype, else the checkpoint's own (float32 where it names none)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        opts.dtype, getattr(config, "dtype", None) or torch.float32
    )
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def cache_need(opts, ckpt, num_samples: int, elem: int) -> int:
    """The prefix cache's upper bound for this run, from the config alone (0 where the run keeps none)."""
    if opts.search == "naive" or opts.cache_device == "none":
        return 0
    from indexcache_calib.runner import cache_bytes_estimate

    text = ckpt.text
    hidden = text.hidden_size * ckpt.family.streams(text)  # hyper-connection streams each carry a copy
    return cache_bytes_estimate(len(ckpt.positions), ckpt.budget, num_samples, opts.seq_len, hidden, elem)


REFERENCE_SEQ_LEN = 512  # calibrate's default --seq-len: what a long calibration is costed against


def plan(opts, ckpt, num_full: int, attention: str = "dense") -> dict:
    """Memory and work estimates for `opts` on the checkpoint `ckpt` (a `model.Checkpoint`)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    from indexcache_calib.model import _auto_class, loading_config, parse_max_memory

    config, text = loading_config(ckpt), ckpt.text
    n, fixed = ckpt.num_layers, ckpt.fixed_shared
    dtype = planned_dtype(opts, config)
    # Tensors made on the meta device from the start: `init_empty_weights` alone moves each parameter there only
    # once it is registered, so a module that makes one large tensor (a MoE's stacked experts: 34 GB for one
    # DeepSeek-V4-Pro layer) first allocates it on the host, and the plan fails on a host smaller than that.
    with init_empty_weights(), torch.device("meta"):
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
    cache = cache_need(opts, ckpt, samples, elem)
    from indexcache_calib.search import SEARCHES

    tolerance = opts.race().tolerance if opts.search == "race" else None
    endpoints = frozenset(endpoint_counts(len(ckpt.positions), fixed, num_full))
    from indexcache_calib.pattern import uniform_baselines

    uniform = len(uniform_baselines(len(ckpt.positions), fixed, num_full, lambda p: ckpt.family.runs(p, ckpt.positions)))
    work = search_work(n, fixed, num_full, opts.search, samples, ckpt.positions, tolerance, endpoints, uniform)
    # Every search's work on this config, for choosing one: layer-forwards (per sequence) and tokens.
    by_search = {}
    for name in SEARCHES:
        w = search_work(n, fixed, num_full, name, samples, ckpt.positions, tolerance if name == opts.search else "auto",
                        endpoints, uniform)
        lf = w.get("layer_forwards", w.get("layer_forwards_typical"))
        by_search[name] = {"layer_forwards": lf, "tokens": lf * s, "estimate": "exact" if name == "naive" else "typical"}
    by_search["race"]["basis"] = RACE_BASIS
    warnings = []
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
        # The indexer scores every key for every query: at equal tokens, its work per token grows with the
        # length, while the tokens through decoder layers stay the same.
        "length_cost": {"reference_seq_len": REFERENCE_SEQ_LEN, "keys_scored_per_token": s,
                        "indexer_work_vs_reference": s / REFERENCE_SEQ_LEN,
                        "reference_sequences_same_tokens": samples * s / REFERENCE_SEQ_LEN},
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
    lc = p["length_cost"]
    if lc["keys_scored_per_token"] != lc["reference_seq_len"]:
        ratio = lc["indexer_work_vs_reference"]
        times = f"{ratio:.3g}x" if ratio >= 1 else f"1/{1 / ratio:.3g}"
        rows.append(("length cost", f"each token's indexer scores {lc['keys_scored_per_token']:,} keys per head and layer: {times} "
                                    f"the indexer work of {lc['reference_sequences_same_tokens']:,.4g} sequences of "
                                    f"{lc['reference_seq_len']} (as many tokens)"))
    rows += [("warning", w) for w in p["warnings"]]
    return rows

"""Long-context benchmarks: the attention paths side by side, and whether calibration length matters.

  python -m indexcache_calib.evidence.bench_long memory    peak memory and wall of one all-Full forward and of one
                                                  greedy step, dense vs sparse path, 2K to 32K tokens
                                                  (--family deepseek_v4 / minimax_m3_vl: the same on a random
                                                  DeepSeek-V4 / MiniMax-M3)
  python -m indexcache_calib.evidence.bench_long plan      what a long calibration of GLM-5 needs per length (--dry-run;
                                                  --config deepseek_v4_flash / deepseek_v4_pro: DeepSeek-V4's)
  python -m indexcache_calib.evidence.bench_long lengths   calibrate the long model short and long (equal tokens,
                                                  equal sequences), several draws, both long domains; score
                                                  every pattern at the long length on held-out data

Every measurement of `memory` runs in a fresh process under an address-space limit, so a path that does
not fit says so instead of taking the host down. Results are printed and written under outputs/bench/.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from indexcache_calib.evidence.common import OUT, _save, _tokens, quiet
from indexcache_calib.errors import plural

LENGTHS = (2048, 4096, 8192, 16384, 32768)
PLAN_LENGTHS = (4096, 16384, 65536, 131072, 200_000)


# -- memory and wall per length and path ---------------------------------------------------------

def _memory_child(model_dir: str, seq: int, path: str, what: str) -> dict:
    """One all-Full forward (`forward`) or one greedy step (`step`: the all-Full base, then every
    candidate scored once, as the search's first step does) in this process; peak memory it added."""
    import torch

    from indexcache_calib.attention import set_attention
    from indexcache_calib.model import load_with_layout
    from indexcache_calib.runner import PatternRunner

    model, layout = load_with_layout(model_dir, device_map="cpu")
    set_attention(model, path)
    ids = torch.randint(3, int(model.config.vocab_size), (1, seq), generator=torch.Generator().manual_seed(0))
    all_full = "F" * layout.num_positions
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if what == "forward":
        run = PatternRunner(model, layout, ids, cache_device="none", measure_overlap=False)
        loss = run.score(all_full).loss
    else:
        run = PatternRunner(model, layout, ids, cache_device="cpu")
        loss = run.set_base(all_full).loss
        for p in range(1, layout.num_positions):
            run.score(all_full[:p] + "S" + all_full[p + 1:])
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_added_bytes": (after - before) * 1024, "peak_bytes": after * 1024, "wall_s": wall, "loss": loss,
            "layer_forwards": run.counters.layer_forwards}


# The shape of the measurement: hidden 128, index_topk 64, four indexer heads of dim 32. DeepSeek-V4
# keeps its published compression rates (4 and 128) and window (128); its index_topk counts compressed entries.
# MiniMax-M3 selects 4 blocks of 16 tokens (64 tokens, its local block among them) per KV head; its indexer has one
# head per KV head, so it has 4 KV heads (8 query heads).
MEMORY_MODELS = {
    "glm": ("random GlmMoeDsa, {layers} layers, hidden 128, index_topk 64, 4 indexer heads of dim 32", {}),
    "deepseek_v4": ("random DeepseekV4, {layers} layers (sliding, then CSA and HCA in turn), hidden 128, index_topk 64 "
                    "compressed entries, 4 indexer heads of dim 32, compress rates 4 and 128, window 128",
                    dict(compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
                         sliding_window=128)),
    "minimax_m3_vl": ("random MiniMaxM3VL text model, {layers} layers (full attention, then minimax_m3_sparse), hidden 128, "
                      "8 query and 4 KV heads, 4 indexer heads of dim 32, 4 blocks of 16 tokens per KV head "
                      "(index_topk_blocks 4 with 1 local block)",
                      dict(num_attention_heads=8, num_key_value_heads=4, index_block_size=16, index_topk_blocks=4,
                           index_local_blocks=1)),
}


def _random_model(directory: Path, layers: int, max_len: int, family: str = "glm") -> Path:
    from indexcache_calib.testing import save_tiny

    # The tiny DeepSeek-V4 builder halves index_topk (its rate-2 entries): 128 gives 64 entries.
    topk = 128 if family == "deepseek_v4" else 64
    return save_tiny(directory, family, layers=layers, hidden=128, index_topk=topk, index_n_heads=4, index_head_dim=32,
                     max_position_embeddings=max_len, weight_std=0.05, **MEMORY_MODELS[family][1])


def bench_memory(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="indexcache-bench-long-"))
    model_dir = str(_random_model(tmp / "model", args.layers, max(args.lengths), args.family))
    limit = int(args.limit_gib * 2**30)
    rows = []
    for seq in args.lengths:
        for what in ("forward", "step"):
            for path in ("dense", "sparse"):
                earlier = [r for r in rows if r["path"] == path and r["what"] == what and r["seq_len"] < seq]
                if earlier and not earlier[-1]["fits"]:
                    rows.append({"seq_len": seq, "what": what, "path": path, "fits": False, "skipped": True})
                    continue
                cmd = [sys.executable, "-m", "indexcache_calib.evidence.bench_long", "--threads", str(args.cell_threads), "_memory-child",
                       "--model-dir", model_dir, "--seq", str(seq), "--path", path, "--what", what]
                p = subprocess.run(cmd, capture_output=True, text=True,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
                row = {"seq_len": seq, "what": what, "path": path, "fits": p.returncode == 0}
                if p.returncode == 0:
                    row.update(json.loads(p.stdout.strip().splitlines()[-1]))
                else:
                    row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"model": MEMORY_MODELS[args.family][0].format(layers=args.layers),
              "limit_bytes": limit, "threads": args.cell_threads, "rows": rows}
    _save(args.name or ("long_memory" if args.family == "glm" else f"long_memory_{args.family}"), result)
    print_memory(result)


def print_memory(result: dict) -> None:
    rows = result["rows"]
    get = {(r["seq_len"], r["what"], r["path"]): r for r in rows}
    gib = lambda r: f"{r['peak_added_bytes'] / 2**30:.2f} GiB" if r.get("fits") else f"over {result['limit_bytes'] / 2**30:.0f} GiB"
    sec = lambda r: f"{r['wall_s']:.1f} s" if r.get("fits") else "-"
    print(f"\n{result['model']}; one process per cell, {plural(result['threads'], 'thread')}, peak resident memory the work added")
    print("| tokens | forward dense | forward sparse | sparse / dense | step dense | step sparse | sparse / dense | same loss |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in sorted({r["seq_len"] for r in rows}):
        fd, fs, sd, ss = (get.get((seq, w, p), {}) for w, p in (("forward", "dense"), ("forward", "sparse"), ("step", "dense"), ("step", "sparse")))
        ratio = lambda a, b: f"{b['peak_added_bytes'] / a['peak_added_bytes']:.2f} mem, {b['wall_s'] / a['wall_s']:.2f} wall" \
            if a.get("fits") and b.get("fits") else "-"
        same = "yes" if fd.get("fits") and fs.get("fits") and abs(fd["loss"] - fs["loss"]) <= 1e-5 * abs(fd["loss"]) else (
            "-" if not fd.get("fits") else "NO")
        print(f"| {seq:,} | {gib(fd)}, {sec(fd)} | {gib(fs)}, {sec(fs)} | {ratio(fd, fs)} | {gib(sd)}, {sec(sd)} | "
              f"{gib(ss)}, {sec(ss)} | {ratio(sd, ss)} | {same} |")
    sparse = [get[(s, "forward", "sparse")] for s in sorted({r["seq_len"] for r in rows}) if get.get((s, "forward", "sparse"), {}).get("fits")]
    growth = [b["peak_added_bytes"] / a["peak_added_bytes"] for a, b in zip(sparse, sparse[1:])]
    if growth:
        print("sparse forward memory per doubling: " + ", ".join(f"x{g:.2f}" for g in growth))


# -- what a long calibration of a published model needs, from its config alone ---------------------

# Published configurations, written as config-only directories (no weights) for `--dry-run`: name -> (label, the
# config, default lengths). GLM-5 is transformers' `GlmMoeDsaConfig()`. The DeepSeek-V4 values are those of the
# published config.json files (deepseek-ai/DeepSeek-V4-Flash-Base, which transformers' `DeepseekV4Config()` also
# defaults to, and deepseek-ai/DeepSeek-V4-Pro), as mirrored in engines' tests and model notes; `compress_ratios`
# (0: sliding only, 4: compressed-sparse, 128: heavily compressed; the last entry is the MTP layer's) is the
# config's own per-layer key, which `DeepseekV4Config` turns into `layer_types`. Their lengths start above the
# floor (index_topk compressed entries of 4 tokens: 2,048 and 4,096 tokens) and reach their 1M context. What sizes
# nothing in a plan (RoPE scaling, token ids) is left at the class defaults.
V4_LENGTHS = (8192, 65536, 131072, 200_000, 1_048_576)
_V4_COMMON = dict(vocab_size=129280, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, num_experts_per_tok=6,
                  n_shared_experts=1, hc_mult=4, hc_sinkhorn_iters=20, sliding_window=128, o_lora_rank=1024,
                  index_n_heads=64, index_head_dim=128, num_nextn_predict_layers=1)


def _glm5():
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig()


def _v4_flash():
    from transformers import DeepseekV4Config

    return DeepseekV4Config(**_V4_COMMON, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                            num_attention_heads=64, q_lora_rank=1024, n_routed_experts=256, routed_scaling_factor=1.5,
                            o_groups=8, index_topk=512, num_hash_layers=3, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])


def _v4_pro():
    from transformers import DeepseekV4Config

    return DeepseekV4Config(**_V4_COMMON, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
                            num_attention_heads=128, q_lora_rank=1536, n_routed_experts=384, routed_scaling_factor=2.5,
                            o_groups=16, index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])


PLAN_CONFIGS = {
    "glm5": ("GlmMoeDsaConfig() (GLM-5), bfloat16", _glm5, None),
    "deepseek_v4_flash": ("DeepSeek-V4-Flash (its published config.json: 43 layers, 21 compressed-sparse, index_topk "
                          "512 entries of 4 tokens), bfloat16", _v4_flash, V4_LENGTHS),
    "deepseek_v4_pro": ("DeepSeek-V4-Pro (its published config.json: 61 layers, 30 compressed-sparse, index_topk 1024 "
                        "entries of 4 tokens), bfloat16", _v4_pro, V4_LENGTHS),
}


def bench_plan(args) -> None:
    """`--dry-run` of a published configuration (no weights) per length and attention path: the mask, the
    indexer's peak per call and the activation cache."""
    from indexcache_calib.calibrate import Options, dry_run

    label, build, default_lengths = PLAN_CONFIGS[args.config]
    lengths = args.lengths or list(default_lengths or PLAN_LENGTHS)
    tmp = Path(tempfile.mkdtemp(prefix="indexcache-plan-"))
    config = build()
    config.max_position_embeddings = max(lengths)
    config.save_pretrained(tmp)
    data = tmp / "data.txt"
    data.write_text("x\n")
    rows = []
    for seq in lengths:
        for path in ("dense", "sparse"):
            p = dry_run(Options(model=str(tmp), data=str(data), target="1/4", seq_len=seq, num_samples=args.samples,
                                dtype="bfloat16", device_map="cpu", attention=path))
            rows.append({"seq_len": seq, "attention": path, "mask_per_batch": p["attention_mask_per_batch"],
                         "indexer_peak": p["indexer_peak_per_layer"], "indexer_rows": p["indexer_rows_per_call"],
                         "activation_cache": p["activation_cache"], "pattern_positions": p["pattern_positions"],
                         "num_layers": p["num_layers"], "weights_total": p["weights_total"]})
    result = {"model": label, "config": args.config, "samples": args.samples, "rows": rows}
    _save("long_plan" if args.config == "glm5" else f"long_plan_{args.config}", result)
    print_plan(result)


def print_plan(result: dict) -> None:
    from indexcache_calib.dryrun import size_str

    get = {(r["seq_len"], r["attention"]): r for r in result["rows"]}
    print(f"\n{result['model']}, {result['samples']} calibration sequence(s), --dry-run per length")
    print("| tokens | mask per batch, dense | mask per batch, sparse | indexer peak per call | activation cache |")
    print("|---|---|---|---|---|")
    for seq in sorted({r["seq_len"] for r in result["rows"]}):
        d, s = get[(seq, "dense")], get[(seq, "sparse")]
        print(f"| {seq:,} | {size_str(d['mask_per_batch'])} | {size_str(s['mask_per_batch'])} | "
              f"{size_str(s['indexer_peak'])} ({s['indexer_rows']:,} rows) | {size_str(s['activation_cache'])} |")


# -- does calibration length matter? -------------------------------------------------------------

# What each calibration is, against the long one: the same tokens in more short sequences, or the same
# number of short sequences. Only the first varies length alone at equal data; the second, length at equal
# sequence count. A difference both show is length's.
LENGTH_CONDITIONS = ("long", "short, equal tokens", "short, equal sequences")
RESOLVE = 0.01  # nats: the difference the held-out scoring must resolve


def _length_runs(args, domain: str) -> list[dict]:
    """Every calibration of one domain: each condition on each draw (seed). Each run resumes from its own
    directory, so an interrupted `make long-context` loses at most the run in flight."""
    from indexcache_calib.calibrate import Hooks, Options, calibrate

    runs = []
    per_long = args.long_samples
    for draw in range(args.draws):
        for condition in LENGTH_CONDITIONS:
            seq = args.long if condition == "long" else args.short
            samples = per_long * args.long // args.short if condition == "short, equal tokens" else per_long
            out = OUT / "lengths" / domain / f"draw{draw}_{seq}x{samples}"
            done = out / "layer_map.json"
            if not done.exists():
                # Overlap is measured nowhere in this study: the searches skip it, so Shared layers run no indexer.
                opts = Options(model=args.model, data=f"calibration_data/{domain}.jsonl", target=f"1/{max(args.ratios)}",
                               out=str(out), seq_len=seq, num_samples=samples, seed=draw, plots=False, overlap=False,
                               resume=(out / "checkpoint.json").exists(), overwrite=not (out / "checkpoint.json").exists())
                t0 = time.perf_counter()
                calibrate(opts, Hooks(message=lambda m: print(m, file=sys.stderr)))
                (out / "wall_s.json").write_text(json.dumps(time.perf_counter() - t0) + "\n")
            lm = json.loads(done.read_text())
            wall = out / "wall_s.json"
            runs.append({"draw": draw, "condition": condition, "seq_len": seq, "samples": samples,
                         "wall_s": json.loads(wall.read_text()) if wall.exists() else None,
                         "patterns": {str(s["num_full"]): s["pattern"] for s in lm["path"]}})
    return runs


def _length_scores(args, domain: str, patterns: list[str]) -> dict:
    """Per-sequence held-out losses of each pattern at the long length, kept on disk as they come."""
    import torch

    from indexcache_calib.attention import set_attention
    from indexcache_calib.model import load_with_layout
    from indexcache_calib.runner import PatternRunner

    path = OUT / "lengths" / domain / f"heldout_{args.long}x{args.heldout_samples}.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    todo = [p for p in sorted(set(patterns), reverse=True) if p not in scores]  # sorted: shared prefixes run once
    if not todo:
        return scores
    model, layout = load_with_layout(args.model, device_map="cpu")
    set_attention(model, "sparse")
    torch.set_num_threads(args.threads)
    held = _tokens(args.model, f"calibration_data/{domain}.heldout.jsonl", args.long, args.heldout_samples)
    runner = PatternRunner(model, layout, held, measure_overlap=False, cache_device="cpu")
    try:
        for pattern in todo:
            scores[pattern] = runner.score(pattern).seq_losses
            print(f"{domain}: {pattern} {sum(scores[pattern]) / len(scores[pattern]):.5f}", file=sys.stderr)
            path.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    finally:
        runner.close()
    return scores


def length_table(runs: list[dict], scores: dict, ratios: list[int], layers: int) -> list[dict]:
    """Per ratio and short condition: each draw's held-out difference short - long (its paired SE over the
    held-out sequences), and their mean with the spread over draws."""
    from indexcache_calib.pattern import uniform_pattern
    from indexcache_calib.stats import mean_se

    def mean(xs):
        return math.fsum(xs) / len(xs)

    full = scores["F" * layers]
    table = []
    for ratio in ratios:
        k = str(math.ceil(layers / ratio))
        by = {(r["condition"], r["draw"]): r["patterns"][k] for r in runs}
        draws = sorted({r["draw"] for r in runs})
        row = {"ratio": f"1/{ratio}", "num_full": int(k),
               "uniform_gap": mean(scores[uniform_pattern(layers, ratio)]) - mean(full),
               "gap": {c: mean([mean(scores[by[c, d]]) - mean(full) for d in draws]) for c in LENGTH_CONDITIONS}}
        for condition in LENGTH_CONDITIONS[1:]:
            per_draw = []
            for d in draws:
                diff = [a - b for a, b in zip(scores[by[condition, d]], scores[by["long", d]])]
                m, se = mean_se(diff)
                sd = (se or 0.0) * math.sqrt(len(diff))
                per_draw.append({"draw": d, "short_minus_long": m, "paired_se": se, "per_sequence_sd": sd,
                                 "same_pattern": by[condition, d] == by["long", d]})
            m, se = mean_se([x["short_minus_long"] for x in per_draw])
            # Held-out sequences that put one draw's paired SE at RESOLVE / 2, so a difference of RESOLVE
            # nats stands two SE clear of zero.
            sd = max(x["per_sequence_sd"] for x in per_draw)
            row[condition] = {"mean": m, "se_over_draws": se, "draws": per_draw,
                              "heldout_needed": math.ceil((2 * sd / RESOLVE) ** 2)}
        table.append(row)
    return table


def bench_lengths(args) -> None:
    """Calibrate each long domain at a short and a long length on several draws, score every searched
    pattern (and uniform) at the long length on held-out data, and report short - long per ratio."""
    from indexcache_calib.pattern import uniform_pattern

    result = {"model": args.model, "short": args.short, "long": args.long, "draws": args.draws,
              "long_samples": args.long_samples, "heldout_sequences": args.heldout_samples, "domains": {}}
    for domain in args.domains:
        runs = _length_runs(args, domain)
        layers = max(len(p) for p in runs[0]["patterns"].values())
        wanted = ["F" * layers] + [uniform_pattern(layers, r) for r in args.ratios]
        wanted += [r["patterns"][str(math.ceil(layers / ratio))] for r in runs for ratio in args.ratios]
        scores = _length_scores(args, domain, wanted)
        full = scores["F" * layers]
        result["domains"][domain] = {
            "all_full_loss": math.fsum(full) / len(full),
            "runs": runs,
            "table": length_table(runs, scores, args.ratios, layers),
        }
    result["pooled"] = pooled_lengths(result, args.ratios)
    _save("lengths", result)
    print_lengths(result)


def pooled_lengths(result: dict, ratios: list[int]) -> list[dict]:
    """Both domains' draws together: the mean difference short - long and its SE over all draws."""
    from indexcache_calib.stats import mean_se

    rows = []
    for i, ratio in enumerate(ratios):
        row = {"ratio": f"1/{ratio}"}
        for condition in LENGTH_CONDITIONS[1:]:
            diffs = [x["short_minus_long"] for d in result["domains"].values() for x in d["table"][i][condition]["draws"]]
            m, se = mean_se(diffs)
            row[condition] = {"mean": m, "se_over_draws": se, "n": len(diffs)}
        rows.append(row)
    return rows


def print_lengths(r: dict) -> None:
    def pm(m, se):
        return f"{m:+.4f}" + (f" ± {se:.4f}" if se is not None else "")

    print(f"\n{r['model']}: calibrated at {r['short']} and {r['long']} tokens, {r['draws']} draws per condition; every pattern "
          f"scored on {r['heldout_sequences']} held-out sequences of {r['long']} tokens")
    for domain, d in r["domains"].items():
        runs = d["runs"]

        def wall(c):
            w = [x["wall_s"] for x in runs if x["condition"] == c and x["wall_s"] is not None]
            return f"{sum(w) / len(w):.0f} s" if w else "?"

        sizes = {x["condition"]: f"{x['samples']} x {x['seq_len']}" for x in runs}
        print(f"\n{domain} (all-Full {d['all_full_loss']:.5f}); mean calibration wall: " +
              ", ".join(f"{c} ({sizes[c]}) {wall(c)}" for c in LENGTH_CONDITIONS))
        print("| ratio | gap: long | gap: short, equal tokens | gap: short, equal sequences | uniform gap | "
              "short - long, equal tokens (± SE over draws) | short - long, equal sequences | per-draw paired SE |")
        print("|---|---|---|---|---|---|---|---|")
        for row in d["table"]:
            g = row["gap"]
            se = max((x["paired_se"] or 0.0) for c in LENGTH_CONDITIONS[1:] for x in row[c]["draws"])
            print(f"| {row['ratio']} | {g['long']:+.4f} | {g['short, equal tokens']:+.4f} | {g['short, equal sequences']:+.4f} | "
                  f"{row['uniform_gap']:+.4f} | {pm(row['short, equal tokens']['mean'], row['short, equal tokens']['se_over_draws'])} | "
                  f"{pm(row['short, equal sequences']['mean'], row['short, equal sequences']['se_over_draws'])} | at most {se:.4f} |")
    need = max(row[c]["heldout_needed"] for d in r["domains"].values() for row in d["table"] for c in LENGTH_CONDITIONS[1:])
    print(f"\nHeld-out sequences that resolve {RESOLVE} nats in one draw (paired SE {RESOLVE / 2}, from the largest "
          f"per-sequence SD of a difference): {need}; scored on {r['heldout_sequences']}")
    print("\nBoth domains' draws together: short - long at the long length (positive: the long calibration is better)")
    print("| ratio | equal tokens | equal sequences |")
    print("|---|---|---|")
    for row in r["pooled"]:
        e, q = row["short, equal tokens"], row["short, equal sequences"]
        print(f"| {row['ratio']} | {pm(e['mean'], e['se_over_draws'])} (n={e['n']}) | {pm(q['mean'], q['se_over_draws'])} (n={q['n']}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--limit-gib", type=float, default=16.0, help="address-space limit of each measuring process")
    # One thread by default, as the README's table was measured: the top-level --threads is this process's.
    m.add_argument("--cell-threads", type=int, default=1, help="torch threads of each measuring process")
    m.add_argument("--family", choices=sorted(MEMORY_MODELS), default="glm", help="the random model measured")
    m.add_argument("--name", default=None, help="result file under outputs/bench/ (default: long_memory, and "
                                               "long_memory_<family> for another family)")
    c = sub.add_parser("_memory-child")
    c.add_argument("--model-dir")
    c.add_argument("--seq", type=int)
    c.add_argument("--path", choices=["dense", "sparse"])
    c.add_argument("--what", choices=["forward", "step"])
    pl = sub.add_parser("plan")
    pl.add_argument("--config", choices=sorted(PLAN_CONFIGS), default="glm5", help="the published configuration planned")
    pl.add_argument("--lengths", type=int, nargs="+", default=None,
                    help=f"tokens (default: {' '.join(map(str, PLAN_LENGTHS))}; DeepSeek-V4: {' '.join(map(str, V4_LENGTHS))})")
    pl.add_argument("--samples", type=int, default=1)
    ln = sub.add_parser("lengths")
    ln.add_argument("--model", default="tiny-dsa-long")
    ln.add_argument("--domains", nargs="+", default=["code-long", "docs-long"],
                    help="calibration_data/<domain>.jsonl, scored on <domain>.heldout.jsonl")
    ln.add_argument("--short", type=int, default=256, help="short calibration length (tokens)")
    ln.add_argument("--long", type=int, default=1024, help="long calibration and scoring length (tokens)")
    ln.add_argument("--long-samples", type=int, default=2, help="sequences of the long calibration (the short "
                    "ones have as many, and as many tokens)")
    ln.add_argument("--draws", type=int, default=4, help="calibration draws (seeds) per condition")
    ln.add_argument("--heldout-samples", type=int, default=96,
                    help="held-out sequences at --long (the shipped held-out files hold about 110 of 1024 tokens)")
    ln.add_argument("--ratios", type=int, nargs="+", default=[2, 4])
    args = p.parse_args()
    quiet(args.threads)
    if args.cmd == "_memory-child":
        print(json.dumps(_memory_child(args.model_dir, args.seq, args.path, args.what)))
    else:
        {"memory": bench_memory, "plan": bench_plan, "lengths": bench_lengths}[args.cmd](args)


if __name__ == "__main__":
    main()

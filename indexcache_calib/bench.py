"""Benchmarks (`make bench`): every number is a ratio measured side by side in one run.

  python -m indexcache_calib.bench search      naive vs fast search on the trained models
  python -m indexcache_calib.bench draws       fast vs exact (Algorithm 1's answer) over calibration draws
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


def bench_search(args) -> None:
    device = "cuda:0" if args.device == "cuda" else "cpu"
    for spec in args.models:
        samples, seq = SEARCH_CASES[spec]
        model, layout = _load(spec, device_map=device)
        ids = _tokens(spec, args.data, seq, samples)
        held = _tokens(spec, args.heldout, seq, samples)
        result = compare_searches(model, layout, ids, held, label=spec, cache_device="gpu" if args.device == "cuda" else "cpu")
        result["device"] = device
        _save(f"search_{spec}", result)  # one file per model: a long run keeps what it finished
        del model
    print_search({spec: json.loads((OUT / f"search_{spec}.json").read_text())
                  for spec in SEARCH_CASES if (OUT / f"search_{spec}.json").exists()})


def print_search(results: dict) -> None:
    print("\n| model | device | layers | tokens | layer-forwards naive | fast | ratio | wall naive | fast | ratio | fast cache peak | same F-set 1/2, 1/4, 1/8 | fast vs naive loss, calib / held-out (1/2, 1/4, 1/8) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, r in results.items():
        same = ", ".join("yes" if row["identical"] else "no" for row in r["ratios"].values())
        diffs = "; ".join(f"{row['calib_rel_diff']:+.4%} / {row['heldout_rel_diff']:+.4%}" for row in r["ratios"].values())
        print(f"| {spec} | {r.get('device', 'cpu')} | {r['layers']} | {r['sequences']}x{r['seq_len']} | {r['naive']['layer_forwards']:,} | "
              f"{r['fast']['layer_forwards']:,} | {r['forwards_ratio']:.3f} | {r['naive']['wall_s']:.0f}s | "
              f"{r['fast']['wall_s']:.0f}s | {r['wall_ratio']:.3f} | {r['fast']['peak_cache_bytes'] / 2**20:.1f} MiB | {same} | {diffs} |")
    for spec, r in results.items():
        for m in r["misses_before_divergence"]:
            print(f"{spec}: step {m['step']} fast chose layer {m['fast']}, naive {m['naive']}: gap {m['loss_gap']:.6f} nats, "
                  f"paired SE {m['paired_se']:.6f} -> {'within' if m['within_one_se'] else 'OUTSIDE'} one SE")


# -- calibration draws ---------------------------------------------------------------------

def bench_draws(args) -> None:
    """The fast search against Algorithm 1's answer on several random draws of calibration sequences.

    One draw is one greedy path, and near-ties make paths fork, so a single comparison says little about
    how far the fast search's patterns fall from the full sweep's. The reference here is `exact`, which
    is Algorithm 1 bit for bit (tested) at about half of naive's cost; naive's layer-forwards are counted
    from the config, since they do not depend on the picks.
    """
    from indexcache_calib.dryrun import search_work

    spec = args.model
    samples, seq = SEARCH_CASES[spec]
    model, layout = _load(spec)
    held = _tokens(spec, args.heldout, seq, args.heldout_samples)
    for seed in args.seeds:
        ids = _tokens(spec, args.data, seq, samples, seed=seed)
        r = compare_searches(model, layout, ids, held, label=f"{spec} draw {seed}", reference="exact")
        floor = r["ratios"]["1/8"]["num_full"]  # where both searches stopped
        naive = search_work(layout.num_layers, layout.fixed_shared, floor, "naive", samples)["layer_forwards"]
        r.update({"seed": seed, "naive_layer_forwards": naive, "fast_vs_naive_forwards": r["fast"]["layer_forwards"] / naive})
        _save(f"draws_{spec}_seed{seed}", r)
    print_draws(spec)


def print_draws(spec: str) -> None:
    files = sorted(OUT.glob(f"draws_{spec}_seed*.json"), key=lambda f: int(f.stem.rsplit("seed", 1)[1]))
    rows = [json.loads(f.read_text()) for f in files]
    print(f"\n{spec}: fast search vs Algorithm 1 (exact) on {len(rows)} calibration draws, relative loss difference "
          "fast − exact ± its paired standard error, calibration / held-out")
    print("| draw | layer-forwards fast / naive | same F-set 1/2, 1/4, 1/8 | 1/2 | 1/4 | 1/8 | first fork (gap in paired SE) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = ", ".join("yes" if row["identical"] else "no" for row in r["ratios"].values())
        cells = " | ".join(f"{row['calib_rel_diff']:+.3%} ± {row['calib_rel_se']:.3%} / {row['heldout_rel_diff']:+.3%} ± "
                           f"{row['heldout_rel_se']:.3%}" for row in r["ratios"].values())
        m = r["misses_before_divergence"]
        fork = f"step {m[0]['step']} ({m[0]['loss_gap'] / m[0]['paired_se']:.2f} SE)" if m and m[0]["paired_se"] else "none"
        print(f"| {r['seed']} | {r['fast_vs_naive_forwards']:.3f} | {same} | {cells} | {fork} |")
    for ratio in ("1/2", "1/4", "1/8"):
        calib = [r["ratios"][ratio]["calib_rel_diff"] for r in rows]
        held = [r["ratios"][ratio]["heldout_rel_diff"] for r in rows]
        if calib:
            print(f"{ratio}: calibration mean {sum(calib) / len(calib):+.3%}, worst {max(calib):+.3%}; "
                  f"held-out mean {sum(held) / len(held):+.3%}, worst {max(held):+.3%}")


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
    timings = {}
    for name, cmd, threads in [
        ("1 process", [sys.executable, "-m", "indexcache_calib", *common, "--out", str(tmp / "one")], "2"),
        ("2 processes", [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", "29577", "-m",
                         "indexcache_calib", *common, "--out", str(tmp / "two")], "1"),
    ]:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--models", nargs="+", default=list(SEARCH_CASES), choices=list(SEARCH_CASES))
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--data", default="calibration_data/code.jsonl")
    s.add_argument("--heldout", default="calibration_data/code.heldout.jsonl")
    d = sub.add_parser("draws")
    d.add_argument("--model", default="tiny-dsa-deep", choices=list(SEARCH_CASES))
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    d.add_argument("--data", default="calibration_data/code.jsonl")
    d.add_argument("--heldout", default="calibration_data/code.heldout.jsonl")
    d.add_argument("--heldout-samples", type=int, default=16, help="held-out sequences (same length as calibration)")
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
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.cmd == "_indexer-child":
        _indexer_child(args.seq, args.chunk, args.heads)
    else:
        {"search": bench_search, "draws": bench_draws, "indexer": bench_indexer, "parallel": bench_parallel, "gpu": bench_gpu}[args.cmd](args)


if __name__ == "__main__":
    main()

"""The scaling benchmarks (docs/scaling-out.md): the indexer's peak memory chunked and unchunked (`bench
indexer`, each call in a fresh process), candidate-parallel speedup (`bench parallel`), and both searches on
random DSA models on a GPU (`bench gpu`). Run through `python -m indexcache_calib.evidence.bench`."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from indexcache_calib.evidence.bench_search import compare_searches
from indexcache_calib.evidence.common import _load, _save

# -- indexer memory --------------------------------------------------------------------------

def indexer_child(seq: int, chunk: int | None, heads: int) -> None:
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
        cmd = [sys.executable, "-m", "indexcache_calib.evidence.bench", "_indexer-child", "--seq", str(args.seq), "--heads", str(args.heads)]
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
        for s in ("naive", "race"):
            r[s].pop("path")
        results[name] = r
        del model
        torch.cuda.empty_cache()
    _save("gpu", results)
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']} (random weights: timings only)")
    print("| model | layers | hidden | tokens | naive wall | race wall | wall ratio | layer-forwards ratio | peak GPU naive / race | same F-sets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"
        same = ", ".join("yes" if row["identical"] else "no" for row in r["ratios"].values())
        print(f"| {name} | {r['layers']} | {r['hidden']} | {r['sequences']}x{r['seq_len']} | {r['naive']['wall_s']:.1f}s | "
              f"{r['race']['wall_s']:.1f}s | {r['wall_ratio']:.3f} | {r['forwards_ratio']:.3f} | "
              f"{gib(r['naive']['peak_gpu_bytes'])} / {gib(r['race']['peak_gpu_bytes'])} | {same} |")

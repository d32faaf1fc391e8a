"""The paper's Table 2 at small scale, with the evidence that the model's indexers are trained, from one
command (`make paper-table`):

    python -m indexcache_calib.evidence.paper_table [--model tiny-dsa] [--seq-len 512] [--num-samples 8]
                                           [--heldout-samples 16] [--out outputs/paper_table]

1. Per layer, the share of dense, head-averaged attention mass inside the indexer's top-k, beside a
   random top-k and the best possible one, on held-out tokens.
2. Held-out loss of all-F, and at 1/2, 1/4 and 1/8 of the layers Full the greedy-searched pattern
   (one `calibrate` run per domain) against uniform interleaving.
3. Each domain's held-out loss under the pattern calibrated on another domain.

Differences between two patterns come with a paired standard error over held-out sequences. Markdown
goes to stdout and `paper_table.md`; every number to `paper_table.json`; progress to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from indexcache_calib import artifact as art
from indexcache_calib.calibrate import Hooks, Options, calibrate, prepare, versions
from indexcache_calib.data import pack, read_documents
from indexcache_calib.errors import CalibError, plural
from indexcache_calib.pattern import FULL, uniform_pattern
from indexcache_calib.search import paired  # noqa: F401 - part of this module's interface
from indexcache_calib.training.warmup import mass_shares as topk_mass  # noqa: F401 - part of this module's interface
from indexcache_calib.training.warmup import topk_mass as per_layer
from indexcache_calib.training.warmup import use_eager

# transformers, and the modules here that import it (model, runner), are imported inside the functions: it
# imports huggingface_hub, which reads HF_HUB_OFFLINE once, when imported, and `main` sets that first.

RATIOS = (2, 4, 8)  # 1/2, 1/4 and 1/8 of the layers Full, as in the paper
TABLE_MD, TABLE_JSON = "paper_table.md", "paper_table.json"


@torch.no_grad()
def attention_mass(model, ids: torch.Tensor, batch_size: int = 1) -> dict:
    """Per layer, mean `topk_mass` shares over every valid query of `ids`. The attention is the dense
    forward (every indexer bypassed), the distribution the indexers were trained to imitate; each
    layer's top-k is its own indexer's, run on that forward's inputs (`warmup.topk_mass`). Layers without
    an indexer get None."""
    k, n = int(model.config.index_topk), model.config.num_hidden_layers
    previous = use_eager(model)  # the only implementation that returns attention probabilities
    try:
        mass = per_layer(model, ids, batch_size)
    finally:
        model.set_attn_implementation(previous)
    layers = [
        {"layer": i, "indexer": mass[i]["indexer"], "oracle": mass[i]["oracle"], "random": mass[i]["random"]} if i in mass
        else {"layer": i, "indexer": None, "oracle": None, "random": None}
        for i in range(n)
    ]
    queries = len(ids) * max(ids.shape[1] - k, 0)
    return {"index_topk": k, "queries_per_layer": queries, "sequences": len(ids), "seq_len": ids.shape[1], "layers": layers}


def table_rows(num_layers: int, searched: dict, scores: dict) -> list[dict]:
    """One row per held-out domain and ratio. searched: calibration domain -> ratio -> pattern;
    scores: held-out domain -> pattern -> Score (every pattern scored on that domain's tokens)."""
    rows = []
    for domain, by_pattern in scores.items():
        all_f = by_pattern[FULL * num_layers]
        for every in RATIOS:
            mine, uniform = searched[domain][every], uniform_pattern(num_layers, every)
            diff, se = paired(by_pattern[mine], by_pattern[uniform])
            others = {}
            for other in searched:
                if other != domain:
                    theirs = searched[other][every]
                    o_diff, o_se = paired(by_pattern[theirs], by_pattern[mine])
                    others[other] = {"pattern": theirs, "loss": by_pattern[theirs].loss,
                                     "delta": by_pattern[theirs].loss - all_f.loss, "minus_same": o_diff, "se": o_se}
            rows.append({
                "heldout": domain, "ratio": f"1/{every}", "num_full": mine.count(FULL), "all_full_loss": all_f.loss,
                "searched": {"pattern": mine, "loss": by_pattern[mine].loss, "delta": by_pattern[mine].loss - all_f.loss},
                "uniform": {"pattern": uniform, "loss": by_pattern[uniform].loss, "delta": by_pattern[uniform].loss - all_f.loss},
                "searched_minus_uniform": diff, "se": se, "other_domains": others,
            })
    return rows


def run(model: str = "tiny-dsa", data_dir: str = "calibration_data", seq_len: int = 512, num_samples: int = 8,
        heldout_samples: int = 16, out: str = "outputs/paper_table", batch_size: int = 1, seed: int = 0,
        log=lambda text: None) -> dict:
    """Calibrate on every domain, then score everything on every domain's held-out split. Returns the
    dict written to paper_table.json."""
    # deferred: these import transformers, see HF_HUB_OFFLINE at the top
    from indexcache_calib.model import load_config, resolve
    from indexcache_calib.runner import PatternRunner

    t_start = time.time()
    data_dir, out = Path(data_dir), Path(out)
    domains = sorted(p.name[: -len(".heldout.jsonl")] for p in data_dir.glob("*.heldout.jsonl"))
    domains = [d for d in domains if (data_dir / f"{d}.jsonl").is_file()]
    if not domains:
        raise CalibError(f"{data_dir} has no <domain>.jsonl with a <domain>.heldout.jsonl beside it")
    hooks = Hooks(message=log, warn=lambda text: log(f"warning: {text}"))
    n = load_config(resolve(model)).num_hidden_layers
    num_full = {every: math.ceil(n / every) for every in RATIOS}

    # One run down to 1/8 gives 1/2 and 1/4 too: the F-sets along a greedy path are nested.
    searched, calibration = {}, {}
    for d in domains:
        t0 = time.time()
        log(f"calibrating on {d}")
        opts = Options(model=model, data=str(data_dir / f"{d}.jsonl"), num_full=min(num_full.values()), seq_len=seq_len,
                       num_samples=num_samples, seed=seed, batch_size=batch_size, search="race", plots=False,
                       out=str(out / "calibration" / d), overwrite=True)
        layer_map, run_dir = calibrate(opts, hooks)
        by_count = {row["num_full"]: row for row in layer_map["path"]}
        searched[d] = {every: by_count[num_full[every]]["pattern"] for every in RATIOS}
        calibration[d] = {
            "run_dir": str(run_dir), "sequences": layer_map["provenance"]["num_samples"],
            "all_full_loss": layer_map["loss"]["all_full"], "seconds": round(time.time() - t0, 1),
            "patterns": {f"1/{every}": {"pattern": by_count[num_full[every]]["pattern"], "loss": by_count[num_full[every]]["loss"]}
                         for every in RATIOS},
        }

    t0 = time.time()
    prep = prepare(Options(model=model, data=str(data_dir / f"{domains[0]}.heldout.jsonl"), seq_len=seq_len,
                           num_samples=heldout_samples, seed=seed, batch_size=batch_size), hooks)
    heldout, available = {}, {}
    for d in domains:
        texts = read_documents(data_dir / f"{d}.heldout.jsonl", prep.tokenizer).texts
        heldout[d], available[d] = pack(texts, prep.tokenizer, seq_len, heldout_samples, seed)
        if len(heldout[d]) < heldout_samples:
            log(f"warning: {d}.heldout.jsonl fills only {plural(len(heldout[d]), 'sequence')} of {seq_len} tokens")
    log("measuring attention mass inside the top-k on the held-out tokens")
    mass = attention_mass(prep.model, torch.cat([heldout[d] for d in domains]), batch_size)
    mass_seconds = time.time() - t0

    t0 = time.time()
    patterns = [FULL * n] + [uniform_pattern(n, every) for every in RATIOS]
    patterns += [searched[d][every] for d in domains for every in RATIOS]
    scores = {}
    for d in domains:
        log(f"scoring {plural(len(set(patterns)), 'pattern')} on {d} held-out")
        runner = PatternRunner(prep.model, prep.layout, heldout[d], batch_size=batch_size, measure_overlap=False, cache_device="none")
        try:
            scores[d] = {p: runner.score(p) for p in dict.fromkeys(patterns)}
        finally:
            runner.close()
    return {
        "settings": {"model": model, "data_dir": str(data_dir), "domains": domains, "num_layers": n,
                     "index_topk": prep.layout.budget, "seq_len": seq_len, "num_samples": num_samples,
                     "heldout_samples": heldout_samples, "batch_size": batch_size, "seed": seed, "search": "race"},
        "attention_mass": mass,
        "calibration": calibration,
        "heldout": {d: {"sequences": len(heldout[d]), "windows_available": available[d],
                        "scores": {p: {"loss": s.loss, "seq_losses": s.seq_losses} for p, s in scores[d].items()}}
                    for d in domains},
        "rows": table_rows(n, searched, scores),
        "versions": versions(),
        "seconds": {"calibration": sum(c["seconds"] for c in calibration.values()), "attention_mass": round(mass_seconds, 1),
                    "heldout_scoring": round(time.time() - t0, 1), "total": round(time.time() - t_start, 1)},
    }


def _diff(same: bool, mean: float, se: float | None) -> str:
    if same:
        return "0"
    return f"{mean:+.4f} ± {se:.4f}" if se is not None else f"{mean:+.4f}"


def _lower(same: bool, mean: float, se: float | None, below: str, above: str) -> str:
    """Which side has the lower loss, and whether the gap is under two standard errors."""
    if same:
        return "same pattern"
    if mean == 0:
        return "equal"
    name = below if mean < 0 else above
    return name + (" (within 2 SE)" if se is not None and abs(mean) < 2 * se else "")


def markdown(result: dict) -> str:
    s, mass = result["settings"], result["attention_mass"]
    k, n, domains = mass["index_topk"], s["num_layers"], s["domains"]
    counts = ", ".join(f"{d} {result['heldout'][d]['sequences']}" for d in domains)
    lines = [
        f"### 1. Attention mass inside the indexer's top-{k}",
        "",
        f"{s['model']}: per layer, the share of the layer's dense, head-averaged attention probability that falls "
        f"inside a set of {plural(k, 'key')}, on {plural(mass['sequences'], 'held-out sequence')} of {mass['seq_len']} tokens ({counts}), "
        f"query positions {k} to {mass['seq_len'] - 1} only ({mass['queries_per_layer']:,} queries per layer). "
        f"**indexer**: the layer's own indexer top-{k}. **random**: {k} of the t+1 visible keys drawn uniformly, "
        f"k/(t+1) for the query at position t, averaged over the same queries (analytic, not sampled). "
        f"**oracle**: the {plural(k, 'key')} with the most attention. **gap closed**: (indexer − random) / (oracle − random).",
        "",
        "| layer | indexer | random | oracle | gap closed |",
        "|---|---|---|---|---|",
    ]
    for row in mass["layers"]:
        if row["indexer"] is None:
            lines.append(f"| {row['layer']} | no indexer | | | |")
            continue
        span = row["oracle"] - row["random"]
        closed = f"{(row['indexer'] - row['random']) / span:.2f}" if span > 0 else "-"
        lines.append(f"| {row['layer']} | {row['indexer']:.3f} | {row['random']:.3f} | {row['oracle']:.3f} | {closed} |")

    cal = result["calibration"]
    cal_counts = ", ".join(f"{d} {cal[d]['sequences']}" for d in domains)
    lines += [
        "",
        "### 2. Held-out loss: searched pattern vs uniform interleaving",
        "",
        f"Mean next-token loss (nats/token) on each domain's held-out split (`<domain>.heldout.jsonl`, {counts} sequences "
        f"of {s['seq_len']} tokens). **searched**: the greedy pattern calibrated on the same domain's `<domain>.jsonl` "
        f"({cal_counts} sequences of {s['seq_len']} tokens, `--search {s['search']}`); "
        f"**uniform**: one Full layer every 2, 4 or 8 layers from layer 0. Δ is against all-F on the same tokens; "
        "± is the standard error of the paired per-sequence difference.",
        "",
        f"| held-out | Full layers (of {n}) | all-F | searched | Δ vs all-F | uniform | Δ vs all-F | searched − uniform | lower loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for r in rows:
        same = r["searched"]["pattern"] == r["uniform"]["pattern"]
        lines.append(
            f"| {r['heldout']} | {r['ratio']} ({r['num_full']}) | {r['all_full_loss']:.4f} | {r['searched']['loss']:.4f} "
            f"| {r['searched']['delta']:+.4f} | {r['uniform']['loss']:.4f} | {r['uniform']['delta']:+.4f} "
            f"| {_diff(same, r['searched_minus_uniform'], r['se'])} "
            f"| {_lower(same, r['searched_minus_uniform'], r['se'], 'searched', 'uniform')} |"
        )
    lines += ["", "Patterns (one character per layer, layer 0 first):", "",
              "| Full layers | " + " | ".join(f"calibrated on {d}" for d in domains) + " | uniform |",
              "|---" * (len(domains) + 2) + "|"]
    for r in [r for r in rows if r["heldout"] == domains[0]]:
        pats = [cal[d]["patterns"][r["ratio"]]["pattern"] for d in domains] + [r["uniform"]["pattern"]]
        lines.append(f"| {r['ratio']} ({r['num_full']}) | " + " | ".join(f"`{p}`" for p in pats) + " |")

    if len(domains) > 1:
        lines += [
            "",
            "### 3. Domain sensitivity: the pattern calibrated on another domain",
            "",
            "Held-out loss under the pattern calibrated on the same domain and under the one calibrated on the other "
            "domain; ± is the paired standard error.",
            "",
            "| held-out | Full layers | same-domain pattern | calibrated on | other-domain pattern | other − same | lower loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            for other, o in r["other_domains"].items():
                same = o["pattern"] == r["searched"]["pattern"]
                lines.append(
                    f"| {r['heldout']} | {r['ratio']} ({r['num_full']}) | {r['searched']['loss']:.4f} | {other} | {o['loss']:.4f} "
                    f"| {_diff(same, o['minus_same'], o['se'])} | {_lower(same, o['minus_same'], o['se'], 'other-domain', 'same-domain')} |"
                )
    v, sec = result["versions"], result["seconds"]
    lines += ["", f"Wall time {sec['total'] / 60:.1f} min (calibration {sec['calibration'] / 60:.1f} min); "
              f"torch {v['torch']}, transformers {v['transformers']}, indexcache {v['indexcache']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-dsa")
    p.add_argument("--data-dir", default="calibration_data", help="holds <domain>.jsonl and <domain>.heldout.jsonl")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=8, help="calibration sequences per domain")
    p.add_argument("--heldout-samples", type=int, default=16, help="held-out sequences per domain")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/paper_table")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # deferred: see HF_HUB_OFFLINE at the top

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        result = run(a.model, a.data_dir, a.seq_len, a.num_samples, a.heldout_samples, a.out, a.batch_size, a.seed,
                     log=lambda text: print(text, file=sys.stderr, flush=True))
    except CalibError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    text = markdown(result)
    out = Path(a.out)
    art.write_json(out / TABLE_JSON, result)
    art.atomic_write(out / TABLE_MD, text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

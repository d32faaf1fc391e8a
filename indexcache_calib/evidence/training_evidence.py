"""Evidence for the training commands at small scale, from one command (`make training-evidence`):

    python -m indexcache_calib.evidence.training_evidence [--source tiny-mla] [--model tiny-dsa] [--out outputs/training_evidence]

1. dsa-convert: the embedded plain-MLA model (`tiny-mla`, a glm4_moe_lite trained by the recipe) is converted
   with the dense indexer warm-up on the code training split. On held-out tokens of both domains, per layer:
   the dense attention mass inside the new indexer's top-k, beside a random top-k and the oracle one
   ("captured" = (indexer - random) / (oracle - random)); and the all-Full sparse loss against dense.
2. distill: on the embedded DSA model (`tiny-dsa`), uniform interleaving at 1/4 of the layers Full after
   `distill` (on the code training split, and on both training splits) against the same pattern before it,
   and against the training-free greedy-searched 1/4 pattern (one `calibrate` run on the code training
   split), which is also distilled.

Everything is measured on the held-out splits only; differences are paired over sequences with their
standard error. Markdown goes to stdout and `training_evidence.md`, every number to `training_evidence.json`,
progress to stderr. Each stage resumes from its own checkpoint, and a finished stage is reused, so an
interrupted run loses nothing: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from indexcache_calib.training import trainloop as tl
from indexcache_calib.calibrate import Hooks, Options, calibrate, versions
from indexcache_calib.training.convert import ConvertOptions, convert
from indexcache_calib.data import pack, read_documents
from indexcache_calib.training.distill import DistillOptions, _load_config, distill, family_to_train, load_with_pattern
from indexcache_calib.errors import CalibError, plural
from indexcache_calib.model import read_config_json, resolve
from indexcache_calib.pattern import FULL, uniform_pattern
from indexcache_calib.training.warmup import paired, sequence_losses, topk_mass, use_eager

RESULT_MD, RESULT_JSON = "training_evidence.md", "training_evidence.json"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _hooks(name: str):
    state = {"t0": time.time(), "total": 0}

    def started(total, done):
        state.update(total=total, t0=time.time(), done=done)

    def step(row):
        n = row["step"]
        if n % 10 == 0 or n == state["total"]:
            rate = (time.time() - state["t0"]) / max(1, n - state["done"])
            _log(f"[{name}] step {n}/{state['total']} loss {row['loss']:.5f} eta {rate * (state['total'] - n) / 60:.1f} min")

    return tl.Hooks(message=lambda t: _log(f"[{name}] {t}"), started=started, step=step)


def _finished(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / tl.TRAINING_LOG).is_file()


def _resumable(out: Path) -> bool:
    return (out / tl.STATE_DIR / tl.STATE).is_file()


def heldout(tokenizer, data_dir: Path, domains, seq_len: int, samples: int, seed: int = 0) -> dict:
    out = {}
    for d in domains:
        texts = read_documents(data_dir / f"{d}.heldout.jsonl", tokenizer).texts
        out[d], _ = pack(texts, tokenizer, seq_len, samples, seed)
    return out


def _diff(a: list[float], b: list[float]) -> dict:
    mean, se = paired(a, b)
    return {"mean": mean, "se": se}


def run_convert(args, data_dir: Path, out: Path) -> dict:
    target = out / "converted"
    if not _finished(target):
        opts = ConvertOptions(model=args.source, data=str(data_dir / "code.jsonl"), out=str(target), steps=args.convert_steps,
                              seq_len=args.seq_len, batch_size=args.batch_size, lr=args.convert_lr, seed=args.seed,
                              index_topk=args.index_topk, index_heads=args.index_heads, index_head_dim=args.index_head_dim,
                              resume=_resumable(target), overwrite=target.exists() and not _resumable(target))
        convert(opts, _hooks("dsa-convert"), lambda t: _log(f"warning: {t}"))
    log = json.loads((target / "training_log.json").read_text())
    _log("[dsa-convert] evaluating on the held-out splits")
    model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True)
    model.requires_grad_(False)
    use_eager(model)
    tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    ids = heldout(tok, data_dir, args.domains, args.seq_len, args.heldout_samples, args.seed)
    mass = topk_mass(model, torch.cat([ids[d] for d in args.domains]))
    losses = {}
    for d in args.domains:
        dense_l = sequence_losses(model, ids[d], dense_attention=True)
        sparse_l = sequence_losses(model, ids[d])
        losses[d] = {"dense": sum(dense_l) / len(dense_l), "all_full_sparse": sum(sparse_l) / len(sparse_l),
                     "sparse_minus_dense": _diff(sparse_l, dense_l), "sequences": len(dense_l)}
    source_log = Path(resolve(args.source).location) / "training_log.json"
    return {
        "source": args.source, "source_training": json.loads(source_log.read_text()) if source_log.is_file() else None,
        "checkpoint": str(target), "training": log["training"], "data": log["data"],
        "check_against_source_max_rel_diff": log["check_against_source_max_rel_diff"],
        "index_topk": log["model"]["index_topk"], "index_n_heads": log["model"]["index_n_heads"],
        "index_head_dim": log["model"]["index_head_dim"],
        "topk_mass": {str(k): v for k, v in mass.items()}, "min_captured": min(v["captured"] for v in mass.values()),
        "loss": losses,
    }


def run_distill(args, data_dir: Path, out: Path) -> dict:
    _, src, raw = read_config_json(args.model)
    fam = family_to_train(raw, args.model)  # the registry's family, as distill itself picks it for this checkpoint
    config, sub = _load_config(src)
    n = sub.num_hidden_layers
    every = args.every
    uniform = uniform_pattern(n, every)
    num_full = uniform.count(FULL)

    run_dir = out / "calibration"
    lm_path = run_dir / "layer_map.json"
    if lm_path.is_file():
        layer_map = json.loads(lm_path.read_text())
    else:
        _log(f"[calibrate] greedy search down to {plural(num_full, 'Full layer')} on code.jsonl")
        opts = Options(model=args.model, data=str(data_dir / "code.jsonl"), num_full=num_full, seq_len=args.seq_len,
                       num_samples=args.calibration_samples, seed=args.seed, search="race", plots=False, out=str(run_dir),
                       overwrite=True)
        layer_map, _ = calibrate(opts, Hooks(message=lambda t: _log(f"[calibrate] {t}")))
    searched = layer_map["pattern"]

    code = data_dir / "code.jsonl"
    runs = [("uniform", uniform, code)]
    if args.distill_mixed:
        mixed = out / "train_code_docs.jsonl"  # both training splits, as tiny-dsa itself was trained
        mixed.write_bytes(code.read_bytes() + (data_dir / "docs.jsonl").read_bytes())
        runs.append(("uniform_mixed", uniform, mixed))
    if args.distill_searched:
        runs.append(("searched", searched, code))
    distilled = {}
    for name, pattern, data in runs:
        target = out / f"distilled_{name}"
        if not _finished(target):
            opts = DistillOptions(model=args.model, data=str(data), out=str(target), pattern=pattern,
                                  steps=args.distill_steps, seq_len=args.seq_len, batch_size=args.batch_size,
                                  lr=args.distill_lr, seed=args.seed, resume=_resumable(target),
                                  overwrite=target.exists() and not _resumable(target))
            distill(opts, _hooks(f"distill {name}"), lambda t: _log(f"warning: {t}"))
        distilled[name] = target

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    ids = heldout(tok, data_dir, args.domains, args.seq_len, args.heldout_samples, args.seed)

    def score(model) -> dict:
        model.requires_grad_(False)
        return {d: sequence_losses(model, ids[d]) for d in args.domains}

    _log("[distill] scoring on the held-out splits")
    seq: dict[str, dict] = {}
    for name, pattern in (("all_full", FULL * n), ("uniform_before", uniform), ("searched", searched)):
        config, sub = _load_config(src)
        seq[name] = score(load_with_pattern(src, config, sub, fam, pattern, "auto", "cpu"))
    for name, target in distilled.items():
        model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True)
        use_eager(model)
        seq[f"{name}_after"] = score(model)

    pairs = [("uniform_after", "uniform_before"), ("uniform_after", "searched"), ("uniform_before", "searched"),
             ("uniform_after", "all_full")]
    if "uniform_mixed_after" in seq:
        pairs += [("uniform_mixed_after", "uniform_before"), ("uniform_mixed_after", "searched"),
                  ("uniform_mixed_after", "all_full")]
    if "searched_after" in seq:
        pairs += [("searched_after", "searched"), ("searched_after", "all_full")]
    rows = {d: {"mean": {k: sum(v[d]) / len(v[d]) for k, v in seq.items()}, "sequences": len(ids[d]),
                "diff": {f"{a}_minus_{b}": _diff(seq[a][d], seq[b][d]) for a, b in pairs}} for d in args.domains}
    logs = {k: json.loads((v / "training_log.json").read_text()) for k, v in distilled.items()}
    return {"model": args.model, "num_layers": n, "uniform": uniform, "searched": searched,
            "calibration": {"data": "code.jsonl", "num_samples": args.calibration_samples, "search": "race",
                            "loss": layer_map["loss"]},
            "distilled": {name: {"pattern": p, "data": Path(d).name} for name, p, d in runs},
            "training": {k: v["training"] for k, v in logs.items()}, "heldout": rows, "pairs": pairs,
            "seq_losses": seq}


LABELS = {"all_full": "all-Full", "uniform_before": "uniform, before distill", "searched": "searched (training-free)",
          "uniform_after": "uniform, after distill on code", "uniform_mixed_after": "uniform, after distill on code+docs",
          "searched_after": "searched, after distill on code"}


def _pm(d: dict) -> str:
    return f"{d['mean']:+.4f} ± {d['se']:.4f}" if d["se"] is not None else f"{d['mean']:+.4f}"


def markdown(result: dict) -> str:
    s, c, dist = result["settings"], result["convert"], result["distill"]
    lines = [f"## dsa-convert on `{c['source']}` (index_topk {c['index_topk']}, {plural(c['index_n_heads'], 'head')} of "
             f"{c['index_head_dim']}; held-out: {plural(s['heldout_samples'], 'sequence')} of {s['seq_len']} tokens per domain)", ""]
    t = c["training"]
    lines.append(f"Warm-up: {plural(t['steps_done'], 'step')} of {t['settings']['batch_size']} x {t['settings']['seq_len']} tokens on "
                 f"`code.jsonl`, mean KL {t['first_loss']:.3f} -> {t['last_loss_mean10']:.3f}, {t['wall_s'] / 60:.1f} min "
                 f"({s['device']}). Every layer checked against glm4_moe_lite on the same weights: largest relative "
                 f"difference {c['check_against_source_max_rel_diff']:.1e}.")
    lines += ["", "| layer | indexer | oracle | random | captured |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['indexer']:.3f} | {v['oracle']:.3f} | {v['random']:.3f} | {v['captured']:.3f} |"
              for k, v in c["topk_mass"].items()]
    lines += ["", f"Worst layer: {c['min_captured']:.3f} of the way from a random top-k to the oracle top-k.", "",
              "| held-out | dense | all-Full sparse | sparse - dense (paired SE) |", "|---|---|---|---|"]
    lines += [f"| {d} | {v['dense']:.4f} | {v['all_full_sparse']:.4f} | {_pm(v['sparse_minus_dense'])} |"
              for d, v in c["loss"].items()]
    lines += ["", f"## distill on `{dist['model']}`: uniform 1/{s['every']} before and after, and the searched pattern", "",
              f"- uniform: `{dist['uniform']}`", f"- searched (training-free, `calibrate` on code.jsonl): `{dist['searched']}`", ""]
    for name, t in dist["training"].items():
        run = dist["distilled"][name]
        lines.append(f"- distill {name}: `{run['pattern']}` on `{run['data']}`, {plural(t['steps_done'], 'step')} of "
                     f"{t['settings']['batch_size']} x {t['settings']['seq_len']} tokens, mean L_multi "
                     f"{t['first_loss']:.3f} -> {t['last_loss_mean10']:.3f}, {t['wall_s'] / 60:.1f} min.")
    domains = list(dist["heldout"])
    lines += ["", "| held-out loss (nats/token) | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for key in [k for k in LABELS if k in dist["heldout"][domains[0]]["mean"]]:
        lines.append(f"| {LABELS[key]} | " + " | ".join(f"{dist['heldout'][d]['mean'][key]:.4f}" for d in domains) + " |")
    lines += ["", "| difference (paired SE) | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for a, b in dist["pairs"]:
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | "
                     + " | ".join(_pm(dist["heldout"][d]["diff"][f"{a}_minus_{b}"]) for d in domains) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="tiny-mla", help="glm4_moe_lite checkpoint to convert")
    p.add_argument("--model", default="tiny-dsa", help="DSA checkpoint to distill")
    p.add_argument("--data-dir", default="calibration_data")
    p.add_argument("--out", default="outputs/training_evidence")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--index-topk", type=int, default=64)
    p.add_argument("--index-heads", type=int, default=4)
    p.add_argument("--index-head-dim", type=int, default=32)
    p.add_argument("--convert-steps", type=int, default=300)
    p.add_argument("--convert-lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=3e-4)
    p.add_argument("--distill-searched", action=argparse.BooleanOptionalAction, default=True,
                   help="also distill the searched pattern (on code)")
    p.add_argument("--distill-mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also distill uniform on both training splits")
    p.add_argument("--every", type=int, default=4, help="uniform interleaving: one Full layer every N (4: 1/4)")
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--heldout-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.domains = ["code", "docs"]
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    t0 = time.time()
    try:
        result = {
            "settings": {k: v for k, v in vars(args).items()} | {"device": f"cpu, {plural(torch.get_num_threads(), 'thread')}"},
            "convert": run_convert(args, data_dir, out),
            "distill": run_distill(args, data_dir, out),
            "versions": versions(),
        }
    except CalibError as e:
        _log(f"Error: {e.message}" + (f"\nHint: {e.hint}" if e.hint else ""))
        return e.exit_code
    result["seconds"] = round(time.time() - t0, 1)
    (out / RESULT_JSON).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    text = markdown(result)
    (out / RESULT_MD).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

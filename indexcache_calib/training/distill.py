"""`indexcache distill`: training-aware IndexCache (the paper's §3.2). For a pattern, each Full layer's
indexer is trained with the multi-layer distillation loss against the attention of every layer it serves,
everything else frozen; the checkpoint written carries the pattern in its config (`indexer_types`) and no
indexer weights in its Shared layers, so transformers runs the pattern natively. No typer here.

Only families whose transformers class builds Shared layers itself are accepted (`families.Family.distillable`):
a checkpoint for any other would still run every layer's indexer in transformers, and its Shared layers'
weights would be gone.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from indexcache_calib import artifact as art
from indexcache_calib.training import convert as cv
from indexcache_calib import model as mdl
from indexcache_calib.training import trainloop as tl
from indexcache_calib.calibrate import versions
from indexcache_calib.errors import CalibError, plural
from indexcache_calib.families import BY_MODEL_TYPE, FAMILIES, Family
from indexcache_calib.model import DTYPES, parse_device_map
from indexcache_calib.pattern import FULL, SHARED, full_layers, indexer_types, uniform_pattern, validate_pattern
from indexcache_calib.training.warmup import full_groups, indexer_param_names, paired, sequence_losses, use_eager

# transformers is imported inside the functions that use it: it imports huggingface_hub, which reads
# HF_HUB_OFFLINE once, when imported, and the commands set it (cli_common._quiet_libraries) after importing
# this module.


def family_to_train(raw: dict, spec: str) -> Family:
    """The registry's family for a raw config.json, if distill can train it (`Family.distillable`), or a
    refusal that says why not."""
    model_type = raw.get("model_type", "?")
    family = BY_MODEL_TYPE.get(model_type)
    if family is not None and family.distillable:
        if _architecture(raw) is None:
            raise CalibError(f"{spec}: config.json names no architecture to load")
        return family
    if family is not None and family.distill_refusal:
        raise CalibError(f"distill does not support {model_type}: {family.distill_refusal}")
    sub = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    if family is None and "index_topk" not in sub and "indexer_types" not in sub:
        hint = "convert it first: indexcache dsa-convert --model ... --out DIR" if model_type == "glm4_moe_lite" else None
        raise CalibError(f"{spec} is not a DSA model: model_type {model_type} has no lightning indexer", hint=hint)
    arch = _architecture(raw) or model_type
    supported = [f.name for f in FAMILIES if f.distillable]
    raise CalibError(
        f"distill needs native indexer sharing in transformers, and {arch} ({model_type}) has none: its checkpoint "
        "would still run every layer's indexer",
        hint=f"supported: {', '.join(supported)}; calibrate still works on {model_type}",
    )


def _architecture(raw: dict) -> str | None:
    """The transformers class a config.json names."""
    return (raw.get("architectures") or [None])[0]


@dataclass
class DistillOptions:
    model: str
    data: str
    out: str
    layer_map: str | None = None
    pattern: str | None = None
    uniform: int | None = None
    steps: int = 500
    seq_len: int | None = None  # default: twice index_topk
    batch_size: int = 1
    lr: float = 3e-4
    seed: int = 0
    text_field: str = "text"
    device_map: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 50
    eval_data: str | None = None
    eval_samples: int = 16
    resume: bool = False
    overwrite: bool = False


def read_pattern(opts: DistillOptions, num_layers: int, fixed_shared: frozenset[int]) -> tuple[str, str]:
    """(pattern, where it came from) from exactly one of --layer-map, --pattern, --uniform."""
    given = [name for name, v in (("--layer-map", opts.layer_map), ("--pattern", opts.pattern), ("--uniform", opts.uniform))
             if v is not None]
    if len(given) != 1:
        raise CalibError("give exactly one of --layer-map, --pattern and --uniform",
                         hint="e.g. --uniform 4 (one Full layer in four), --pattern FSSSFSSS..., or --layer-map outputs/RUN")
    if opts.layer_map is not None:
        path = Path(opts.layer_map).expanduser()
        if path.is_dir():
            path = path / art.LAYER_MAP
        if not path.is_file():
            raise CalibError(f"layer map {path} does not exist", hint="pass the layer_map.json, or the run directory, that calibrate wrote")
        lm = art.read_layer_map(path)
        pattern, origin = lm["pattern"], f"layer map {path}"
    elif opts.pattern is not None:
        pattern, origin = opts.pattern.strip().upper(), "--pattern"
    else:
        if opts.uniform < 1:
            raise CalibError("--uniform must be at least 1 (one Full layer every N layers)")
        count = num_layers - len(fixed_shared or ())
        if opts.uniform > count:  # refused, not warned: one Full layer is rarely what a large N meant
            raise CalibError(f"--uniform {opts.uniform} is more than the model's {plural(count, 'layer')} with indexer weights",
                             hint=f"--uniform N keeps one Full layer in N; --uniform {count} already keeps only the first")
        if fixed_shared:  # interleave over the layers that ship an indexer
            own = [i for i in range(num_layers) if i not in fixed_shared]
            full = set(own[:: opts.uniform])
            pattern = "".join(FULL if i in full else SHARED for i in range(num_layers))
            origin = f"--uniform {opts.uniform} over the {plural(len(own), 'layer')} with indexer weights"
        else:
            pattern, origin = uniform_pattern(num_layers, opts.uniform), f"--uniform {opts.uniform}"
    if not isinstance(pattern, str):
        raise CalibError(f"the pattern from {origin} is not a string")
    validate_pattern(pattern, num_layers, fixed_shared)
    return pattern, origin


def _load_config(directory: Path):
    """(config, the config its DSA settings are in: the text config of a composite model)."""
    from transformers import AutoConfig  # deferred: see HF_HUB_OFFLINE at the top

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot read the config of {directory}: {str(e).splitlines()[0]}")
    return config, config.get_text_config()


def distill(opts: DistillOptions, hooks: tl.Hooks = tl.Hooks(), warn=lambda t: None) -> dict:
    t_start = time.time()
    source, src_dir, raw = _read(opts.model)
    fam = family_to_train(raw, opts.model)
    model_type = fam.name
    config, sub = _load_config(src_dir)
    n = int(sub.num_hidden_layers)
    types = list(getattr(sub, "indexer_types", None) or ["full"] * n)
    fixed = frozenset(i for i, t in enumerate(types[:n]) if t == "shared")
    pattern, origin = read_pattern(opts, n, fixed)
    topk = int(sub.index_topk)
    seq_len = opts.seq_len if opts.seq_len is not None else 2 * topk
    tl.check_numbers(opts, seq_len, topk, sub)
    out, windows, eval_ids, settings, fingerprint = tl.prepare_training("distill", opts, source, src_dir, seq_len, warn,
                                                                        pattern=pattern)
    with tl.output_dir(out, opts.resume, opts.overwrite) as state_dir:
        return _run(opts, hooks, src_dir, raw, fam, model_type, config, sub, pattern, origin, windows, eval_ids, settings,
                    fingerprint, state_dir, out, t_start, versions())


def _read(spec: str):
    source, directory, raw = mdl.read_config_json(spec)
    if raw.get("auto_map"):
        raise CalibError(f"{spec} ships its own model code (auto_map); distill runs transformers' own classes only")
    return source, directory, raw


def load_with_pattern(directory: Path, config, sub, fam: Family, pattern: str, dtype: str, device_map: str):
    """The model class built with the pattern (Shared layers get no indexer), on the checkpoint's weights."""
    import transformers  # deferred: see HF_HUB_OFFLINE at the top

    if dtype not in DTYPES:
        raise CalibError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    setattr(sub, fam.native_key, ["full" if c == FULL else "shared" for c in pattern])
    cls = getattr(transformers, config.architectures[0])
    try:
        model, info = cls.from_pretrained(
            str(directory), config=config, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            device_map=parse_device_map(device_map), local_files_only=True, use_safetensors=True, output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot load the weights of {directory}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing or info.get("mismatched_keys"):
        bad = missing or [str(m) for m in info["mismatched_keys"]]
        raise CalibError(f"the checkpoint does not fill the model: {plural(len(bad), 'weight')} missing or mismatched (e.g. {bad[0]})")
    model.eval()
    model.requires_grad_(False)
    return model


def _run(opts, hooks, src_dir, raw, fam, model_type, config, sub, pattern, origin, windows, eval_ids, settings,
         fingerprint, state_dir, out, t_start, versions):
    hooks.message(f"loading {src_dir} as {_architecture(raw)} with pattern {pattern}")
    model = load_with_pattern(src_dir, config, sub, fam, pattern, opts.dtype, opts.device_map)
    use_eager(model)
    before = sequence_losses(model, eval_ids) if eval_ids is not None else None
    groups = full_groups(pattern)
    trained = tl.train(model, groups, windows, settings, state_dir, fingerprint, opts.resume, hooks)
    after = sequence_losses(model, eval_ids) if eval_ids is not None else None
    hooks.message(f"writing {out}")
    params = indexer_param_names(model, groups.keys())
    weight_map, _ = tl.source_weight_files(src_dir)
    tensors = tl.checkpoint_tensors(model, params)
    unknown = sorted(set(tensors) - set(weight_map))
    if unknown:
        raise CalibError(f"cannot place the trained indexer weights in the checkpoint: it has no tensor {unknown[0]}")
    n = len(pattern)
    shared = {i for i, c in enumerate(pattern) if c == SHARED}
    rx = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+\.indexer\.")
    drop = {k for k in weight_map if (m := rx.search(k)) and int(m.group(1)) in shared}
    written = tl.write_weights(src_dir, out, tensors, drop)
    copied = tl.copy_side_files(src_dir, out)
    evaluation = None
    if eval_ids is not None:
        diff, se = paired(after, before)
        evaluation = {"sequences": len(eval_ids), "seq_len": eval_ids.shape[1], "before": sum(before) / len(before),
                      "after": sum(after) / len(after), "after_minus_before": diff, "se": se,
                      "before_seq": before, "after_seq": after}
    log = {
        "command": "distill", "source": {"spec": opts.model, "location": str(src_dir), "model_type": model_type},
        "pattern": pattern, "pattern_from": origin, "full_layers": full_layers(pattern), "num_layers": n,
        "served": {str(k): v for k, v in groups.items()},
        "weights": {**written, "side_files": copied},
        "data": {"path": opts.data, "sha256": fingerprint["data_sha256"], "windows": len(windows), "seq_len": settings.seq_len,
                 "tokens_sha256": fingerprint["tokens_sha256"]},
        "training": _training_block(settings, trained),
        "evaluation": evaluation,
        "versions": versions,
        "seconds": round(time.time() - t_start, 1),
    }
    tl.finish(out, log, model_card(log, opts), pattern_config(raw, fam, pattern))
    return {**log, "out": str(out)}


def _training_block(settings, trained):
    return cv._training_block(settings, trained)


def pattern_config(raw: dict, fam: Family, pattern: str) -> dict:
    """The source's config.json with the pattern set where the family reads it (its `native_key`,
    `indexer_types`, which transformers and SGLang read first; in the text config of a composite model), plus
    `index_topk_pattern` and `use_index_cache` for the engines."""
    config = json.loads(json.dumps(raw))
    target = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    target.update({"index_topk_pattern": pattern, fam.native_key: indexer_types(pattern)})
    target["use_index_cache"] = True
    return config


def model_card(log: dict, opts: DistillOptions) -> str:
    t, s, ev = log["training"], log["training"]["settings"], log["evaluation"]
    served = ", ".join(f"{k} -> {v[0]}..{v[-1]}" if len(v) > 1 else f"{k} -> {k}"
                       for k, v in sorted(log["served"].items(), key=lambda kv: int(kv[0])))
    lines = [
        f"# {log['source']['spec']} with IndexCache pattern {log['pattern']}",
        "",
        f"Made by `indexcache distill` ({log['pattern_from']}).",
        "",
        f"- {len(log['full_layers'])} of {log['num_layers']} layers keep their lightning indexer (Full): {log['full_layers']}.",
        "  The others (Shared) reuse the top-k of the nearest preceding Full layer.",
        "- The pattern is in config.json (`indexer_types`, `index_topk_pattern`, `use_index_cache`): transformers",
        "  builds the Shared layers without an indexer and runs the pattern natively. Their indexer weights are not",
        "  in this checkpoint, so these layers cannot be made Full again from it.",
        "- Every other weight is the source's, byte for byte; only the Full layers' indexers were trained.",
        "",
        "## Training",
        "",
        "Each Full layer l's indexer was trained with the multi-layer distillation loss of IndexCache (arXiv",
        "2603.12201, §3.2), L = sum_j 1/(m+1) KL(p^(l+j) || q^(l)) over the layers l..l+m it serves, where p is a",
        "layer's dense attention distribution (summed over heads, normalised over keys) and q the softmax of the",
        "indexer's scores, as the library's own indexer computes them. Every other weight was frozen.",
        "",
        f"- Served layers: {served}.",
        f"- {plural(t['steps_done'], 'step')} of {s['batch_size']} x {s['seq_len']} tokens ({t['tokens']:,} tokens), peak lr {s['lr']}, seed {s['seed']}.",
        f"- {t['optimizer']}.",
        f"- Skipped (non-finite) steps: {t['steps_skipped']}.",
        f"- Mean L over Full layers: {t['first_loss']:.4f} at the first step, {t['last_loss_mean10']:.4f} over the last 10.",
    ]
    if ev:
        se = f" ± {ev['se']:.4f} (paired SE)" if ev["se"] is not None else ""
        lines += ["", f"## Held-out loss with the pattern ({plural(ev['sequences'], 'sequence')} of {ev['seq_len']} tokens, `{opts.eval_data}`)", "",
                  f"Before: {ev['before']:.4f}; after: {ev['after']:.4f}; difference {ev['after_minus_before']:+.4f}{se} nats/token."]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in log["versions"].items()) + ".", ""]
    return "\n".join(lines)

"""`indexcache dsa-convert`: a GlmMoeDsaForCausalLM (DSA) checkpoint from a glm4_moe_lite (plain MLA, the
published GLM-4.7-Flash) one, the way the paper's 30B DSA model was made from GLM-4.7-Flash: the same weights,
plus one lightning indexer per layer trained by the dense warm-up (every other weight frozen; KL from each
layer's head-aggregated dense attention to the indexer's distribution). No typer here.

The weights are loaded by transformers into `GlmMoeDsaForCausalLM` with a config built from the source's; the
loader must report exactly the indexer weights as missing, and every decoder layer is checked against the
source architecture (`Glm4MoeLiteDecoderLayer` on the same tensors) on the first batch before training starts.
The output files hold every source tensor byte for byte under its own name, plus the indexer tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from indexcache_calib import model as mdl
from indexcache_calib.training import trainloop as tl
from indexcache_calib.calibrate import versions
from indexcache_calib.errors import CalibError
from indexcache_calib.model import DTYPES, parse_device_map
from indexcache_calib.training.warmup import (
    base_model, decoder_layers, dense, indexer_param_names, paired, sequence_losses, topk_mass, use_eager,
)

# transformers is imported inside the functions that use it: it imports huggingface_hub, which reads
# HF_HUB_OFFLINE once, when imported, and the commands set it (cli_common._quiet_libraries) after importing
# this module.

SOURCE_TYPE = "glm4_moe_lite"
# Keys of a glm4_moe_lite config.json that GlmMoeDsaConfig derives itself or that mean nothing to it.
DROPPED_KEYS = {"model_type", "architectures", "auto_map", "rope_interleave", "pretraining_tp", "transformers_version",
                "qk_head_dim", "head_dim", "indexer_types", "index_topk", "index_n_heads", "index_head_dim", "layer_types"}


def published_defaults() -> dict:
    """index_topk / index_n_heads / index_head_dim defaults of transformers' GlmMoeDsaConfig, which are GLM-5's
    published values (2048 / 32 / 128; DeepSeek-V3.2 uses 2048 / 64 / 128)."""
    from transformers import GlmMoeDsaConfig  # deferred: see HF_HUB_OFFLINE at the top

    return {"index_topk": int(getattr(GlmMoeDsaConfig, "index_topk", 2048)),
            "index_n_heads": int(getattr(GlmMoeDsaConfig, "index_n_heads", 32)),
            "index_head_dim": int(getattr(GlmMoeDsaConfig, "index_head_dim", 128))}


@dataclass
class ConvertOptions:
    model: str
    data: str
    out: str
    steps: int = 1000
    seq_len: int | None = None  # default: twice index_topk
    batch_size: int = 1
    lr: float = 1e-3
    seed: int = 0
    index_topk: int | None = None
    index_heads: int | None = None
    index_head_dim: int | None = None
    text_field: str = "text"
    device_map: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 50
    eval_data: str | None = None
    eval_samples: int = 16
    resume: bool = False
    overwrite: bool = False


# ----------------------------------------------------------------------------- config

def read_source_config(spec: str) -> tuple[object, Path, dict]:
    """(ModelSource, directory, raw config.json) of a local glm4_moe_lite checkpoint; refuses anything else."""
    source, directory, raw = mdl.read_config_json(spec)
    model_type = raw.get("model_type", "?")
    if model_type != SOURCE_TYPE:
        already = " It already has lightning indexers: calibrate or distill it directly." if "index_topk" in raw else ""
        raise CalibError(f"dsa-convert converts {SOURCE_TYPE} checkpoints (GLM-4.7-Flash); {spec} is model_type {model_type}.{already}",
                         hint="pass a glm4_moe_lite checkpoint directory or the glm-4.7-flash alias")
    return source, directory, raw


def dsa_config(raw: dict, index_topk: int, index_heads: int, index_head_dim: int):
    """GlmMoeDsaConfig with the source's settings, every layer Full, and the given indexer sizes."""
    from transformers import GlmMoeDsaConfig  # deferred: see HF_HUB_OFFLINE at the top

    if raw.get("q_lora_rank") is None:
        raise CalibError("the source has no q_lora_rank (its queries are not low-rank), but GlmMoeDsa's attention and "
                         "indexer read the low-rank query residual", hint="dsa-convert needs q_lora_rank set, as GLM-4.7-Flash has")
    if raw.get("rope_interleave", True) is not True:
        raise CalibError("the source uses rope_interleave false, but GlmMoeDsa always applies interleaved RoPE")
    rope = raw.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if float(partial or 1.0) != 1.0:
        raise CalibError("the source uses partial_rotary_factor, which GlmMoeDsa's rotary embedding does not read")
    rope_dim = int(raw.get("qk_rope_head_dim", 64))
    for name, value in (("--index-topk", index_topk), ("--index-heads", index_heads), ("--index-head-dim", index_head_dim)):
        if value < 1:
            raise CalibError(f"{name} must be at least 1")
    if index_head_dim < rope_dim or index_head_dim % 2:
        raise CalibError(f"--index-head-dim {index_head_dim} must be even and at least qk_rope_head_dim {rope_dim}: "
                         "the indexer applies RoPE to its first qk_rope_head_dim dims")
    kw = {k: v for k, v in raw.items() if k not in DROPPED_KEYS}
    n = int(raw["num_hidden_layers"])
    kinds = kw.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)  # glm4_moe_lite's default
    kw["mlp_layer_types"] = kinds
    kw.setdefault("first_k_dense_replace", next((i for i, t in enumerate(kinds) if t != "dense"), n))
    kw.update(index_topk=index_topk, index_n_heads=index_heads, index_head_dim=index_head_dim, indexer_types=["full"] * n)
    try:
        config = GlmMoeDsaConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CalibError(f"cannot build a GlmMoeDsa config from the source's: {str(e).splitlines()[0]}")
    config.architectures = ["GlmMoeDsaForCausalLM"]
    return config


# ----------------------------------------------------------------------------- loading and checking

def load_dsa(directory: Path, config, dtype: str, device_map: str, seed: int):
    """GlmMoeDsaForCausalLM on the source weights (the indexers initialised from `seed`); refuses a checkpoint
    whose weights do not fill every non-indexer parameter."""
    from transformers import GlmMoeDsaForCausalLM  # deferred: see HF_HUB_OFFLINE at the top

    if dtype not in DTYPES:
        raise CalibError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    try:
        model, info = GlmMoeDsaForCausalLM.from_pretrained(
            str(directory), config=config, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            device_map=parse_device_map(device_map), local_files_only=True, use_safetensors=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise CalibError(f"cannot load the weights of {directory}: {str(e).splitlines()[0]}") from None
    wrong = sorted(k for k in info.get("missing_keys", []) if ".indexer." not in k)
    if wrong or info.get("mismatched_keys"):
        bad = wrong or [str(m) for m in info["mismatched_keys"]]
        raise CalibError(f"the source weights do not fit GlmMoeDsa: {len(bad)} missing or mismatched (e.g. {bad[0]})")
    model.eval()
    model.requires_grad_(False)
    return model, sorted(info.get("unexpected_keys", []))


@torch.no_grad()
def check_against_source(model, source_dir: Path, ids: torch.Tensor) -> float:
    """Run every decoder layer of the converted model (indexers returning all keys) and the source
    architecture's decoder layer on the same tensors and inputs; also compare the rotary tables. Returns
    the largest difference relative to the output's scale; refuses above 1e-3."""
    # deferred: see HF_HUB_OFFLINE at the top
    from transformers import Glm4MoeLiteConfig
    from transformers.models.glm4_moe_lite import modeling_glm4_moe_lite as lite

    cfg = Glm4MoeLiteConfig.from_pretrained(str(source_dir), local_files_only=True)
    cfg._attn_implementation = model.config._attn_implementation
    cfg._experts_implementation = getattr(model.config, "_experts_implementation", None)
    layers = decoder_layers(model)
    seen: dict = {}

    def pre(i):
        def fn(module, args, kwargs):
            seen[i] = [args, kwargs, None]
        return fn

    def post(i):
        def fn(module, args, kwargs, output):
            seen[i][2] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(pre(i), with_kwargs=True), layer.register_forward_hook(post(i), with_kwargs=True))]
    device = model.get_input_embeddings().weight.device
    try:
        with dense(model):
            base_model(model)(input_ids=ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for i, layer in enumerate(layers):
        args, kwargs, out = seen[i]
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "prev_topk_indices")}
        rotary = lite.Glm4MoeLiteRotaryEmbedding(cfg).to(hidden.device)
        cos, sin = rotary(hidden, kw["position_ids"])
        for mine, theirs in zip(kw["position_embeddings"], (cos, sin)):
            worst = max(worst, _rel(mine, theirs))
        kw["position_embeddings"] = (cos.to(hidden.dtype), sin.to(hidden.dtype))
        with torch.device("meta"):
            ref = lite.Glm4MoeLiteDecoderLayer(cfg, i)
        state = {k: v for k, v in layer.state_dict().items() if not k.startswith("self_attn.indexer.")}
        try:
            ref.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CalibError(f"layer {i} of the converted model does not match glm4_moe_lite's: {str(e).splitlines()[0]}")
        ref.eval()
        got = ref(hidden, **kw)
        worst = max(worst, _rel(out, got[0] if isinstance(got, tuple) else got))
        del ref
    if worst > 1e-3:
        raise CalibError(f"the converted model (all keys attended) differs from the source by {worst:.2e} (relative), "
                         "so it is not the same network", hint="report it with your transformers version")
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float().to(a.device)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


# ----------------------------------------------------------------------------- the command

def sized_warning(topk: int, seq_len: int, config, topk_default: bool, seq_len_default: bool, warn) -> None:
    """GLM-5's index_topk (2048, and seq-len 4096 after it) on a small model: every step is long, and the
    indexer chooses among nearly every key. Said before anything loads, with numbers that fit the model."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if not max_pos or 2 * topk < max_pos:
        return
    given = lambda default: " (GLM-5's default)" if default else ""  # noqa: E731
    warn(f"index_topk {topk}{given(topk_default)} is at least half the model's max_position_embeddings {max_pos}, "
         f"so training runs at --seq-len {seq_len}{given(seq_len_default)}: long steps, for an indexer that keeps "
         f"most keys; for this model try --index-topk {max(1, max_pos // 8)} --seq-len {max(2, max_pos // 4)}")


def convert(opts: ConvertOptions, hooks: tl.Hooks = tl.Hooks(), warn=lambda t: None) -> dict:
    t_start = time.time()
    source, src_dir, raw = read_source_config(opts.model)
    defaults = published_defaults()
    topk = opts.index_topk if opts.index_topk is not None else defaults["index_topk"]
    heads = opts.index_heads if opts.index_heads is not None else defaults["index_n_heads"]
    head_dim = opts.index_head_dim if opts.index_head_dim is not None else defaults["index_head_dim"]
    seq_len = opts.seq_len if opts.seq_len is not None else 2 * topk
    config = dsa_config(raw, topk, heads, head_dim)
    tl.check_numbers(opts, seq_len, topk, config)
    sized_warning(topk, seq_len, config, opts.index_topk is None, opts.seq_len is None, warn)
    out, windows, eval_ids, settings, fingerprint = tl.prepare_training(
        "dsa-convert", opts, source, src_dir, seq_len, warn,
        indexer={"index_topk": topk, "index_n_heads": heads, "index_head_dim": head_dim})
    with tl.output_dir(out, opts.resume, opts.overwrite) as state_dir:
        return _run(opts, hooks, source, src_dir, config, windows, eval_ids, settings, fingerprint, state_dir, out, t_start, versions())


def _run(opts, hooks, source, src_dir, config, windows, eval_ids, settings, fingerprint, state_dir, out, t_start, versions):
    raw = json.loads((src_dir / "config.json").read_text())
    hooks.message(f"loading {src_dir} as GlmMoeDsaForCausalLM")
    model, unexpected = load_dsa(src_dir, config, opts.dtype, opts.device_map, opts.seed)
    use_eager(model)
    if unexpected:
        hooks.message(f"carried over unchanged, not used by GlmMoeDsaForCausalLM: {len(unexpected)} tensors "
                      f"(e.g. {unexpected[0]})")
    diff = check_against_source(model, src_dir, windows[:1])
    hooks.message(f"checked every layer against glm4_moe_lite on the same weights: largest relative difference {diff:.1e}")
    n = config.num_hidden_layers
    groups = {i: [i] for i in range(n)}
    trained = tl.train(model, groups, windows, settings, state_dir, fingerprint, opts.resume, hooks)
    evaluation = evaluate(model, eval_ids, hooks) if eval_ids is not None else None
    hooks.message(f"writing {out}")
    params = indexer_param_names(model, range(n))
    tensors = tl.checkpoint_tensors(model, params)
    stored = tl.source_dtype(src_dir)  # new tensors are stored like the source's, whatever --dtype trained in
    if stored is not None:
        tensors = {k: v.to(stored) if v.is_floating_point() else v for k, v in tensors.items()}
    clash = sorted(set(tensors) & set(tl.source_weight_files(src_dir)[0]))
    if clash:
        raise CalibError(f"the source already holds indexer weights ({clash[0]}); it is not a plain MLA checkpoint")
    written = tl.write_weights(src_dir, out, tensors, set())
    copied = tl.copy_side_files(src_dir, out)
    log = {
        "command": "dsa-convert", "source": {"spec": opts.model, "location": str(src_dir), "model_type": SOURCE_TYPE},
        "model": {"class": "GlmMoeDsaForCausalLM", "num_layers": n, "index_topk": config.index_topk,
                  "index_n_heads": config.index_n_heads, "index_head_dim": config.index_head_dim,
                  "indexer_parameters": sum(p.numel() for p in params.values()),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "weights": {**written, "carried_unused": unexpected, "side_files": copied},
        "check_against_source_max_rel_diff": diff,
        "data": {"path": opts.data, "sha256": fingerprint["data_sha256"], "windows": len(windows), "seq_len": settings.seq_len,
                 "tokens_sha256": fingerprint["tokens_sha256"]},
        "training": _training_block(settings, trained),
        "evaluation": evaluation,
        "versions": versions,
        "seconds": round(time.time() - t_start, 1),
    }
    saved = json.loads(model.config.to_json_string())  # what save_pretrained writes
    for key in ("dtype", "torch_dtype"):  # the weights are stored as the source's are, not as --dtype loaded them
        if key in raw:
            saved[key] = raw[key]
    tl.finish(out, log, model_card(log, opts), saved)
    return {**log, "out": str(out)}


def _training_block(settings, trained: tl.Trained) -> dict:
    last = trained.log[-10:]
    return {"settings": tl.settings_dict(settings), "steps_done": trained.steps_done, "steps_skipped": trained.skipped,
            "resumed_from": trained.resumed_from, "wall_s": trained.wall_s, "tokens": trained.tokens,
            "first_loss": trained.log[0]["loss"] if trained.log else None,
            "last_loss_mean10": sum(r["loss"] for r in last) / len(last) if last else None,
            "last_step_per_layer": {str(k): v for k, v in sorted(trained.per_layer_last.items())},
            "optimizer": "AdamW (betas 0.9/0.95, weight decay 0.1 on matrices) on fp32 master copies, clip 1.0, "
                         "linear warm-up then cosine decay to 10%"}


def evaluate(model, ids: torch.Tensor, hooks) -> dict:
    """Held-out: per-layer attention mass in the indexer's top-k (against the oracle and a random top-k), and
    the loss of the all-Full sparse model against dense attention, paired over sequences."""
    hooks.message(f"evaluating on {len(ids)} held-out sequences")
    mass = topk_mass(model, ids)
    dense_l = sequence_losses(model, ids, dense_attention=True)
    sparse_l = sequence_losses(model, ids)
    gap, se = paired(sparse_l, dense_l)
    return {"sequences": len(ids), "seq_len": ids.shape[1],
            "topk_mass": {str(k): v for k, v in mass.items()},
            "min_captured": min(v["captured"] for v in mass.values()),
            "loss": {"dense": sum(dense_l) / len(dense_l), "all_full_sparse": sum(sparse_l) / len(sparse_l),
                     "sparse_minus_dense": gap, "se": se, "dense_seq": dense_l, "sparse_seq": sparse_l}}


def model_card(log: dict, opts: ConvertOptions) -> str:
    m, t, s = log["model"], log["training"], log["training"]["settings"]
    ev = log["evaluation"]
    lines = [
        f"# DSA conversion of {log['source']['spec']}",
        "",
        "`GlmMoeDsaForCausalLM` made by `indexcache dsa-convert` from a `glm4_moe_lite` (plain MLA) checkpoint.",
        "",
        "- Every weight of the source is here unchanged, byte for byte and under its own name.",
        f"- New: one lightning indexer per layer ({m['num_layers']} layers, {m['indexer_parameters']:,} indexer parameters),",
        f"  `index_topk` {m['index_topk']}, `index_n_heads` {m['index_n_heads']}, `index_head_dim` {m['index_head_dim']}.",
        "- Every layer is `full`, so any IndexCache pattern can be calibrated on it",
        "  (`indexcache calibrate --model THIS_DIR ...`).",
        "",
        "## How the indexers were trained",
        "",
        "Dense indexer warm-up, as DSA models are made: every weight but the indexers frozen; attention dense (each",
        "indexer answers \"all keys\"); per layer, the KL from the layer's attention distribution (summed over heads,",
        "normalised over keys) to the softmax of the indexer's scores, as the library's own indexer computes them.",
        "",
        f"- {t['steps_done']} steps of {s['batch_size']} x {s['seq_len']} tokens ({t['tokens']:,} tokens), peak lr {s['lr']}, seed {s['seed']}.",
        f"- {t['optimizer']}.",
        f"- Skipped (non-finite) steps: {t['steps_skipped']}.",
        f"- Mean KL over layers: {t['first_loss']:.4f} at the first step, {t['last_loss_mean10']:.4f} over the last 10.",
        "",
        "This is the warm-up only. DSA models are then trained with sparse attention (main weights and indexers",
        "together), which this checkpoint has not had: expect its all-Full sparse loss to sit above dense.",
    ]
    if log["weights"]["carried_unused"]:
        lines += ["", f"{len(log['weights']['carried_unused'])} source tensors that GlmMoeDsaForCausalLM does not use (for",
                  "example multi-token-prediction layers) are carried over unchanged and have no indexer."]
    if ev:
        loss = ev["loss"]
        lines += ["", f"## Held-out evaluation ({ev['sequences']} sequences of {ev['seq_len']} tokens, `{opts.eval_data}`)", "",
                  f"Loss (nats/token): dense {loss['dense']:.4f}, all-Full sparse {loss['all_full_sparse']:.4f}, "
                  f"difference {loss['sparse_minus_dense']:+.4f}" + (f" ± {loss['se']:.4f} (paired SE)." if loss["se"] is not None else "."),
                  "", "Share of dense attention mass inside a top-k, per layer, over queries that see more than k keys;",
                  "\"captured\" is (indexer - random) / (oracle - random).", "",
                  "| layer | indexer | oracle | random | captured |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['indexer']:.3f} | {v['oracle']:.3f} | {v['random']:.3f} | {v['captured']:.3f} |"
                  for k, v in ev["topk_mass"].items()]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in log["versions"].items()) + ".", ""]
    return "\n".join(lines)

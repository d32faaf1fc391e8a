"""Train a tiny DSA checkpoint (transformers' GlmMoeDsaForCausalLM, unchanged) on calibration_data/.

The recipe follows how DSA models are made:

1. dense: language-model training with every indexer bypassed (each returns all keys);
2. indexer warm-up: main weights frozen; each layer's indexer learns the KL divergence from
   the layer's head-aggregated dense attention to softmax(index scores). This is
   `indexcache_calib.training.warmup`, the same code `indexcache dsa-convert` runs;
3. sparse: top-k attention on; LM loss on the main weights plus, for the indexers, the KL
   restricted to the keys they selected (index scores from the library's own indexer).

A byte-level BPE tokenizer is trained on the training split of both domains and saved with
the model. Held-out losses, dense and all-F sparse, are reported per domain.

    python -m indexcache_calib.recipes.train_tiny --out indexcache_calib/models/tiny-dsa
    python -m indexcache_calib.recipes.train_tiny --layers 48 --hidden 64 --out indexcache_calib/models/tiny-dsa-deep
    python -m indexcache_calib.recipes.train_tiny --smoke --out /tmp/tiny   # seconds, for tests
    python -m indexcache_calib.recipes.train_tiny --arch glm4_moe_lite --layers 8 --out indexcache_calib/models/tiny-mla

`--init-from DIR` continues training a saved GlmMoeDsa checkpoint (its tokenizer and weights; any
architecture flag is ignored) at a new `--seq-len`, raising `max_position_embeddings` when needed, and with
`--rope-factor F` switching RoPE to linear position interpolation (positions scaled by 1/F into the range the
checkpoint was trained on); `--data-suffix=-long` trains on `<domain>-long.jsonl` (and evaluates on
`<domain>-long.heldout.jsonl`); `--stages` picks the stages to run. tiny-dsa-long is tiny-dsa (trained at
512 tokens) continued at 4096 tokens on the long split, all three stages, on the shared 2-core CPU:

    python -m indexcache_calib.recipes.train_tiny --init-from indexcache_calib/models/tiny-dsa --seq-len 4096 \
        --rope-factor 8 --data-suffix=-long --batch-size 1 --threads 1 --dense-attn sdpa --sparse-path gather \
        --no-stage-evals --no-recall --eval-seqs 2 --eval-every 0 --lr 3e-4 --sparse-lr 2e-4 \
        --dense-steps 12 --dense-minutes 10 --indexer-steps 4 --indexer-minutes 6 --sparse-steps 8 --sparse-minutes 11 \
        --out indexcache_calib/models/tiny-dsa-long

A batch of one sequence alternates domains from step to step. `--sparse-path gather` runs the sparse
stage's LM forward on `indexcache_calib.attention`'s top-k attention (memory linear in length); the
indexer KL's targets then come from a gradient-free eager forward with the same top-k: the same loss and
gradients as the default single eager pass.

`--arch glm4_moe_lite` trains the plain MLA architecture of GLM-4.7-Flash instead (stage 1 only): the
source that `indexcache dsa-convert` turns into a DSA model.

tiny-dsa and tiny-dsa-deep in indexcache_calib/models/ come from one call of
`bash indexcache_calib/recipes/train_all.sh --device cuda --minutes 6` (about 5 minutes on one H200);
tiny-dsa-long from the command above.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM, PreTrainedTokenizerFast

from indexcache_calib.training import warmup
from indexcache_calib.errors import plural
from indexcache_calib.training.warmup import Call, decay_groups, lr_at

REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("code", "docs")
EOS, PAD = "<|endoftext|>", "<|pad|>"

# Full-recipe defaults, then the --smoke overrides (a few steps of each stage, seconds on CPU).
# The epoch caps bind on a GPU (the data is small: about 0.65M training tokens), the minutes on a CPU.
# Measured for the default model (batch 8 x 512): on the 2-core CPU, shared with other jobs and with
# --threads 1, dense ~270 tokens/s, indexer warm-up ~400, sparse ~310 (2 threads on a lightly loaded
# CPU: dense ~800); so 26 + 6 + 12 minutes of stages plus ~8 minutes of held-out evaluation keep the
# CPU recipe under an hour, but reach only ~0.6 epochs of dense training. On one H200 (batch 32):
# dense ~196K tokens/s, indexer ~205K, sparse ~127K; the deep model (48 x 64) ~77K, ~77K, ~47K.
FULL = dict(layers=16, hidden=128, heads=4, index_topk=64, index_heads=4, seq_len=512, vocab_size=3072,
            dense_steps=100_000, indexer_steps=100_000, sparse_steps=100_000,
            dense_minutes=26.0, indexer_minutes=6.0, sparse_minutes=12.0,
            dense_epochs=16.0, indexer_epochs=3.0, sparse_epochs=6.0, eval_seqs=48, eval_every=50,
            tokenizer_docs=0)
SMOKE = dict(layers=2, hidden=64, heads=4, index_topk=16, index_heads=2, seq_len=64, vocab_size=512,
             batch_size=2, dense_steps=3, indexer_steps=2, sparse_steps=2,
             dense_minutes=0.0, indexer_minutes=0.0, sparse_minutes=0.0,
             dense_epochs=0.0, indexer_epochs=0.0, sparse_epochs=0.0, eval_seqs=2, eval_every=0,
             tokenizer_docs=40)
# Share of --budget-minutes per stage; the rest covers tokenizer, evaluations and saving.
BUDGET_SHARE = {"dense": 0.55, "indexer": 0.12, "sparse": 0.23}
ARCHS = ("glm_moe_dsa", "glm4_moe_lite")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny GlmMoeDsa (DSA) checkpoint: dense, indexer warm-up, sparse.")
    p.add_argument("--out", default=str(REPO_ROOT / "indexcache_calib" / "models" / "tiny-dsa"))
    p.add_argument("--data", default=str(REPO_ROOT / "calibration_data"), help="directory with <domain>[.heldout].jsonl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps per stage (for tests)")
    p.add_argument("--arch", choices=ARCHS, default="glm_moe_dsa",
                   help="glm_moe_dsa: the DSA model, all three stages; glm4_moe_lite: the plain MLA model "
                        "(GLM-4.7-Flash's architecture), dense stage only, the source `indexcache dsa-convert` takes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on cuda (weights stay fp32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is much faster on a CPU shared with other jobs")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--intermediate", type=int, help="MLP width (default 5/4 of --hidden)")
    p.add_argument("--index-topk", type=int)
    p.add_argument("--index-heads", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8 on cpu, 32 on cuda)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of the dense stage")
    p.add_argument("--sparse-lr", type=float, default=3e-4, help="peak LR of the main weights in the sparse stage")
    p.add_argument("--indexer-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the indexer KL in the sparse stage")
    for stage in ("dense", "indexer", "sparse"):
        p.add_argument(f"--{stage}-steps", type=int, help=f"most optimizer steps of the {stage} stage")
        p.add_argument(f"--{stage}-minutes", type=float, help=f"wall-time budget of the {stage} stage (0: none)")
        p.add_argument(f"--{stage}-epochs", type=float, help=f"most passes over the training split in the {stage} stage (0: none)")
    p.add_argument("--budget-minutes", type=float,
                   help="whole-run wall-time budget; sets every stage's minutes from it (overrides --*-minutes)")
    p.add_argument("--eval-seqs", type=int, help="held-out sequences per domain for the reported losses")
    p.add_argument("--eval-every", type=int, help="steps between quick held-out checks (0: none)")
    p.add_argument("--tokenizer-docs", type=int, help="train the tokenizer on the first N documents per domain (0: all)")
    p.add_argument("--init-from", help="continue training this saved GlmMoeDsa checkpoint (weights and tokenizer); "
                                       "the architecture flags are ignored")
    p.add_argument("--rope-factor", type=float,
                   help="with --init-from: linear RoPE position interpolation by this factor (e.g. new/old length)")
    p.add_argument("--data-suffix", default="", help="read <domain><suffix>.jsonl and <domain><suffix>.heldout.jsonl "
                                                     "(e.g. -long)")
    p.add_argument("--stages", default="dense,indexer,sparse",
                   help="comma-separated stages to run, in recipe order (glm_moe_dsa)")
    p.add_argument("--dense-attn", choices=("eager", "sdpa"), default="eager",
                   help="attention implementation of the dense stage (sdpa: less memory at long lengths)")
    p.add_argument("--sparse-path", choices=("eager", "gather"), default="eager",
                   help="sparse stage: eager top-k mask (default), or indexcache_calib.attention's gather-based "
                        "top-k attention for the LM forward, with the indexer KL targets from a no-grad eager pass")
    p.add_argument("--no-stage-evals", dest="stage_evals", action="store_false",
                   help="skip the held-out evaluations after the dense and indexer stages (long sequences on a CPU)")
    p.add_argument("--eval-initial", action="store_true", help="evaluate the --init-from checkpoint before training")
    p.add_argument("--no-recall", dest="recall", action="store_false",
                   help="skip the per-layer indexer recall in the final evaluation (long sequences on a CPU)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.stages = [st.strip() for st in args.stages.split(",") if st.strip()]
    if not args.stages or any(st not in BUDGET_SHARE for st in args.stages):
        p.error(f"--stages takes a comma-separated subset of {', '.join(BUDGET_SHARE)}")
    if args.init_from and args.arch != "glm_moe_dsa":
        p.error("--init-from continues a glm_moe_dsa checkpoint")
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size is None:
        args.batch_size = 32 if args.device == "cuda" else 8
    if args.budget_minutes:
        for stage, share in BUDGET_SHARE.items():
            setattr(args, f"{stage}_minutes", args.budget_minutes * share)
        if args.arch == "glm4_moe_lite":  # one stage: the whole budget but held-out evaluation and saving
            args.dense_minutes = args.budget_minutes * 0.9
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


# ----------------------------------------------------------------------------- data

def load_texts(data_dir: Path, domain: str, heldout: bool, suffix: str = "") -> list[str]:
    path = data_dir / f"{domain}{suffix}{'.heldout' if heldout else ''}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknown token) with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=max_length)


def token_stream(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All documents, each followed by EOS, as one 1-D tensor (windows may span documents)."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class Windows:
    """Seeded random training windows; rows alternate domains (counting across batches, so a batch of one
    sequence alternates from step to step) and an even batch always holds both."""

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, batch_size: int, seed: int):
        self.streams, self.seq_len, self.batch_size = streams, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = sum(len(s) for s in streams.values())
        self.rows = 0

    def __next__(self) -> torch.Tensor:
        rows = []
        for i in range(self.batch_size):
            s = self.streams[DOMAINS[(self.rows + i) % len(DOMAINS)]]
            start = int(torch.randint(0, len(s) - self.seq_len + 1, (1,), generator=self.gen))
            rows.append(s[start:start + self.seq_len])
        self.rows += self.batch_size
        return torch.stack(rows)


# ----------------------------------------------------------------------------- model

def build_model(args, tok: PreTrainedTokenizerFast):
    d, heads, layers = args.hidden, args.heads, args.layers
    head_dim = d // heads
    rope = min(16, head_dim)
    if args.arch == "glm4_moe_lite":
        config = Glm4MoeLiteConfig(
            vocab_size=len(tok), hidden_size=d, intermediate_size=args.intermediate or 5 * d // 4,
            moe_intermediate_size=args.intermediate or 5 * d // 4, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=d // 2, kv_lora_rank=d // 2,
            qk_nope_head_dim=head_dim, qk_rope_head_dim=rope, v_head_dim=head_dim, mlp_layer_types=["dense"] * layers,
            n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1, n_shared_experts=1,
            max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=True,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
        )
        return _scaled(Glm4MoeLiteForCausalLM(config), layers)
    config = GlmMoeDsaConfig(
        vocab_size=len(tok), hidden_size=d, intermediate_size=args.intermediate or 5 * d // 4,
        moe_intermediate_size=args.intermediate or 5 * d // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=d // 2, kv_lora_rank=d // 2,  # the library needs q_lora_rank set
        qk_nope_head_dim=head_dim, qk_rope_head_dim=rope, v_head_dim=head_dim,
        index_topk=args.index_topk, index_n_heads=args.index_heads, index_head_dim=max(rope, d // 4),
        # Dense MLPs everywhere; the expert settings only have to be valid (n_routed_experts % n_group == 0).
        first_k_dense_replace=layers, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1,
        n_shared_experts=1, max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
    )
    return _scaled(GlmMoeDsaForCausalLM(config), layers)


def load_init(args):
    """The --init-from checkpoint, eager attention, `max_position_embeddings` raised to --seq-len if below;
    the architecture arguments are set from its config; --rope-factor switches RoPE to linear interpolation."""
    config = GlmMoeDsaConfig.from_pretrained(args.init_from)
    if args.rope_factor:  # Position Interpolation (Chen et al., 2023): positions scaled into the trained range
        theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        config.rope_parameters = {"rope_type": "linear", "factor": args.rope_factor, "rope_theta": theta}
    model = GlmMoeDsaForCausalLM.from_pretrained(args.init_from, config=config, dtype=torch.float32)
    c = model.config
    if c.max_position_embeddings < args.seq_len:
        c.max_position_embeddings = args.seq_len
    args.layers, args.hidden, args.heads = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    args.index_topk, args.index_heads, args.vocab_size = c.index_topk, c.index_n_heads, c.vocab_size
    model.set_attn_implementation("eager")
    return model


def _scaled(model, layers: int):
    # Residual-branch outputs start scaled by 1/sqrt(2L) (GPT-2 style): deep, thin stacks diverged without it.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_((2 * layers) ** -0.5)
            layer.mlp.down_proj.weight.mul_((2 * layers) ** -0.5)
    # Eager attention returns the attention probabilities the indexer KL needs.
    model.set_attn_implementation("eager")
    return model


def scored_topk(records: dict):
    """Indexer replacement for the sparse stage: the library's own indexer, run with gradients on detached
    inputs (the top-k passes no gradient to the main weights anyway); records its scores and top-k."""

    def make(i, ix):
        def forward(*args, **kwargs):
            call = Call(tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                        {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            scores, topk = warmup.index_scores(ix, call)
            records[i] = (scores, topk)
            return topk
        return forward

    return make


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], args, modes=("dense", "sparse"), recall=False) -> dict:
    """Mean per-token held-out loss per domain and mode ("dense": every indexer returns all keys); with
    `recall`, per layer, the dense attention mass inside the indexer's own top-k and inside the oracle
    top-k, over queries with more than k keys (`warmup.topk_mass`)."""
    model.eval()
    out: dict = {}
    for domain, w in windows.items():
        for mode in modes:
            total, count = 0.0, 0
            with warmup.dense(model) if mode == "dense" else contextlib.nullcontext():
                for start in range(0, len(w), args.batch_size):
                    x = w[start:start + args.batch_size].to(args.device)
                    with autocast(args):
                        loss = model(input_ids=x, labels=x).loss.float()
                    n = x.shape[0] * (x.shape[1] - 1)
                    total, count = total + loss.item() * n, count + n
            out.setdefault(domain, {})[mode] = total / count
    if recall and model.config.model_type == "glm_moe_dsa":
        with autocast(args):
            mass = warmup.topk_mass(model, torch.cat(list(windows.values())), args.batch_size)
        out["indexer_recall"] = [round(mass[i]["indexer"], 4) for i in sorted(mass)]
        out["oracle_recall"] = [round(mass[i]["oracle"], 4) for i in sorted(mass)]
    model.train()
    return out


def autocast(args):
    if args.device == "cuda" and args.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- training

def x_tokens(args) -> int:
    return args.batch_size * args.seq_len


def run_stage(name: str, args, model, groups: list[dict], step_fn, data: Windows, eval_fn=None) -> dict:
    """Optimizer loop shared by the stages, budgeted by steps and wall time.

    The step count is fixed after a few timed steps (min of --<stage>-steps and what fits in
    --<stage>-minutes), so the LR schedule depends only on that count and a rerun with
    --<stage>-steps set to the recorded `steps_done` and no time budget retraces it.
    Steps whose loss or gradient is not finite are skipped and counted.
    """
    max_steps = getattr(args, f"{name}_steps")
    epochs = getattr(args, f"{name}_epochs")
    if epochs:
        max_steps = min(max_steps, math.ceil(epochs * data.tokens / x_tokens(args)))
    budget_s = 60.0 * getattr(args, f"{name}_minutes")
    for g in groups:
        g["peak_lr"] = g["lr"]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.1)
    planned, done, skipped, streak, tokens = max_steps, 0, 0, 0, 0
    t0 = last_log = time.time()
    timing_from, log_every_s = None, 5.0 if args.smoke else 30.0
    history, last, eval_s = [], {}, 0.0
    step = 0
    while step < planned:
        for g in groups:
            g["lr"] = lr_at(step, planned, g["peak_lr"])
        x = next(data).to(args.device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            losses = step_fn(x)  # dict of floats; the step function has called backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not (math.isfinite(losses["loss"]) and torch.isfinite(gnorm)):
            skipped, streak = skipped + 1, streak + 1
            opt.zero_grad(set_to_none=True)
            if streak >= 20:
                raise RuntimeError(f"{name}: 20 non-finite steps in a row at step {step}; lower the learning rate")
        else:
            opt.step()
            streak, last = 0, losses
        step += 1
        done, tokens = step, tokens + x.numel()
        now = time.time()
        # Plan the step count from steps 2-4 (step 1 pays for allocation and warm-up).
        if step == 1:
            timing_from = now
        elif step == 4 and budget_s > 0:
            per_step = (now - timing_from) / 3
            planned = max(4, min(max_steps, int((budget_s - (timing_from - t0)) / per_step)))
        if budget_s > 0 and now - t0 > 1.25 * budget_s:
            print(f"[{name}] stopping at step {step}: over 1.25x the time budget", flush=True)
            break
        if now - last_log >= log_every_s or step == planned:
            last_log = now
            rate = tokens / (now - t0 - eval_s)
            detail = " ".join(f"{k} {v:.4f}" for k, v in last.items())
            print(f"[{name}] step {step}/{planned} {detail} lr {groups[0]['lr']:.2e} gnorm {float(gnorm):.3f} "
                  f"{rate:,.0f} tok/s {(now - t0) / 60:.1f} min skipped {skipped}", flush=True)
        if eval_fn and args.eval_every and step % args.eval_every == 0 and step < planned:
            history.append({"step": step, **eval_fn()})
            eval_s += time.time() - now
            print(f"[{name}] held-out check at step {step}: {json.dumps(history[-1])}", flush=True)
    wall = time.time() - t0
    # Throughput counts training steps only; the held-out checks' time is reported apart.
    record = {"stage": name, "steps_planned": planned, "steps_done": done, "steps_skipped": skipped,
              "wall_s": round(wall, 1), "check_s": round(eval_s, 1), "tokens": tokens,
              "tokens_per_s": round(tokens / (wall - eval_s), 1),
              "peak_lrs": [g["peak_lr"] for g in groups], "last_losses": {k: round(v, 4) for k, v in last.items()},
              "epochs": round(tokens / data.tokens, 2), "budget_minutes": getattr(args, f"{name}_minutes"),
              "max_steps": max_steps}
    if history:
        record["held_out_checks"] = history
    return record


def set_trainable(model, main: bool, indexer: bool) -> tuple[list, list]:
    idx_params = {id(p) for ix in warmup.indexers(model).values() for p in ix.parameters()}
    main_ps, idx_ps = [], []
    for p in model.parameters():
        is_idx = id(p) in idx_params
        p.requires_grad_(indexer if is_idx else main)
        (idx_ps if is_idx else main_ps).append(p)
    return main_ps, idx_ps


def train(args) -> dict:
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; weights and the rest stay fp32
    data_dir = Path(args.data)

    train_texts = {d: load_texts(data_dir, d, heldout=False, suffix=args.data_suffix) for d in DOMAINS}
    held_texts = {d: load_texts(data_dir, d, heldout=True, suffix=args.data_suffix) for d in DOMAINS}
    if args.init_from:
        tok = PreTrainedTokenizerFast.from_pretrained(args.init_from)
        tok.model_max_length = max(tok.model_max_length, args.seq_len)
    else:
        tok_texts = [t for d in DOMAINS for t in (train_texts[d][: args.tokenizer_docs] if args.tokenizer_docs else train_texts[d])]
        tok = train_tokenizer(tok_texts, args.vocab_size, max(4096, args.seq_len))
    train_streams = {d: token_stream(tok, train_texts[d]) for d in DOMAINS}
    held_streams = {d: token_stream(tok, held_texts[d]) for d in DOMAINS}
    eval_windows = {}
    for d in DOMAINS:
        n = min(args.eval_seqs, len(held_streams[d]) // args.seq_len)
        eval_windows[d] = held_streams[d][: n * args.seq_len].view(n, args.seq_len)
    quick_windows = {d: w[: max(1, min(8, len(w)))] for d, w in eval_windows.items()}
    print(f"tokenizer: {len(tok)} tokens; train tokens " + ", ".join(f"{d} {len(s):,}" for d, s in train_streams.items())
          + "; held-out tokens " + ", ".join(f"{d} {len(s):,}" for d, s in held_streams.items()), flush=True)

    model = (load_init(args) if args.init_from else build_model(args, tok)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    dsa = args.arch == "glm_moe_dsa"
    print(f"{type(model).__name__}: {args.layers} layers, hidden {args.hidden}, {n_params:,} parameters "
          f"({n_params * 4 / 1e6:.1f} MB fp32), {f'index_topk {args.index_topk}, ' if dsa else ''}seq_len {args.seq_len}, "
          f"device {args.device}", flush=True)
    stages, evals = [], {}
    if args.eval_initial:
        evals["initial"] = evaluate(model, eval_windows, args, recall=dsa)
        print(f"initial: {json.dumps(evals['initial'])}", flush=True)

    # 1. dense: the indexers are bypassed, so they neither cost time nor get gradients.
    main_ps, idx_ps = set_trainable(model, main=True, indexer=False)

    def dense_step(x):
        with warmup.dense(model):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return {"loss": loss.item()}

    if "dense" in args.stages or not dsa:
        if args.dense_attn != "eager":
            model.set_attn_implementation(args.dense_attn)
        stages.append(run_stage("dense", args, model, decay_groups(main_ps, args.lr), dense_step,
                                Windows(train_streams, args.seq_len, args.batch_size, args.seed * 1000 + 1),
                                lambda: evaluate(model, quick_windows, args, modes=("dense",))))
        model.set_attn_implementation("eager")
        if args.stage_evals or not dsa:
            evals["after_dense"] = evaluate(model, eval_windows, args, modes=("dense", "sparse") if dsa else ("dense",),
                                            recall=dsa)
            print(f"after dense: {json.dumps(evals['after_dense'])}", flush=True)
    if not dsa:  # glm4_moe_lite: no indexer; `indexcache dsa-convert` adds and warms them up
        return _save(args, model, tok, stages, evals, data_dir, train_streams, held_streams, eval_windows, n_params, t_start)

    # 2. indexer warm-up: frozen main weights, KL(dense head-mean attention || softmax(index scores)).
    main_ps, idx_ps = set_trainable(model, main=False, indexer=True)

    every_layer = {i: [i] for i in warmup.indexers(model)}
    verified = []

    def indexer_step(x):  # the dense warm-up of `indexcache dsa-convert`, one implementation
        res = warmup.indexer_step(model, x, every_layer, verify=not verified)
        verified.append(True)
        return {"loss": res.loss}

    if "indexer" in args.stages:
        stages.append(run_stage("indexer", args, model, decay_groups(idx_ps, args.indexer_lr), indexer_step,
                                Windows(train_streams, args.seq_len, args.batch_size, args.seed * 1000 + 2)))
        if args.stage_evals:
            evals["after_indexer"] = evaluate(model, eval_windows, args, recall=True)
            print(f"after indexer warm-up: {json.dumps(evals['after_indexer'])}", flush=True)

    # 3. sparse: top-k attention; LM loss trains the main weights, the KL over the selected keys
    # trains the indexers (their inputs are detached, as the top-k passes no gradient anyway).
    main_ps, idx_ps = set_trainable(model, main=True, indexer=True)

    def sparse_step(x):
        records, probs = {}, {}
        with warmup.swap_indexers(model, scored_topk(records)), warmup.attention_probs(model, probs):
            lm = model(input_ids=x, labels=x).loss
        kl = 0.0
        for i, (scores, topk) in records.items():
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, topk.long(), True)
            restricted = scores.masked_fill(~chosen, float("-inf"))  # the KL over the selected keys only
            loss_i, _ = warmup.multi_layer_kl([probs[i]], restricted)
            kl = kl + loss_i / len(records)
        loss = lm + args.kl_weight * kl
        loss.backward()
        return {"loss": loss.item(), "lm": lm.item(), "kl": float(kl.detach()) if torch.is_tensor(kl) else kl}

    def sparse_step_gather(x):
        # The same loss as sparse_step in two passes: a no-grad eager forward with the library's indexers
        # records each layer's indexer call, top-k and (top-k) attention probabilities; each indexer's KL
        # over its selected keys is backpropagated one layer at a time; then the LM forward and backward run
        # on the gather-based sparse attention with those top-k (memory linear in length).
        calls, probs, topks = {}, {}, {}

        def record(i, ix):
            def forward(*a, **kw):
                calls[i] = Call(a, kw)
                _, topks[i] = warmup.index_scores(ix, calls[i], grad=False)
                return topks[i]
            return forward

        with torch.no_grad(), warmup.swap_indexers(model, record), warmup.attention_probs(model, probs):
            warmup.base_model(model)(input_ids=x, use_cache=False)
        ixs, kl = warmup.indexers(model), 0.0
        for i, topk in topks.items():
            scores, _ = warmup.index_scores(ixs[i], calls[i])
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, topk.long(), True)
            loss_i, value = warmup.multi_layer_kl([probs.pop(i)], scores.masked_fill(~chosen, float("-inf")))
            (args.kl_weight * loss_i / len(topks)).backward()
            kl += value / len(topks)
            del scores, loss_i
        calls.clear()
        with sparse_attention.attention_path(model, "sparse"), \
                warmup.swap_indexers(model, lambda i, ix: (lambda *a, **kw: topks[i])):
            lm = model(input_ids=x, labels=x).loss
        lm.backward()
        return {"loss": lm.item() + args.kl_weight * kl, "lm": lm.item(), "kl": kl}

    if "sparse" in args.stages:
        if args.sparse_path == "gather":
            from indexcache_calib import attention as sparse_attention
        groups = decay_groups(main_ps, args.sparse_lr) + decay_groups(idx_ps, args.indexer_lr)
        stages.append(run_stage("sparse", args, model, groups, sparse_step_gather if args.sparse_path == "gather" else sparse_step,
                                Windows(train_streams, args.seq_len, args.batch_size, args.seed * 1000 + 3),
                                lambda: evaluate(model, quick_windows, args, modes=("sparse",))))
    set_trainable(model, main=True, indexer=True)
    # Final numbers use the library's own indexer forward (nothing replaced) for sparse.
    evals["final"] = evaluate(model, eval_windows, args, recall=args.recall)
    print(f"final: {json.dumps(evals['final'])}", flush=True)
    return _save(args, model, tok, stages, evals, data_dir, train_streams, held_streams, eval_windows, n_params, t_start)


def _save(args, model, tok, stages, evals, data_dir, train_streams, held_streams, eval_windows, n_params, t_start) -> dict:
    out = Path(args.out)
    n_layers = len(model.model.layers)
    dsa = args.arch == "glm_moe_dsa"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log = {
        "model": {"class": type(model).__name__, "parameters": n_params, "layers": n_layers, "hidden": args.hidden,
                  "heads": args.heads, "intermediate": model.config.intermediate_size,
                  "q_lora_rank": model.config.q_lora_rank, "kv_lora_rank": model.config.kv_lora_rank,
                  "qk_nope_head_dim": model.config.qk_nope_head_dim, "qk_rope_head_dim": model.config.qk_rope_head_dim,
                  "v_head_dim": model.config.v_head_dim, "index_topk": args.index_topk if dsa else None,
                  "index_n_heads": args.index_heads if dsa else None,
                  "index_head_dim": model.config.index_head_dim if dsa else None,
                  "vocab_size": len(tok), "weights_dtype": "float32"},
        "data": {"dir": _rel(data_dir), "suffix": args.data_suffix, "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                                                  for f in sorted(data_dir.glob("*.jsonl"))},
                 "train_tokens": {d: len(s) for d, s in train_streams.items()},
                 "heldout_tokens": {d: len(s) for d, s in held_streams.items()},
                 "eval_sequences": {d: len(w) for d, w in eval_windows.items()}},
        "training": {"seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.seed,
                     "device": _device_name(args), "bf16_autocast": bool(args.bf16 and args.device == "cuda"),
                     "smoke": args.smoke, "kl_weight": args.kl_weight, "stages": stages,
                     "init_from": _rel(Path(args.init_from)) if args.init_from else None,
                     "max_position_embeddings": model.config.max_position_embeddings,
                     "rope_parameters": dict(model.config.rope_parameters or {}),
                     "dense_attn": args.dense_attn, "sparse_path": args.sparse_path,
                     "total_wall_s": round(time.time() - t_start, 1)},
        "held_out_loss": evals,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "command": "python -m indexcache_calib.recipes.train_tiny " + " ".join(args.argv),
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(model_card(log), encoding="utf-8")
    print(f"saved to {out} in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return log


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _device_name(args) -> str:
    if args.device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.processor() or platform.machine()}, {plural(torch.get_num_threads(), 'thread')})"


def model_card(log: dict) -> str:
    m, t, ev = log["model"], log["training"], log["held_out_loss"]
    if m["class"] == "Glm4MoeLiteForCausalLM":
        return lite_model_card(log)
    stage_rows = "\n".join(
        f"| {s['stage']} | {s['steps_done']} | {s['steps_planned']} | {s['steps_skipped']} | {s['wall_s']:.0f} "
        f"| {s['tokens']:,} | {s['tokens_per_s']:,.0f} | {', '.join(f'{k} {v}' for k, v in s['last_losses'].items())} |"
        for s in t["stages"])
    loss_rows = "\n".join(
        f"| {when.replace('_', ' ')} | {d} | {ev[when][d]['dense']:.4f} | {ev[when][d]['sparse']:.4f} "
        f"| {ev[when][d]['sparse'] - ev[when][d]['dense']:+.4f} |"
        for when in ev for d in DOMAINS)
    recall = ev["final"].get("indexer_recall")
    recall_line = ""
    if recall:
        recall_line = (f"\nShare of dense attention mass inside the indexer's top-{m['index_topk']} after training, per layer "
                       f"(queries with more than {m['index_topk']} keys): {', '.join(f'{v:.2f}' for v in recall)}; "
                       f"the best possible top-{m['index_topk']} holds {', '.join(f'{v:.2f}' for v in ev['final']['oracle_recall'])}.\n")
    smoke = "\n**Smoke run: a few steps per stage, not a usable model.**\n" if t["smoke"] else ""
    names = [s["stage"] for s in t["stages"]]
    init = ""
    if t.get("init_from"):
        init = (f"\n**Continued training** of `{t['init_from']}` (its weights and tokenizer) at {t['seq_len']} tokens, "
                f"`max_position_embeddings` {t['max_position_embeddings']}, RoPE `{json.dumps(t.get('rope_parameters'))}`; "
                f"stages run: {', '.join(names)}.\n")
    paths = []
    if t.get("dense_attn", "eager") != "eager" and "dense" in names:
        paths.append(f"the dense stage ran on `{t['dense_attn']}` attention")
    if t.get("sparse_path") == "gather" and "sparse" in names:
        paths.append("the sparse stage's LM forward ran on `indexcache_calib.attention`'s gather-based top-k attention, "
                     "the indexer KL targets on a gradient-free eager forward with the same top-k")
    if paths:
        init += "\nAttention: " + "; ".join(paths) + ".\n"
    suffix = log["data"].get("suffix", "")
    tok_origin = (f"`{t['init_from']}`'s tokenizer, unchanged" if t.get("init_from")
                  else "trained on the training split of both domains")
    return f"""# Tiny DSA checkpoint ({m['layers']} layers, hidden {m['hidden']})
{smoke}
A `GlmMoeDsaForCausalLM` (transformers' GLM-5 DSA architecture, unchanged) small enough for
tests and search benchmarks of IndexCache patterns. Trained by `indexcache_calib.recipes.train_tiny`:

    {log['command']}

Load it with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.
All layers are `full` (every layer has its own indexer), so any F/S pattern can be searched.
{init}
## Sizes

- {m['parameters']:,} parameters, {m['weights_dtype']} weights (embeddings tied to the LM head).
- {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, dense SwiGLU MLP of width {m['intermediate']},
  q_lora_rank {m['q_lora_rank']}, kv_lora_rank {m['kv_lora_rank']}, qk_nope/qk_rope/v head dims
  {m['qk_nope_head_dim']}/{m['qk_rope_head_dim']}/{m['v_head_dim']}.
- Indexer: {m['index_n_heads']} heads of dim {m['index_head_dim']}, `index_topk` {m['index_topk']}.
- Byte-level BPE tokenizer, {m['vocab_size']} tokens, end-of-text `{EOS}`, {tok_origin}.

## Data

`{log['data']['dir']}` (files `<domain>{suffix}.jsonl`, held out `<domain>{suffix}.heldout.jsonl`): Python standard-library source ("code", PSF License) and GNU Info manuals
("docs", GNU FDL); see its README.md for provenance. Training tokens: {', '.join(f'{d} {n:,}' for d, n in log['data']['train_tokens'].items())}.
Held-out tokens: {', '.join(f'{d} {n:,}' for d, n in log['data']['heldout_tokens'].items())};
losses below use the first {', '.join(f'{d} {n}' for d, n in log['data']['eval_sequences'].items())} held-out sequences of {t['seq_len']} tokens.

## Recipe

1. **dense**: LM loss, every indexer bypassed (returns all keys), main weights only.
2. **indexer** warm-up: main weights frozen; per layer, KL(head-averaged dense attention || softmax(index scores)).
3. **sparse**: top-k attention; LM loss on the main weights plus {t['kl_weight']} x the indexer KL restricted to the selected keys.

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0, linear warm-up then cosine
decay to 10%, batch {t['batch_size']} x {t['seq_len']} tokens, seed {t['seed']}, fp32 weights
{'with bf16 autocast' if t['bf16_autocast'] else 'and arithmetic'}, device {t['device']}.
Steps with a non-finite loss or gradient are skipped and counted.

| stage | steps done | steps planned | skipped | wall (s) | tokens | tokens/s | last losses |
|---|---|---|---|---|---|---|---|
{stage_rows}

Whole run: {t['total_wall_s'] / 60:.1f} min.

## Held-out loss (nats/token)

"sparse" is the all-F model with the library's own indexers and top-k attention; "dense" bypasses the indexers.

| after | domain | dense | all-F sparse | sparse - dense |
|---|---|---|---|---|
{loss_rows}
{recall_line}
## Versions

{', '.join(f'{k} {v}' for k, v in log['versions'].items())}.
"""


def lite_model_card(log: dict) -> str:
    m, t, ev = log["model"], log["training"], log["held_out_loss"]
    (stage,) = t["stages"]
    losses = ", ".join(f"{d} {ev['after_dense'][d]['dense']:.4f}" for d in DOMAINS)
    smoke = "\n**Smoke run: a few steps, not a usable model.**\n" if t["smoke"] else ""
    return f"""# Tiny plain-MLA checkpoint ({m['layers']} layers, hidden {m['hidden']})
{smoke}
A `Glm4MoeLiteForCausalLM` (transformers' GLM-4.7-Flash architecture: MLA attention, no lightning indexer),
the small stand-in for GLM-4.7-Flash that `indexcache dsa-convert` turns into a DSA model. Trained by
`indexcache_calib.recipes.train_tiny` (its dense stage only):

    {log['command']}

- {m['parameters']:,} parameters, {m['weights_dtype']} weights (embeddings tied to the LM head); {m['layers']} layers,
  hidden {m['hidden']}, {m['heads']} heads, dense SwiGLU MLP of width {m['intermediate']}, q_lora_rank {m['q_lora_rank']},
  kv_lora_rank {m['kv_lora_rank']}, qk_nope/qk_rope/v head dims {m['qk_nope_head_dim']}/{m['qk_rope_head_dim']}/{m['v_head_dim']}.
- Byte-level BPE tokenizer, {m['vocab_size']} tokens, trained on the training split of both domains of `{log['data']['dir']}`.
- LM training: {stage['steps_done']} steps of {t['batch_size']} x {t['seq_len']} tokens ({stage['tokens']:,} tokens,
  {stage['epochs']} epochs), AdamW, peak lr {stage['peak_lrs'][0]}, device {t['device']}, {stage['wall_s'] / 60:.1f} min,
  {stage['steps_skipped']} non-finite steps skipped.
- Held-out loss (nats/token, first {', '.join(f'{d} {n}' for d, n in log['data']['eval_sequences'].items())} sequences): {losses}.

Versions: {', '.join(f'{k} {v}' for k, v in log['versions'].items())}.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

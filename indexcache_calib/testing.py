"""Random-weight tiny DSA checkpoints, built from config and saved with `save_pretrained`, so tests,
smoke runs and benchmarks exercise the real loading path. Their losses mean nothing."""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from indexcache_calib.model import _auto_class

# Each family in `families.FAMILIES`, as a tiny config built from its own config class: family name ->
# builder(layers, hidden, index_topk, **over). A family is added here with its row (tests check every row has
# one). "glm" and "dsv32" name the two original architectures.
TINY: dict[str, Callable] = {}
ALIASES = {"glm": "glm_moe_dsa", "dsv32": "deepseek_v32"}


def tiny(*names: str):
    """Register a tiny config builder for the families `names`."""

    def register(build: Callable) -> Callable:
        for name in names:
            TINY[name] = build
        return build

    return register


def _common(layers: int, hidden: int, index_topk: int) -> dict:
    return dict(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        index_topk=index_topk, index_head_dim=16, index_n_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def _mla(hidden: int, rope: int = 8) -> dict:
    return dict(q_lora_rank=hidden // 2, kv_lora_rank=hidden // 2, qk_rope_head_dim=rope, qk_nope_head_dim=8, v_head_dim=8)


def _mla_moe(class_name: str) -> Callable:
    def build(layers: int, hidden: int, index_topk: int, **over):
        kw = dict(**_common(layers, hidden, index_topk), **_mla(hidden), n_group=1, topk_group=1, first_k_dense_replace=1,
                  n_shared_experts=1)
        kw.update(over)
        return getattr(tf, class_name)(**kw)

    return build


tiny("glm_moe_dsa")(_mla_moe("GlmMoeDsaConfig"))
tiny("deepseek_v32")(_mla_moe("DeepseekV32Config"))
tiny("axk2")(_mla_moe("AXK2Config"))


@tiny("hy_v4")
def _hy_v4(layers: int, hidden: int, index_topk: int, **over):
    return tf.HYV4Config(**{**_common(layers, hidden, index_topk), **_mla(hidden), "hc_mult": 2, **over})


@tiny("dots3_note")
def _dots3_note(layers: int, hidden: int, index_topk: int, **over):
    """Layers 0, 1 and every 4th from 1 are indexed; the rest are sliding-window MLA without an indexer."""
    kw = dict(**_common(layers, hidden, index_topk), **_mla(hidden), head_dim=16, sliding_window=16, swa_num_attention_heads=2,
              swa_num_key_value_heads=2, swa_q_lora_rank=hidden // 2, swa_kv_lora_rank=hidden // 2, swa_head_dim=16,
              swa_qk_nope_head_dim=8, swa_v_head_dim=8, n_group=1, topk_group=1)
    kw["num_attention_heads"] = kw["num_key_value_heads"] = 2
    kw.update(over)
    return tf.Dots3NoteTextConfig(**kw)


@tiny("mistral_large4")
def _mistral_large4(layers: int, hidden: int, index_topk: int, **over):
    text = dict(model_type="mistral_large4_text", **_common(layers, hidden, index_topk), kv_lora_rank=hidden // 2,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8)
    text.update(over)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, head_dim=16)
    return tf.MistralLarge4Config(text_config=text, vision_config=vision)


@tiny("glm5_next")
def _glm5_next(layers: int, hidden: int, index_topk: int, **over):
    """NoPE indexer with k-pools; every third layer is linear attention (KDA), which has no indexer."""
    types = ["linear_attention" if i % 3 == 2 else "indexed_attention" for i in range(layers)]
    text = dict(model_type="glm5_next_text", **_common(layers, hidden, index_topk), q_lora_rank=hidden // 2,
                kv_lora_rank=hidden // 2, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=8, index_kpool=2,
                layer_types=types, linear_head_dim=16, linear_num_heads=2, hc_mult=2)
    text["num_attention_heads"] = text["num_key_value_heads"] = 2
    text.update(over)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=hidden,
                  projection_intermediate_size=64, patch_size=8, image_size=32)
    return tf.Glm5NextConfig(text_config=text, vision_config=vision)


@tiny("deepseek_v4")
def _deepseek_v4(layers: int, hidden: int, index_topk: int, **over):
    """Compressed-sparse layers (indexer over compressed entries, rate 2) alternate with heavily compressed
    ones, after a sliding-window layer; index_topk counts compressed entries."""
    types = ["sliding_attention"] + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(1, layers)]
    kw = dict(vocab_size=96, hidden_size=hidden, moe_intermediate_size=hidden // 2, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, q_lora_rank=hidden // 2, n_routed_experts=4,
              num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=4096, layer_types=types,
              compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8},
              mlp_layer_types=["moe"] * layers, hc_mult=2, hc_sinkhorn_iters=3, sliding_window=8, o_groups=2,
              o_lora_rank=8, index_n_heads=2, index_head_dim=16, index_topk=index_topk // 2, num_nextn_predict_layers=0,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kw.update(over)
    return tf.DeepseekV4Config(**kw)


@tiny("minimax_m3_vl")
def _minimax_m3_vl(layers: int, hidden: int, index_topk: int, **over):
    """Block-sparse indexer on minimax_m3_sparse layers: 2-token blocks, 2 selected plus 1 local."""
    types = ["full_attention"] + ["minimax_m3_sparse"] * (layers - 1)
    kw = dict(vocab_size=96, hidden_size=hidden, intermediate_size=hidden, dense_intermediate_size=2 * hidden,
              shared_intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
              layer_types=types, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), index_n_heads=2,
              index_head_dim=16, index_block_size=2, index_topk_blocks=index_topk // 2, index_local_blocks=1,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kw.update(over)
    return tf.MiniMaxM3VLTextConfig(**kw)


@tiny("qwen4_exp")
def _qwen4_exp(layers: int, hidden: int, index_topk: int, **over):
    """QSA indexer (a token mask from compressed blocks plus the recent tail) on every third layer; the
    others are GatedDeltaNet linear attention. Hyper-connections between layers."""
    types = ["indexed_attention" if i % 3 != 2 else "linear_attention" for i in range(layers)]
    kw = dict(vocab_size=96, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
              moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2, num_experts=4,
              num_experts_per_tok=2, max_position_embeddings=4096, layer_types=types, hc_count=2, hc_lowrank=8,
              indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=index_topk,
              indexer_compress_ratio=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kw.update(over)
    return tf.Qwen4ExpTextConfig(**kw)


ARCHS = (*ALIASES, *TINY)  # what --arch accepts: a family name, or one of the two original short names


def tiny_config(arch: str = "glm", layers: int = 6, hidden: int = 32, index_topk: int = 8, **over):
    """The tiny config of a family (by name, or "glm" / "dsv32"), with `over` on top."""
    build = TINY.get(ALIASES.get(arch, arch))
    if build is None:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    return build(layers, hidden, index_topk, **over)


def save_tiny(path, arch: str = "glm", layers: int = 6, seed: int = 0, weight_std: float = 0.3, **over):
    """Write a random tiny checkpoint (config, safetensors, character tokenizer) to `path`."""
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, **over)
    model = _auto_class(config).from_config(config)
    with torch.no_grad():  # the default init is near-uniform; larger weights make layers matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "hc_" not in name and ".fn" not in name:
                p.normal_(0, weight_std)
    model.save_pretrained(path)
    save_char_tokenizer(path, config.get_text_config().vocab_size)
    return path


def save_char_tokenizer(path, vocab_size: int) -> None:
    """One token per printable character: enough to pack any ASCII text into sequences."""
    chars = [chr(c) for c in range(32, 32 + vocab_size - 3)]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--arch", choices=ARCHS, default="glm")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--index-topk", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    save_tiny(a.out, a.arch, a.layers, a.seed, hidden=a.hidden, index_topk=a.index_topk)
    print(a.out)


if __name__ == "__main__":
    main()

"""Random-weight tiny DSA checkpoints, built from config and saved with `save_pretrained`, so tests,
smoke runs and benchmarks exercise the real loading path. Their losses mean nothing."""

from __future__ import annotations

import argparse

import torch

ARCHS = ("glm", "dsv32")


def tiny_config(arch: str = "glm", layers: int = 6, hidden: int = 32, index_topk: int = 8, **over):
    from transformers import DeepseekV32Config, GlmMoeDsaConfig

    cls = GlmMoeDsaConfig if arch == "glm" else DeepseekV32Config
    kw = dict(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=hidden // 2, kv_lora_rank=hidden // 2, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        index_topk=index_topk, index_head_dim=16, index_n_heads=2, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    kw.update(over)
    return cls(**kw)


def save_tiny(path, arch: str = "glm", layers: int = 6, seed: int = 0, weight_std: float = 0.3, **over):
    """Write a random tiny checkpoint (config, safetensors, character tokenizer) to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, layers, **over)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the default init is near-uniform; larger weights make layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, weight_std)
    model.save_pretrained(path)
    save_char_tokenizer(path, config.vocab_size)
    return path


def save_char_tokenizer(path, vocab_size: int) -> None:
    """One token per printable character: enough to pack any ASCII text into sequences."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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

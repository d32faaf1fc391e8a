"""DeepSeek-V4 on the sparse path: its compressor without the [seq, compressed keys] bias, and its indexer's
compressed keys computed once for query chunks.

The library's compressors (`DeepseekV4CSACompressor`, `DeepseekV4HCACompressor`) return the compressed KV
entries and a `[batch, 1, seq, entries]` bias (the indexer's selection on compressed-sparse layers, causality
on heavily-compressed ones) that the attention concatenates onto its `[seq, seq]` mask. `CompactCompressor`
stands in for one of them while the sparse path is on (the family row names it): it compresses as the library
does (stateless, no cache), calls the layer's own indexer, and hands the entries with the selection in compact
form (`Appended`: the ids `[batch, seq, k]`, or each query's count of visible entries `[batch, seq]`) to the
registered sparse kernel through the attention module; the model is returned no entries and no bias, so its
mask stays the window mask the kernel reads a chunk of rows at a time. On another attention implementation it
is the library's module, unchanged; on the sparse path with a KV cache it refuses (calibration uses none).

`CompressedKeys` stands in for the KV cache so the library's own indexer scores query chunks against its
compressed keys, computed once (as `sharing._KeySource` does for the families with `update_indexer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from indexcache_calib.attention import SPARSE, set_appended
from indexcache_calib.sharing import _Captured


@dataclass
class Appended:
    """Keys a layer attends to besides its window, in compact form: `keys` and `values` [batch, 1, entries, dim];
    `ids` [batch, seq, k] (-1: none) selects per query, or, where None, query q sees the entries below `limit[:, q]`."""

    keys: torch.Tensor
    values: torch.Tensor
    ids: torch.Tensor | None = None
    limit: torch.Tensor | None = None


def compress(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The compressed entries [batch, entries, head_dim] of a DeepSeek-V4 compressor without a cache, as its
    own forward computes them: one entry per closed window of `compress_rate` tokens, softmax-gated; where the
    projections are twice `head_dim` wide (compressed-sparse layers) each entry also takes the previous
    window's first half (the overlap layout), the first window's with weight 0."""
    batch = hidden_states.shape[0]
    rate, dim = module.compress_rate, module.head_dim
    kv, gate = module.kv_proj(hidden_states), module.gate_proj(hidden_states)
    usable = (kv.shape[1] // rate) * rate
    if usable == 0:
        return kv.new_zeros((batch, 0, dim))
    windows = usable // rate
    kv = kv[:, :usable].view(batch, windows, rate, -1)
    gate = gate[:, :usable].view(batch, windows, rate, -1) + module.position_bias
    if kv.shape[-1] == 2 * dim:
        new_kv = kv.new_zeros((batch, windows, 2 * rate, dim))
        new_gate = gate.new_full((batch, windows, 2 * rate, dim), float("-inf"))
        new_kv[:, :, rate:] = kv[..., dim:]
        new_gate[:, :, rate:] = gate[..., dim:]
        if windows > 1:
            new_kv[:, 1:, :rate] = kv[:, :-1, :, :dim]
            new_gate[:, 1:, :rate] = gate[:, :-1, :, :dim]
        kv, gate = new_kv, new_gate
    compressed = module.kv_norm((kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))
    positions = (torch.arange(windows, device=compressed.device) * rate).unsqueeze(0).expand(batch, -1)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    return apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


class CompactCompressor(nn.Module):
    """Stands where a layer's compressor is while the sparse path is on (see the module docstring)."""

    def __init__(self, original: nn.Module, attention: nn.Module):
        super().__init__()
        # Plain attributes, not submodules: the weights stay the original's.
        object.__setattr__(self, "replaced", original)
        object.__setattr__(self, "attention", attention)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "replaced"), name)

    def forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
        original = self.replaced
        if self.attention.config._attn_implementation != SPARSE:
            return original(hidden_states, q_residual, position_ids, past_key_values, layer_idx)
        if past_key_values is not None:  # the library's bias would meet the sparse path's boolean mask
            raise ValueError(f"{SPARSE} attention runs DeepSeek-V4 without a KV cache (use_cache=False), as calibration does")
        entries = compress(original, hidden_states).unsqueeze(1)  # [B, 1, C, D]
        indexer = getattr(original, "indexer", None)
        if indexer is not None:  # compressed-sparse: the indexer's ids, -1 where invalid, as the bias reads them
            appended = Appended(entries, entries, ids=indexer(hidden_states, q_residual, position_ids, None, layer_idx))
        else:  # heavily compressed: every entry whose window closed at or before the query
            appended = Appended(entries, entries, limit=(position_ids + 1) // original.compress_rate)
        set_appended(self.attention, appended)
        return entries[:, :, :0], None


def compact_compressor(original: nn.Module, attention: nn.Module) -> nn.Module:
    return CompactCompressor(original, attention)


class CompressedKeys:
    """DeepSeek-V4's cache layer as its indexer reads it, for chunked calls: the first call (the whole
    sequence) compresses as without a cache and stops once its compressed keys exist; later calls (query
    chunks) compress nothing and score against those keys."""

    def __init__(self, rate: int):
        self.rate, self.keys = rate, None

    @property
    def layers(self):
        return self

    def __getitem__(self, layer_idx):
        return self

    def store_compression_weights(self, name, kv, gate):
        usable = (kv.shape[1] // self.rate) * self.rate if self.keys is None else 0
        return kv[:, :usable], gate[:, :usable], 0

    def update_overlap_state(self, name, kv, gate, head_dim):
        return None, None  # no earlier call: the first window's overlap half keeps weight 0

    def update_compressor_states(self, name, compressed):
        if self.keys is None:
            self.keys = compressed
            raise _Captured
        return self.keys


def compressed_keys(indexer) -> CompressedKeys:
    return CompressedKeys(int(indexer.compress_rate))

"""MiniMax-M3 on the sparse path: its key blocks as the token ids the kernel gathers, and its indexer's keys
computed once for query chunks.

The library's MiniMax-M3 attention passes its indexer's selection to a registered implementation as
`block_indices=` ([batch, index heads, seq, blocks], one index head per KV head, -1 padded; the local blocks
are already in it: the indexer boosts them before its top-k) and the plain causal mask; only on `eager`/`sdpa`
does it expand them into a `[batch, heads, seq, keys]` mask (`build_block_mask`). `block_tokens` turns rows of
that selection into the token ids each KV head attends to, which `attention.sparse_attention` gathers (the
family row names it), so nothing replaces a module of the model.

`IndexKeys` stands in for the KV cache so the library's own indexer scores query chunks against its keys,
computed once (as `sharing._KeySource` does for the families with `update_indexer`): the indexer hands its
keys to `past_key_values.layers[layer_idx].update_index` and scores against what comes back.
"""

from __future__ import annotations

import torch

from indexcache_calib.sharing import _Captured


def block_tokens(block_size: int, blocks: torch.Tensor) -> torch.Tensor:
    """Token ids [..., k * block_size] of key blocks [..., k] (-1: none, and so are all its tokens). Ids past
    the sequence (a last, partial block) are left for the kernel to drop, as it drops any id past its keys."""
    offsets = torch.arange(block_size, device=blocks.device, dtype=blocks.dtype)
    tokens = blocks.unsqueeze(-1) * block_size + offsets
    return tokens.masked_fill(blocks.unsqueeze(-1) < 0, -1).flatten(-2)


class IndexKeys:
    """MiniMax-M3's sparse cache layer as its indexer reads it, for chunked calls: the first call (the whole
    sequence) stops once its keys exist; later calls (query chunks) score against those keys."""

    def __init__(self):
        self.keys = None

    @property
    def layers(self):
        return self

    def __getitem__(self, layer_idx):
        return self

    def update_index(self, keys: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            self.keys = keys
            raise _Captured
        return self.keys


def index_keys(indexer) -> IndexKeys:
    return IndexKeys()

"""Index capture and reuse: the only place that changes a model's behaviour.

`install_sharing(layout, state)` puts an `IndexerProxy` in place of every layer's indexer and returns a
handle whose `remove()` puts the originals back; nothing else in the package touches model modules.
The originals, with any accelerate hooks on them, are called as they are, never modified.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from indexcache_calib.pattern import FULL


@dataclass
class SharingState:
    pattern: str
    index_topk: int
    measure_overlap: bool = True
    chunk: int | None = None  # query rows per indexer call; None = automatic, 0 = one call
    current: torch.Tensor | None = None  # top-k of the nearest preceding full layer, for the batch in flight
    overlap_hits: dict[int, float] = field(default_factory=dict)
    overlap_total: dict[int, float] = field(default_factory=dict)
    indexer_calls: int = 0

    def reset_overlap(self) -> None:
        self.overlap_hits.clear()
        self.overlap_total.clear()

    def layer_overlap(self) -> dict[int, float]:
        return {i: self.overlap_hits[i] / self.overlap_total[i] for i in sorted(self.overlap_total) if self.overlap_total[i]}


class _Captured(Exception):
    pass


class _KeySource:
    """Stands in for the KV cache so the library's own indexer can run on query chunks. A first call
    on the whole sequence stops as soon as the keys are computed and keeps them; every chunk's call
    then scores its queries against all of them, so each row of scores is the unchunked row."""

    def __init__(self):
        self.keys = None

    def update_indexer(self, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self.keys is None:
            self.keys = keys
            raise _Captured
        return self.keys


def _cache_kwarg(indexer: nn.Module) -> str:
    # transformers renamed the indexer's `past_key_values` argument to `cache` after 5.23.
    params = inspect.signature(type(indexer).forward).parameters
    return "past_key_values" if "past_key_values" in params else "cache"


# Bound on the fp32 per-head score tensor of one indexer call when --indexer-chunk is left automatic.
AUTO_SCORE_BYTES = 1 << 30


def auto_chunk(batch: int, heads: int, seq: int) -> int:
    """Query rows per indexer call so that its [batch, rows, heads, seq] fp32 scores stay within
    AUTO_SCORE_BYTES; `seq` or more means one call."""
    return max(1, AUTO_SCORE_BYTES // (batch * heads * seq * 4))


def run_indexer(indexer, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, index_topk, chunk=None):
    """The layer's own top-k, [B, S, index_topk]. With `chunk`, queries are scored `chunk` rows at a time
    so the fp32 score tensor is [B, chunk, H, T] instead of [B, S, H, T]; each row, and so its top-k,
    is the same as in the single call. The first call computes the queries of the whole sequence
    too (small: [B, S, H, D]) before it is stopped. `chunk` None picks rows automatically (see
    `auto_chunk`); 0 always makes one call."""
    seq = hidden_states.shape[1]
    if chunk is None:
        chunk = auto_chunk(hidden_states.shape[0], getattr(indexer, "n_heads", 64), seq)
    if chunk == 0 or chunk >= seq:
        return indexer(hidden_states, q_resid, position_embeddings, attention_mask, position_ids)
    cos, sin = position_embeddings
    keys, kwarg, parts = _KeySource(), _cache_kwarg(indexer), []
    try:
        indexer(hidden_states, q_resid, position_embeddings, attention_mask, position_ids, **{kwarg: keys})
    except _Captured:
        pass
    for q0 in range(0, seq, chunk):
        q1 = min(q0 + chunk, seq)
        pos = position_ids[..., q0:q1] if isinstance(position_ids, torch.Tensor) else position_ids
        parts.append(indexer(
            hidden_states[:, q0:q1],
            q_resid[:, q0:q1],
            (cos[:, q0:q1], sin[:, q0:q1]),
            attention_mask[:, q0:q1],
            pos,
            **{kwarg: keys},
        ))
    return torch.cat(parts, dim=1)


def topk_overlap(own: torch.Tensor, reused: torch.Tensor, index_topk: int, chunk: int = 1024) -> tuple[float, float]:
    """(hits, total) for |T_own ∩ T_reused| / k over query positions that see more than k keys.
    Earlier positions select every visible key whatever the indexer, so they say nothing. Indices past
    the query position (padding of the top-k for early rows) are never counted."""
    batch, seq, k = own.shape
    hits = 0.0
    rows_total = 0
    for q0 in range(index_topk, seq, chunk):
        q1 = min(q0 + chunk, seq)
        pos = torch.arange(q0, q1, device=own.device).view(1, -1, 1)
        o = own[:, q0:q1].long()
        r = reused[:, q0:q1].long()
        # Invalid indices go to a spare column `q1` that is cleared before reading, so they never count.
        o = torch.where(o <= pos, o, q1)
        r = torch.where(r <= pos, r, q1)
        chosen = torch.zeros(batch, q1 - q0, q1 + 1, dtype=torch.bool, device=own.device)
        chosen.scatter_(-1, o, True)
        chosen[..., q1] = False
        hit = chosen.gather(-1, r)
        hits += hit.sum().item()
        rows_total += batch * (q1 - q0)
    return hits, float(rows_total * k)


class IndexerProxy(nn.Module):
    """Sits where the layer's indexer was. Full layer: run the real indexer and publish its top-k.
    Shared layer: return the published top-k (on this layer's device) and, only when overlap is
    measured, also run the real indexer to compare."""

    def __init__(self, indexer: nn.Module, layer_id: int, state: SharingState):
        super().__init__()
        # Plain attribute, not a submodule: state_dict and named_modules of the model stay unchanged.
        object.__setattr__(self, "original", indexer)
        self.layer_id = layer_id
        self.state = state

    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None, **_):
        state = self.state

        def own():
            state.indexer_calls += 1
            return run_indexer(
                self.original, hidden_states, q_resid, position_embeddings, attention_mask, position_ids,
                state.index_topk, state.chunk,
            )

        if state.pattern[self.layer_id] == FULL:
            state.current = own()
            return state.current
        reused = state.current.to(hidden_states.device)
        if state.measure_overlap:
            hits, total = topk_overlap(own(), reused, state.index_topk)
            state.overlap_hits[self.layer_id] = state.overlap_hits.get(self.layer_id, 0.0) + hits
            state.overlap_total[self.layer_id] = state.overlap_total.get(self.layer_id, 0.0) + total
        return reused


class SharingHandle:
    def __init__(self, attentions: list, originals: list):
        self._attentions, self._originals = attentions, originals

    def remove(self) -> None:
        for attn, original in zip(self._attentions, self._originals):
            if attn is not None and original is not None:
                attn.indexer = original
        self._attentions, self._originals = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install_sharing(layout, state: SharingState) -> SharingHandle:
    originals = []
    for i, (attn, indexer) in enumerate(zip(layout.attentions, layout.indexers)):
        originals.append(indexer)
        if indexer is not None:
            attn.indexer = IndexerProxy(indexer, i, state)
    return SharingHandle(list(layout.attentions), originals)

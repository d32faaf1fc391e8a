"""Index capture and reuse: the only place that changes what a model's indexers return.

`install_sharing(layout, state)` puts an `IndexerProxy` in place of every position's indexer and returns a
handle whose `remove()` puts the originals back. The originals, with any accelerate hooks on them, are
called as they are, with the arguments the model gave them, never modified.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from indexcache_calib.attention import is_lazy, mask_rows, materialize, working_bytes
from indexcache_calib.families import FULL


@dataclass
class SharingState:
    pattern: str  # one character per pattern position
    overlap: object  # (own, reused) -> (hits, total), for this family's selections
    measure_overlap: bool = True
    chunk: int | None = None  # query rows per indexer call; None = automatic, 0 = one call
    chunks: dict = field(default_factory=dict)  # the family's query-axis arguments; empty: no chunking
    key_source: object = None  # indexer -> the stand-in cache its chunked calls read keys from; None: `_KeySource`
    heads: int = 64  # the indexer's heads (`Family.index_heads`), for the automatic chunk size
    current: object = None  # selection of the nearest preceding full position, for the batch in flight
    overlap_hits: dict[int, float] = field(default_factory=dict)  # by decoder layer id
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


def _cache_kwarg(params) -> str:
    # transformers renamed the indexer's `past_key_values` argument to `cache` after 5.23.
    return "past_key_values" if "past_key_values" in params else "cache"


# Bound on the fp32 per-head score tensor of one indexer call when --indexer-chunk is left automatic.
AUTO_SCORE_BYTES = 64 << 20  # the library also keeps a ReLU copy and the head-weighted sum: about 2.5x this


def auto_chunk(batch: int, heads: int, seq: int, device=None) -> int:
    """Query rows per indexer call so that its [batch, rows, heads, seq] fp32 scores stay within
    AUTO_SCORE_BYTES (on a GPU, an eighth of its free memory); `seq` or more means one call."""
    return max(1, working_bytes(device, AUTO_SCORE_BYTES) // (batch * heads * seq * 4))


def _rows(value, axis: int, q0: int, q1: int):
    if is_lazy(value):  # a mask placeholder of the sparse path: build just these rows
        return mask_rows(value, q0, q1, axis)
    if isinstance(value, torch.Tensor):
        index = [slice(None)] * value.dim()
        index[axis] = slice(q0, q1)
        return value[tuple(index)]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, axis, q0, q1) for v in value)
    return value  # None, or a value with no query axis


def run_indexer(indexer, args: tuple, kwargs: dict, chunks: dict, chunk: int | None = None, key_source=None,
                heads: int = 64):
    """The layer's own selection, called with the arguments the model gave it. With `chunk` rows and a
    family whose query-axis arguments are known (`chunks`), queries are scored `chunk` rows at a time so
    the fp32 score tensor is [B, chunk, H, T] instead of [B, S, H, T]; each row, and so its top-k, is the
    one of the single call. `chunk` None picks rows automatically (see `auto_chunk`); 0 makes one call.
    A mask placeholder of the sparse path becomes the real rows each call needs. `key_source(indexer)` is the
    stand-in cache for an indexer whose cache is not the library's `update_indexer` (see `Family.key_source`);
    `heads`, the indexer's heads as its family row reads them, sizes the automatic chunk. The selection's query
    axis is its second to last in every family ([B, S, k], [B, heads, S, k], [B, 1, S, T])."""
    if not chunks or chunk == 0:
        return indexer(*(materialize(a) for a in args), **{k: materialize(v) for k, v in kwargs.items()})
    signature = inspect.signature(type(indexer).forward)
    named = signature.bind(None, *args, **kwargs).arguments
    named.pop(next(iter(signature.parameters)))  # self
    hidden = named["hidden_states"]
    seq = hidden.shape[1]
    if chunk is None:
        chunk = auto_chunk(hidden.shape[0], heads, seq, hidden.device)
    if chunk >= seq:
        return indexer(**{k: materialize(v) for k, v in named.items()})
    keys = _KeySource() if key_source is None else key_source(indexer)
    kwarg = _cache_kwarg(signature.parameters)
    try:  # stops at the keys, before the mask is read: a placeholder can pass as it is
        indexer(**{**named, kwarg: keys})
    except _Captured:
        pass
    parts = []
    for q0 in range(0, seq, chunk):
        q1 = min(q0 + chunk, seq)
        sliced = {k: (_rows(v, chunks[k], q0, q1) if k in chunks else v) for k, v in named.items()}
        parts.append(indexer(**{**sliced, kwarg: keys}))
    return torch.cat(parts, dim=-2)


def _device(args: tuple, kwargs: dict):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class IndexerProxy(nn.Module):
    """Sits where a position's indexer was. Full: run the real indexer and publish its selection.
    Shared: return the published selection (on this layer's device) and, only when overlap is
    measured, also run the real indexer to compare."""

    def __init__(self, indexer: nn.Module, position: int, layer: int, state: SharingState):
        super().__init__()
        # Plain attribute, not a submodule: state_dict and named_modules of the model stay unchanged.
        object.__setattr__(self, "original", indexer)
        self.position, self.layer = position, layer
        self.state = state

    def __getattr__(self, name):
        # The attention may call other methods of its indexer (MiniMax builds its block mask with one).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "original"), name)

    def forward(self, *args, **kwargs):
        state = self.state

        def own():
            state.indexer_calls += 1
            return run_indexer(self.original, args, kwargs, state.chunks, state.chunk, state.key_source, state.heads)

        if state.pattern[self.position] == FULL:
            state.current = own()
            return state.current
        reused = state.current.to(_device(args, kwargs))
        if state.measure_overlap:
            hits, total = state.overlap(own(), reused)
            state.overlap_hits[self.layer] = state.overlap_hits.get(self.layer, 0.0) + hits
            state.overlap_total[self.layer] = state.overlap_total.get(self.layer, 0.0) + total
        return reused


class SharingHandle:
    def __init__(self, parents: list, attr: str, originals: list):
        self._parents, self._attr, self._originals = parents, attr, originals

    def remove(self) -> None:
        for parent, original in zip(self._parents, self._originals):
            if original is not None:
                setattr(parent, self._attr, original)
        self._parents, self._originals = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install_sharing(layout, state: SharingState) -> SharingHandle:
    attr = layout.attr
    for p, (parent, indexer) in enumerate(zip(layout.parents, layout.indexers)):
        if indexer is not None:
            setattr(parent, attr, IndexerProxy(indexer, p, layout.positions[p], state))
    return SharingHandle(list(layout.parents), attr, list(layout.indexers))


def sharing_state(layout, pattern: str, measure_overlap: bool = True, chunk: int | None = None) -> SharingState:
    family = layout.family
    return SharingState(pattern, family.selection.overlap(layout.text), measure_overlap, chunk, dict(family.chunks),
                        family.key_source, family.index_heads(layout.text))

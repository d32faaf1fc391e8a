"""The sparse attention path: top-k attention that consumes the indexer's selection, in bounded memory.

transformers' DSA attention modules fold the top-k into a dense `[batch, 1, seq, keys]` mask only on the
`eager`/`sdpa` paths; under any other registered implementation they pass the selection as `indices=`.
`sparse_attention` is registered through the library's own `AttentionInterface` under `SPARSE`: it gathers
each query's selected keys and attends to exactly those the dense path would (the mask's causality and
window, `-1` padding, rows that see fewer keys than the budget), a chunk of query rows at a time. Layers
without a selection (a family's sliding-window layers) attend densely, also a chunk of rows at a time. The
family row says under which keyword its attention passes the selection and how rows of it become token ids
(`Family.kernel_selection`): one set of ids for every head (`indices=`), or one per KV head (MiniMax-M3's
`block_indices=`, key blocks with its local blocks, expanded by `blocks.block_tokens`).

A family whose attention appends keys it builds itself, with a `[seq, appended keys]` bias (DeepSeek-V4's
compressed entries), has its row name a stand-in for the module that builds them (`Family.sparse_module`), put
in place while the sparse path is on; the stand-in hands this attention the appended keys with their
selection in compact form (`set_appended`), and the kernel attends to each query's window keys plus its
selected (or causally visible) appended keys in one softmax.

The causal mask is the other `[seq, keys]` tensor. The mask function registered under `SPARSE` returns the
library's own `sdpa_mask`, except inside `lazy_masks()`: there it returns a stride-0 placeholder that
remembers the library's arguments, and `mask_rows` builds any block of rows with `sdpa_mask` itself. Only
code that knows the placeholder runs inside `lazy_masks()`: the pattern runner, whose indexer proxies and
this attention ask for rows.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from indexcache_calib.families import TOKEN_IDS, lookup, resolve_attr

SPARSE = "indexcache_sparse"
# Bound on one query chunk's working tensors (gathered keys and values, logits, probabilities, mask rows)
# on a CPU host; on a GPU, `working_bytes` allows an eighth of its free memory, so a chunk stays large.
CHUNK_BYTES = 64 << 20


def working_bytes(device, floor: int) -> int:
    """Bytes a chunked step may take on `device`: `floor` on a CPU host, where memory is shared and chunks
    cost little; on a GPU an eighth of what is free (never less than `floor`)."""
    if device is not None and torch.device(device).type == "cuda":
        return max(floor, torch.cuda.mem_get_info(device)[0] // 8)
    return floor


_lazy_depth = 0


@contextlib.contextmanager
def lazy_masks():
    """Inside, masks built for `SPARSE` are placeholders that `mask_rows` expands a block at a time."""
    global _lazy_depth
    _lazy_depth += 1
    try:
        yield
    finally:
        _lazy_depth -= 1


def _sparse_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 use_vmap=False, device="cpu", **kwargs):
    args = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                attention_mask=attention_mask, use_vmap=use_vmap, device=device)
    if not _lazy_depth:
        return sdpa_mask(q_length=q_length, q_offset=q_offset, allow_is_causal_skip=False, **args)
    return _placeholder(args, q_offset, q_length)


def _placeholder(args: dict, q_offset, q_length: int) -> torch.Tensor:
    base = torch.ones((), dtype=torch.bool, device=args["device"])
    # The arguments ride on the 0-dim base: every view the model takes of the placeholder shares it.
    base._indexcache_mask = (args, q_offset, q_length)
    return base.expand(args["batch_size"], 1, q_length, args["kv_length"])


def _rows_of(args: dict, q_offset, q0: int, q1: int) -> torch.Tensor:
    return sdpa_mask(q_length=q1 - q0, q_offset=q_offset + q0, allow_is_causal_skip=False, **args)


def on_device(mask, device):
    """The placeholder on `device`, still a placeholder: a plain `.to()` (accelerate moving a layer's
    inputs) would write out all of its [seq, keys] and lose what it stands for. Anything else as it is."""
    if not is_lazy(mask) or device is None or mask.device == torch.device(device):
        return mask
    args, q_offset, q_length = mask._base._indexcache_mask
    padding = args["attention_mask"]
    moved = {**args, "device": device, "attention_mask": None if padding is None else padding.to(device)}
    return _placeholder(moved, q_offset, q_length)


def is_lazy(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask._base is not None and hasattr(mask._base, "_indexcache_mask")


def mask_rows(mask: torch.Tensor, q0: int, q1: int, axis: int) -> torch.Tensor:
    """Rows q0..q1 (on the query `axis`) of a mask, a placeholder or a real tensor alike. A placeholder's
    view that dropped the head axis ([B, S, T], as indexers take it) gets its rows without it too."""
    if not is_lazy(mask):
        index = [slice(None)] * mask.dim()
        index[axis] = slice(q0, q1)
        return mask[tuple(index)]
    args, q_offset, _ = mask._base._indexcache_mask
    rows = _rows_of(args, q_offset, q0, q1)
    return rows[:, 0] if mask.dim() == 3 else rows


def materialize(mask):
    """A real tensor for a placeholder (its whole [seq, keys]); anything else as it is."""
    if not is_lazy(mask):
        return mask
    return mask_rows(mask, 0, mask.shape[-2], mask.dim() - 2)


def _bias(rows: torch.Tensor | None, q0: int, q1: int, total: int, kv_length: int, device) -> torch.Tensor:
    """Additive fp32 bias [B or 1, 1, c, T] from mask rows: boolean (True attends) or additive. No mask
    means causal, as `sdpa` reads a missing mask for more than one query."""
    if rows is None:
        q = torch.arange(q0, q1, device=device).view(-1, 1) + (kv_length - total)
        rows = torch.arange(kv_length, device=device).view(1, -1) <= q
        rows = rows.view(1, 1, q1 - q0, kv_length)
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape, dtype=torch.float32, device=rows.device).masked_fill_(~rows, float("-inf"))
    return rows.float()


def _chunk_rows(per_row: int, device) -> int:
    return max(1, working_bytes(device, CHUNK_BYTES) // max(1, per_row))


def _selection(module, indices, kwargs):
    """(the selection the attention passed, rows -> token ids [B, Hkv or 1, c, k] (-1: none)), as the module's
    family row says its attention passes it (`Family.kernel_selection`); (None, None) where it passed none."""
    config = getattr(module, "config", None)
    family = lookup(config) if config is not None else None
    keyword, to_tokens = family.kernel_selection if family is not None else TOKEN_IDS
    selection = indices if keyword == "indices" else kwargs.get(keyword)
    if selection is None:
        return None, None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return selection, lambda rows: to_tokens(text, rows)


def sparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, indices=None, s_aux=None,
                     **kwargs):
    """query [B, Hq, S, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv]; the selection as the family row names it
    (`indices` [B, S, k], ids of keys, -1 padded; MiniMax-M3's `block_indices` [B, Hkv, S, blocks], key blocks per
    KV head) or None; returns ([B, S, Hq, Dv], None) like the library's eager attention. `s_aux` is a per-head
    sink logit that takes part in the softmax and attends to nothing."""
    if dropout and module.training:
        raise ValueError(f"{SPARSE} attention has no dropout")
    batch, heads, seq, dim = query.shape
    kv_heads, kv_length, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    size = query.element_size()
    selection, token_ids = _selection(module, indices, kwargs)
    if selection is not None:
        sel_heads, k = token_ids(selection[..., :1, :]).shape[1::2]
        if sel_heads not in (1, kv_heads):
            raise ValueError(f"{SPARSE} attention takes one selection for all heads or one per KV head, "
                             f"not {sel_heads} for {kv_heads} KV heads")
        per_row = batch * (kv_heads * k * (dim + v_dim) * size + heads * k * 4 * 3 + 8 * 3 * sel_heads * k) + kv_length * 5
    else:
        per_row = batch * heads * kv_length * 4 * 3 + kv_length * 5
    extra = None if module is None else module.__dict__.pop(_APPENDED, None)
    if extra is not None:  # keys the layer appends itself: k selected, or all of them causally
        per_row += batch * (kv_heads * (extra.ids.shape[-1] if extra.ids is not None else extra.keys.shape[2])
                            * (dim + v_dim + 8) * size + heads * 4 * 3 * extra.keys.shape[2])
    rows = _chunk_rows(per_row, query.device)
    sink = None if s_aux is None else s_aux.float().view(1, kv_heads, group, 1, 1)
    # Written into in place, one chunk of rows at a time: chunk outputs kept in a list for a final concatenation
    # would sit between each chunk's freed temporaries and keep the C allocator from reusing or returning them
    # (the heap grew by 2 GiB over one 8K-token layer so).
    output = query.new_empty((batch, seq, heads, v_dim))
    for q0 in range(0, seq, rows):
        q1 = min(q0 + rows, seq)
        c = q1 - q0
        masked = None if attention_mask is None else mask_rows(attention_mask, q0, q1, 2)
        bias = _bias(masked, q0, q1, seq, kv_length, query.device)[:, 0]  # [B or 1, c, T]
        q = query[:, :, q0:q1].reshape(batch, kv_heads, group, c, dim)
        if selection is None:  # every key, as the mask allows
            logits = torch.einsum("bhgcd,bhtd->bhgct", q, key).float().mul_(scaling).add_(bias[:, None, None])
            values, pattern = value, "bhgct,bhtv->bhgcv"
        else:  # each query's selected keys, per KV head or one set for all: [B, Hkv or 1, c, k]
            ids = token_ids(selection[..., q0:q1, :]).to(device=query.device, dtype=torch.long)
            valid = (ids >= 0) & (ids < kv_length)
            ids = ids.clamp(0, kv_length - 1)
            picked = bias[:, None].expand(batch, sel_heads, c, kv_length).gather(-1, ids).masked_fill(~valid, float("-inf"))
            flat = ids.reshape(batch, sel_heads, c * k, 1)
            keys = key.gather(2, flat.expand(batch, kv_heads, c * k, dim)).view(batch, kv_heads, c, k, dim)
            values = value.gather(2, flat.expand(batch, kv_heads, c * k, v_dim)).view(batch, kv_heads, c, k, v_dim)
            logits = torch.einsum("bhgcd,bhckd->bhgck", q, keys).float().mul_(scaling).add_(picked[:, :, None])
            pattern = "bhgck,bhckv->bhgcv"
        width = logits.shape[-1]
        if extra is not None:
            extra_logits, extra_values, extra_pattern = _appended(extra, q, q0, q1, kv_heads, scaling)
            logits = torch.cat([logits, extra_logits], dim=-1)
        if sink is not None:
            logits = torch.cat([logits, sink.expand(*logits.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum(pattern, probs[..., :width].to(value.dtype), values)
        if extra is not None:
            end = probs.shape[-1] - (sink is not None)
            out = out + torch.einsum(extra_pattern, probs[..., width:end].to(value.dtype), extra_values)
        output[:, q0:q1] = out.reshape(batch, heads, c, v_dim).transpose(1, 2)
    return output, None


def _appended(extra, q, q0: int, q1: int, kv_heads: int, scaling: float):
    """Logits [B, Hkv, G, c, n] of query rows q0..q1 over the appended keys they may see, with the values and the
    einsum that weighs them: the k selected by `extra.ids` (-1: none), or every entry below `extra.limit`."""
    batch, c = q.shape[0], q1 - q0
    keys, values = extra.keys.to(q.device), extra.values.to(q.device)
    entries, dim, v_dim = keys.shape[2], keys.shape[-1], values.shape[-1]
    keys = keys.expand(batch, kv_heads, entries, dim)
    values = values.expand(batch, kv_heads, entries, v_dim)
    if extra.ids is None:
        seen = torch.arange(entries, device=q.device).view(1, 1, -1) < extra.limit[:, q0:q1, None].to(q.device)
        bias = torch.zeros(seen.shape, dtype=torch.float32, device=q.device).masked_fill_(~seen, float("-inf"))
        logits = torch.einsum("bhgcd,bhtd->bhgct", q, keys).float() * scaling + bias[:, None, None]
        return logits, values, "bhgct,bhtv->bhgcv"
    ids = extra.ids[:, q0:q1].to(device=q.device, dtype=torch.long)
    k = ids.shape[-1]
    valid = (ids >= 0) & (ids < entries)
    flat = ids.clamp(0, max(entries - 1, 0)).reshape(batch, 1, c * k, 1)
    picked = keys.gather(2, flat.expand(batch, kv_heads, c * k, dim)).view(batch, kv_heads, c, k, dim)
    picked_values = values.gather(2, flat.expand(batch, kv_heads, c * k, v_dim)).view(batch, kv_heads, c, k, v_dim)
    logits = torch.einsum("bhgcd,bhckd->bhgck", q, picked).float() * scaling
    logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    return logits, picked_values, "bhgck,bhckv->bhgcv"


_APPENDED = "_indexcache_appended"


def set_appended(attention_module, appended) -> None:
    """Hand the next `sparse_attention` call of `attention_module` the keys its layer appends itself, with their
    selection in compact form (`compressed.Appended`); the kernel takes them once."""
    attention_module.__dict__[_APPENDED] = appended


AttentionInterface.register(SPARSE, sparse_attention)
AttentionMaskInterface.register(SPARSE, _sparse_mask)


def current(model) -> str:
    return model.config.get_text_config()._attn_implementation or model.config._attn_implementation


def set_attention(model, path: str) -> str:
    """Run the model's attention on the sparse path (`"sparse"`) or on the implementation it was loaded
    with (`"dense"`); returns the implementation that was there. The loaded one is remembered on the model."""
    previous = current(model)
    dense = model.__dict__.setdefault("_indexcache_dense", previous if previous != SPARSE else "sdpa")
    _switch(model, SPARSE if path == "sparse" else dense)
    return previous


def _switch(model, target: str) -> None:
    if target != current(model):
        model.set_attn_implementation(target)
    _stand_ins(model, target == SPARSE)


def _stand_ins(model, on: bool) -> None:
    """Put the family's `sparse_module` stand-ins in place (`on`) or the library's modules back."""
    family = lookup(model.config)
    if family is None or family.sparse_module is None:
        return
    path, make = family.sparse_module
    for layer in getattr(model.get_decoder(), "layers", []):
        attention = getattr(layer, family.attention_at, None)
        parent, attr = resolve_attr(attention, path) if attention is not None else (None, path)
        module = getattr(parent, attr, None) if parent is not None else None
        if module is None:
            continue
        replaced = module.__dict__.get("replaced")
        if on and replaced is None:
            setattr(parent, attr, make(module, attention))
        elif not on and replaced is not None:
            setattr(parent, attr, replaced)


@contextlib.contextmanager
def attention_path(model, path: str):
    previous = set_attention(model, path)
    try:
        yield
    finally:
        _switch(model, previous)

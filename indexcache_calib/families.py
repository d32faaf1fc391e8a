"""What differs between lightning-indexer families, in one place: one adapter per family, read as a table.

An adapter says where the family's indexer sits in a decoder layer, which of its arguments run on query
chunks, what it returns and how overlap is measured on that, which decoder layers are pattern positions
(have an indexer by architecture), which patterns the library can run, the config key transformers
shares natively from (and whether `from_pretrained` takes it as a keyword), what the model's forward threads
from layer to layer besides the hidden state, the config keys of its indexer heads and hyper-connection
streams, why `distill` cannot train it where that is so, how the sparse kernel reads the selection its
attention passes, and, where its library has no plug for the sparse path, the one module a stand-in replaces
there and the stand-in cache its chunked indexer reads keys from.
Everything else in the package works from these adapters; nothing else asks for a model_type or reads a
family-specific config key. Each family's tiny test checkpoint is built by `testing.TINY[family.name]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from indexcache_calib.errors import CalibError
from indexcache_calib.pattern import FULL, SHARED  # noqa: F401 (re-exported: sharing and tests read it here)


# -- what an indexer selects, and how much of its own choice a reused selection keeps ----------------


def index_overlap(own: torch.Tensor, reused: torch.Tensor, first_row: int, limit, chunk: int = 256) -> tuple[float, float]:
    """(hits, total) for |own ∩ reused| / |own| over query rows `first_row` on, for selections of ids
    shaped [..., S, k] (the query axis second to last). An id is valid below `limit(q)` (exclusive, never
    decreasing in q) and at or above 0: padding (-1) and ids past what row q can see never count. Rows
    before `first_row` select everything they can see whatever the indexer, so they say nothing."""
    seq = own.shape[-2]
    hits = total = 0.0
    for q0 in range(first_row, seq, chunk):
        q1 = min(q0 + chunk, seq)
        rows = torch.arange(q0, q1, device=own.device)
        lim = limit(rows).view(*([1] * (own.dim() - 2)), -1, 1)
        width = int(limit(rows[-1:]).item())
        o = own[..., q0:q1, :].long()
        r = reused[..., q0:q1, :].to(own.device).long()
        o_ok = (o >= 0) & (o < lim)
        # Invalid ids go to a spare column `width` that is cleared before reading, so they never count.
        chosen = torch.zeros(*o.shape[:-1], width + 1, dtype=torch.bool, device=own.device)
        chosen.scatter_(-1, torch.where(o_ok, o, width), True)
        kept = torch.zeros_like(chosen)
        kept.scatter_(-1, torch.where((r >= 0) & (r < lim), r, width), True)
        chosen[..., width] = False
        hits += (chosen & kept).sum().item()
        total += o_ok.sum().item()
    return hits, total


def token_overlap(own: torch.Tensor, reused: torch.Tensor, index_topk: int) -> tuple[float, float]:
    """Token positions [B, S, k]: rows that see more than `index_topk` keys; ids up to the row's own."""
    return index_overlap(own, reused, index_topk, lambda q: q + 1)


def mask_overlap(own: torch.Tensor, reused: torch.Tensor, first_row: int) -> tuple[float, float]:
    """Boolean selections [B, 1, S, T]: the share of each row's own selection the reused one keeps."""
    own, reused = own[..., first_row:, :], reused[..., first_row:, :].to(own.device)
    return float((own & reused).sum().item()), float(own.sum().item())


@dataclass(frozen=True)
class Selection:
    """What an indexer returns, and how overlap is measured on it for a given text config."""

    kind: str  # what one entry means, for messages and the layer map
    overlap: Callable  # text config -> (own, reused) -> (hits, total)


TOKENS = Selection("token positions [batch, seq, k]", lambda t: lambda o, r: token_overlap(o, r, int(t.index_topk)))
PADDED_TOKENS = Selection("token positions [batch, seq, k + pool - 1], -1 padded",
                          lambda t: lambda o, r: token_overlap(o, r, int(t.index_topk)))


def _csa_rate(text) -> int:
    return int(text.compress_rates["compressed_sparse_attention"])


COMPRESSED = Selection(
    "compressed KV entries [batch, seq, k], -1 where not yet visible",
    lambda t: lambda o, r: index_overlap(o, r, (int(t.index_topk) + 1) * _csa_rate(t) - 1, lambda q: (q + 1) // _csa_rate(t)),
)
BLOCKS = Selection(
    "key blocks per index head [batch, heads, seq, k], -1 padded",
    lambda t: lambda o, r: index_overlap(o, r, int(t.index_topk_blocks) * int(t.index_block_size),
                                         lambda q: q // int(t.index_block_size) + 1),
)
MASK = Selection(
    "boolean token mask [batch, 1, seq, keys]",
    lambda t: lambda o, r: mask_overlap(o, r, int(t.indexer_budget) + int(t.indexer_compress_ratio) - 1),
)


# -- which layers are pattern positions, and which patterns a library can run ------------------------


def layers_of_type(kind: str) -> Callable:
    """Positions are the decoder layers whose `layer_types` entry is `kind` (every layer if the config
    has no `layer_types`)."""

    def positions(text_config) -> list[int]:
        n = text_config.num_hidden_layers
        types = getattr(text_config, "layer_types", None)
        if not types:
            return list(range(n))
        return [i for i, t in enumerate(types[:n]) if t == kind]

    return positions


def any_pattern(pattern: str, positions: list[int]) -> str | None:
    return None


def shared_follows_full_layer(pattern: str, positions: list[int]) -> str | None:
    """A full layer hands its top-k only to the decoder layer right after it: every S must sit directly
    after an F, with no other layer (a linear-attention layer, or another S) in between."""
    for p, c in enumerate(pattern):
        if c != SHARED or p == 0:
            continue
        if pattern[p - 1] != FULL:
            return f"layer {positions[p]} is S after S (layer {positions[p - 1]}): the library hands top-k only to the next layer"
        if positions[p - 1] != positions[p] - 1:
            return (f"layer {positions[p]} is S but layer {positions[p] - 1} before it has no indexer: "
                    "the library hands a full layer's top-k only to the layer right after it")
    return None


def min_full_shared_follows_full(positions: list[int], fixed_shared: frozenset[int]) -> int:
    """The fewest F a pattern can keep under `shared_follows_full_layer`: in each run of adjacent
    indexed layers, S and F must alternate from an F at the run's start."""
    need, p = 0, 0
    while p < len(positions):
        q = p
        while q + 1 < len(positions) and positions[q + 1] == positions[q] + 1:
            q += 1
        need += (q - p + 2) // 2
        p = q + 1
    return need


# -- the table -----------------------------------------------------------------------------------------

# Indexer arguments that run on query chunks, with the axis their queries are on. Keys are computed once
# for the whole sequence (through the cache hook) and every chunk scores against all of them.
GLM_CHUNKS = {"hidden_states": 1, "q_resid": 1, "position_embeddings": 1, "attention_mask": 1, "position_ids": -1}
NO_Q_RESID_CHUNKS = {"hidden_states": 1, "position_embeddings": 1, "attention_mask": 1, "position_ids": -1}
# DeepSeek-V4's indexer takes no mask: it masks entries past each query's own position itself.
V4_CHUNKS = {"hidden_states": 1, "q_residual": 1, "position_ids": -1}
# MiniMax-M3's indexer takes no mask either: it masks keys past each query's position (`position_ids`) itself.
M3_CHUNKS = {"hidden_states": 1, "position_embeddings": 1, "position_ids": -1}

# How the registered kernel reads the selection a family's attention passes it: (the keyword, a function of the
# text config and rows of the selection [..., c, k] (query axis second to last) -> the token ids [B, KV heads or 1,
# c, k'] they select, -1 for none).
TOKEN_IDS = ("indices", lambda text, ids: ids.unsqueeze(1))  # token ids [B, S, k], one set for every head


def _m3_block_tokens(text, blocks):
    from indexcache_calib.blocks import block_tokens  # deferred: blocks imports sharing, which imports this

    return block_tokens(int(text.index_block_size), blocks)


def _m3_index_keys(indexer):
    from indexcache_calib.blocks import index_keys  # deferred, as above

    return index_keys(indexer)


def _v4_compressed_keys(indexer):
    from indexcache_calib.compressed import compressed_keys  # deferred: imports the library's modeling file

    return compressed_keys(indexer)


def _v4_compact_compressor(original, attention):
    from indexcache_calib.compressed import compact_compressor  # deferred: imports the library's modeling file

    return compact_compressor(original, attention)


def _index_topk(text) -> int:
    return int(text.index_topk)


def _qsa_configured(text) -> str | None:
    missing = [k for k in ("indexer_n_heads", "indexer_budget", "indexer_compress_ratio") if getattr(text, k, None) is None]
    if missing:
        return (f"its QSA indexer is off ({', '.join(missing)} unset in the config), so its indexed_attention layers select "
                "no tokens and there is nothing to share")
    return None


@dataclass(frozen=True)
class Family:
    name: str  # the model_type of the checkpoint's top-level config
    model_types: tuple[str, ...]  # every model_type that loads as this family (a composite's text config too)
    indexer_at: str  # attribute path from a decoder layer to its indexer
    positions: Callable  # text config -> decoder layers with an indexer by architecture
    selection: Selection = TOKENS
    budget: Callable = _index_topk  # text config -> entries each query selects (recorded as index_topk)
    floor: Callable = _index_topk  # text config -> tokens at or below which every query selects every key
    native_key: str | None = None  # config key transformers builds shared layers from; None: no native sharing
    library_runs: Callable = any_pattern  # pattern, positions -> why the library cannot run it, or None
    min_full: Callable | None = None  # positions, fixed -> fewest F `library_runs` allows (None: 1)
    chunks: dict = field(default_factory=dict)  # empty: the indexer runs in one call only
    carried: tuple[str, ...] = ()  # layer kwargs the layers write into for later layers
    engines: tuple[str, ...] = ()  # serving engines that read a pattern for this family
    engine_pattern: str = "layers"  # "layers": one character per decoder layer; "positions": per indexer layer
    usable: Callable = lambda text: None  # text config -> why a checkpoint of this family cannot be calibrated
    budget_words: Callable = lambda t: f"index_topk {t.index_topk}"  # the budget, as the config names it
    note: str = ""
    # None: its attention passes the selection as `indices=` to a registered implementation, so the sparse
    # path (`attention.py`) runs it; else why it cannot, and the family stays on the dense path.
    dense_only: str | None = None
    # Where the library has no plug for the sparse path: (attribute path from a decoder layer's attention module,
    # factory(original, attention module) -> its stand-in). The stand-in is put in place while the sparse path is
    # on (`attention.set_attention`) and hands the kernel the selection in compact form; None: nothing to replace.
    sparse_module: tuple[str, Callable] | None = None
    # indexer -> the stand-in cache its chunked calls read keys from (`sharing.run_indexer`); None: the library's
    # `update_indexer` protocol (`sharing._KeySource`).
    key_source: Callable | None = None
    # The keyword its attention passes the selection under to a registered implementation, and how rows of it
    # become token ids (see TOKEN_IDS); read by the sparse kernel (`attention.sparse_attention`).
    kernel_selection: tuple[str, Callable] = TOKEN_IDS
    # True: `from_pretrained(..., native_key=...)` reaches the key (it lives in the top-level config of the
    # family's checkpoints). False: composite checkpoints keep it in their text config, which a keyword does not
    # reach, so the config is loaded, set and passed.
    native_keyword: bool = False
    # Why `distill` cannot train this family although its library shares natively; None: it can (where
    # `native_key` is set: distill writes the pattern there and lets the library build the Shared layers).
    distill_refusal: str | None = None
    heads_key: str = "index_n_heads"  # text config key: the indexer's heads
    streams_key: str | None = None  # text config key: hidden-state copies between layers (hyper-connections); None: one

    def index_heads(self, text_config) -> int:
        """The indexer's heads (1 where the config leaves them unset)."""
        return int(getattr(text_config, self.heads_key, None) or 1)

    def streams(self, text_config) -> int:
        """How many copies of the hidden state the model carries between layers (hyper-connections)."""
        return int((getattr(text_config, self.streams_key, None) if self.streams_key else None) or 1)

    @property
    def attention_at(self) -> str:
        """Attribute path from a decoder layer to its attention module (whose probabilities indexer training
        distils): the first step of `indexer_at` in every family."""
        return self.indexer_at.split(".")[0]

    @property
    def distillable(self) -> bool:
        """`distill` trains this family: its library builds Shared layers from `native_key`, and nothing else stops it."""
        return self.native_key is not None and self.distill_refusal is None

    def seq_len_floor(self, text_config) -> int:
        """Calibration sequences must be longer than this (in tokens) for sharing to change anything."""
        return int(self.floor(text_config))

    def runs(self, pattern: str, positions: list[int]) -> str | None:
        return self.library_runs(pattern, positions)

    def fewest_full(self, positions: list[int], fixed_shared: frozenset[int]) -> int:
        return self.min_full(positions, fixed_shared) if self.min_full else 1


FAMILIES = (
    Family("glm_moe_dsa", ("glm_moe_dsa",), "self_attn.indexer", layers_of_type("indexed_attention"),
           native_key="indexer_types", native_keyword=True, chunks=GLM_CHUNKS,
           engines=("vllm", "sglang", "transformers", "trtllm")),
    Family("deepseek_v32", ("deepseek_v32",), "self_attn.indexer", layers_of_type("indexed_attention"),
           chunks=GLM_CHUNKS, engines=("vllm", "sglang", "trtllm")),
    Family("axk2", ("axk2",), "self_attn.indexer", layers_of_type("indexed_attention"), chunks=GLM_CHUNKS),
    Family("hy_v4", ("hy_v4",), "self_attn.indexer", layers_of_type("indexed_attention"),
           native_key="indexer_types", native_keyword=True, chunks=GLM_CHUNKS, engines=("vllm", "transformers"),
           streams_key="hc_mult"),
    Family("dots3_note", ("dots3_note", "dots3_note_text"), "self_attn.indexer", layers_of_type("indexed_attention"),
           chunks=GLM_CHUNKS, note="sliding-window layers have no indexer and are not pattern positions"),
    Family("mistral_large4", ("mistral_large4", "mistral_large4_text"), "self_attn.indexer",
           layers_of_type("indexed_attention"), native_key="indexer_types", chunks=NO_Q_RESID_CHUNKS,
           carried=("shared_kv_states",), engines=("transformers",)),
    Family("glm5_next", ("glm5_next", "glm5_next_text"), "self_attn.indexer", layers_of_type("indexed_attention"),
           selection=PADDED_TOKENS, native_key="indexer_types", library_runs=shared_follows_full_layer,
           min_full=min_full_shared_follows_full, engines=("transformers",), streams_key="hc_mult",
           distill_refusal="glm5_next's indexer scores pools of index_kpool keys (and appends a tail pool), not single "
                           "keys, so the per-key attention distribution is not what its scores model; and transformers "
                           "hands a Full layer's top-k only to the very next layer, so a pattern with two Shared layers "
                           "in a row cannot run natively",
           dense_only="its attention turns the top-k into a dense [seq, keys] mask on every implementation "
                      "(build_attention_mask_from_topk) and passes no indices",
           note="linear-attention layers have no indexer; the library hands top-k only to the next layer"),
    # Selects compressed KV entries (one per `rate` tokens); only compressed-sparse layers have an indexer,
    # all at the same rate. vLLM's pattern covers exactly those layers, in order. Its compressors build a
    # [seq, compressed keys] bias on every implementation: on the sparse path `compressed.CompactCompressor`
    # stands in for them and hands the kernel the ids (compressed-sparse) or the causal count (heavily
    # compressed) instead.
    Family("deepseek_v4", ("deepseek_v4",), "self_attn.compressor.indexer", layers_of_type("compressed_sparse_attention"),
           selection=COMPRESSED, floor=lambda t: int(t.index_topk) * _csa_rate(t), engines=("vllm",),
           engine_pattern="positions", streams_key="hc_mult", chunks=V4_CHUNKS, key_source=_v4_compressed_keys,
           sparse_module=("compressor", _v4_compact_compressor),
           budget_words=lambda t: f"index_topk {t.index_topk} compressed entries of {_csa_rate(t)} tokens each",
           note="only compressed-sparse layers have an indexer (heavily-compressed and sliding layers have none)"),
    # Selects key blocks per index head (one per KV head), local blocks included; its attention passes them as
    # `block_indices=` with the plain causal mask to a registered implementation, and the kernel gathers each KV
    # head's blocks (`blocks.block_tokens`). Its indexer scores query chunks against keys from `blocks.IndexKeys`.
    Family("minimax_m3_vl", ("minimax_m3_vl", "minimax_m3_vl_text"), "self_attn.indexer", layers_of_type("minimax_m3_sparse"),
           selection=BLOCKS, budget=lambda t: int(t.index_topk_blocks),
           floor=lambda t: int(t.index_topk_blocks) * int(t.index_block_size),
           budget_words=lambda t: f"index_topk_blocks {t.index_topk_blocks} of index_block_size {t.index_block_size} tokens",
           chunks=M3_CHUNKS, key_source=_m3_index_keys, kernel_selection=("block_indices", _m3_block_tokens),
           note="only minimax_m3_sparse layers have an indexer; it selects key blocks per index head"),
    Family("qwen4_exp", ("qwen4_exp", "qwen4_exp_text"), "self_attn.indexer", layers_of_type("indexed_attention"),
           selection=MASK, budget=lambda t: int(t.indexer_budget),
           floor=lambda t: int(t.indexer_budget) + int(t.indexer_compress_ratio) - 1, usable=_qsa_configured,
           heads_key="indexer_n_heads", streams_key="hc_count",
           dense_only="its indexer itself returns a boolean [seq, keys] mask",
           budget_words=lambda t: f"indexer_budget {t.indexer_budget} plus up to {int(t.indexer_compress_ratio) - 1} recent tokens",
           note="only indexed_attention layers have an indexer (linear-attention layers have none); it selects a token mask"),
)

BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
PLAIN_MLA_TYPES = {"glm4_moe_lite", "deepseek_v3", "deepseek_v2"}


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def lookup(config) -> Family | None:
    """The adapter for a config; None where it has none (a model without an indexer, or an unknown family)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None)) or BY_MODEL_TYPE.get(getattr(text, "model_type", None))


def family_of(config, name: str = "model") -> Family:
    """The adapter for a config, or a refusal that says why."""
    model_type = getattr(config, "model_type", None) or "?"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = lookup(config)
    if family is not None:
        return family
    if model_type == "glm4_moe_lite":
        raise CalibError(
            f"{name} is not a DSA model: model_type glm4_moe_lite (the published GLM-4.7-Flash) is plain MLA "
            "attention with no lightning indexer, so there are no top-k indices to share",
            hint=f"make it a DSA model first: indexcache dsa-convert --model {name} --data YOUR.jsonl --out DIR; "
                 "then indexcache calibrate --model DIR",
        )
    if getattr(text, "index_topk", None) is None:
        why = " (plain MLA attention)" if model_type in PLAIN_MLA_TYPES else ""
        raise CalibError(
            f"{name} is not a DSA model: model_type {model_type}{why} has no lightning indexer (no index_topk in its config)",
            hint="IndexCache applies to DSA models such as GLM-5 (glm_moe_dsa) and DeepSeek-V3.2 (deepseek_v32)",
        )
    raise CalibError(
        f"{name}: model_type {model_type} has a lightning indexer, but indexcache has no adapter for it, so it could "
        "not tell whether its numbers match the model's own",
        hint=f"supported families: {supported()}",
    )


def resolve_attr(root, path: str):
    """(parent, attribute name) of a dotted path below `root`; parent is None where a step is missing."""
    *steps, last = path.split(".")
    parent = root
    for step in steps:
        parent = getattr(parent, step, None)
        if parent is None:
            return None, last
    return parent, last

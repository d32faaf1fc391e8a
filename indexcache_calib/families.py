"""What differs between lightning-indexer families, in one place: one adapter per family, read as a table.

An adapter says where the family's indexer sits in a decoder layer, which of its arguments run on query
chunks, what it returns and how overlap is measured on that, which decoder layers are pattern positions
(have an indexer by architecture), which patterns the library can run, the config key transformers
shares natively from, and what the model's forward threads from layer to layer besides the hidden state.
Everything else in the package works from these adapters; nothing else asks for a model_type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from indexcache_calib.errors import CalibError

FULL, SHARED = "F", "S"


# -- what an indexer selects, and how much of its own choice a reused selection keeps ----------------


def token_overlap(own: torch.Tensor, reused: torch.Tensor, index_topk: int, chunk: int = 1024) -> tuple[float, float]:
    """(hits, total) for |T_own ∩ T_reused| / |T_own| over query positions that see more than
    `index_topk` keys. Earlier positions select every visible key whatever the indexer, so they say
    nothing. Indices past the query position (padding of early rows) and -1 padding never count."""
    batch, seq, _ = own.shape
    hits = total = 0.0
    for q0 in range(index_topk, seq, chunk):
        q1 = min(q0 + chunk, seq)
        pos = torch.arange(q0, q1, device=own.device).view(1, -1, 1)
        o = own[:, q0:q1].long()
        r = reused[:, q0:q1].to(own.device).long()
        o_ok = (o >= 0) & (o <= pos)
        # Invalid indices go to a spare column `q1` that is cleared before reading, so they never count.
        o = torch.where(o_ok, o, q1)
        r = torch.where((r >= 0) & (r <= pos), r, q1)
        chosen = torch.zeros(batch, q1 - q0, q1 + 1, dtype=torch.bool, device=own.device)
        chosen.scatter_(-1, o, True)
        chosen[..., q1] = False
        reused_hit = torch.zeros_like(chosen)
        reused_hit.scatter_(-1, r, True)
        reused_hit[..., q1] = False
        hits += (chosen & reused_hit).sum().item()
        total += o_ok.sum().item()
    return hits, total


@dataclass(frozen=True)
class Selection:
    """What an indexer returns and how a reused selection is compared with the layer's own."""

    kind: str  # what one entry means, for messages and the layer map
    overlap: Callable[[torch.Tensor, torch.Tensor, int], tuple[float, float]]


TOKENS = Selection("token positions [batch, seq, k]", token_overlap)
PADDED_TOKENS = Selection("token positions [batch, seq, k + pool - 1], -1 padded", token_overlap)


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


@dataclass(frozen=True)
class Family:
    name: str  # the model_type of the checkpoint's top-level config
    model_types: tuple[str, ...]  # every model_type that loads as this family (a composite's text config too)
    indexer_at: str  # attribute path from a decoder layer to its indexer
    positions: Callable  # text config -> decoder layers with an indexer by architecture
    selection: Selection = TOKENS
    native_key: str | None = None  # config key transformers builds shared layers from; None: no native sharing
    library_runs: Callable = any_pattern  # pattern, positions -> why the library cannot run it, or None
    min_full: Callable | None = None  # positions, fixed -> fewest F `library_runs` allows (None: 1)
    chunks: dict = field(default_factory=dict)  # empty: the indexer runs in one call only
    carried: tuple[str, ...] = ()  # layer kwargs the layers write into for later layers
    engines: tuple[str, ...] = ()  # serving engines that read a pattern for this family
    note: str = ""

    def seq_len_floor(self, text_config) -> int:
        """Calibration sequences must be longer than this for sharing to change anything."""
        return int(text_config.index_topk)

    def runs(self, pattern: str, positions: list[int]) -> str | None:
        return self.library_runs(pattern, positions)

    def fewest_full(self, positions: list[int], fixed_shared: frozenset[int]) -> int:
        return self.min_full(positions, fixed_shared) if self.min_full else 1


FAMILIES = (
    Family("glm_moe_dsa", ("glm_moe_dsa",), "self_attn.indexer", layers_of_type("indexed_attention"),
           native_key="indexer_types", chunks=GLM_CHUNKS, engines=("vllm", "sglang", "transformers", "trtllm")),
    Family("deepseek_v32", ("deepseek_v32",), "self_attn.indexer", layers_of_type("indexed_attention"),
           chunks=GLM_CHUNKS, engines=("vllm", "sglang", "trtllm")),
    Family("axk2", ("axk2",), "self_attn.indexer", layers_of_type("indexed_attention"), chunks=GLM_CHUNKS),
    Family("hy_v4", ("hy_v4",), "self_attn.indexer", layers_of_type("indexed_attention"),
           native_key="indexer_types", chunks=GLM_CHUNKS, engines=("vllm", "transformers")),
    Family("dots3_note", ("dots3_note", "dots3_note_text"), "self_attn.indexer", layers_of_type("indexed_attention"),
           chunks=GLM_CHUNKS, note="sliding-window layers have no indexer and are not pattern positions"),
    Family("mistral_large4", ("mistral_large4", "mistral_large4_text"), "self_attn.indexer",
           layers_of_type("indexed_attention"), native_key="indexer_types", chunks=NO_Q_RESID_CHUNKS,
           carried=("shared_kv_states",), engines=("transformers",)),
    Family("glm5_next", ("glm5_next", "glm5_next_text"), "self_attn.indexer", layers_of_type("indexed_attention"),
           selection=PADDED_TOKENS, native_key="indexer_types", library_runs=shared_follows_full_layer,
           min_full=min_full_shared_follows_full, engines=("transformers",),
           note="linear-attention layers have no indexer; the library hands top-k only to the next layer"),
)

BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
PLAIN_MLA_TYPES = {"glm4_moe_lite", "deepseek_v3", "deepseek_v2"}


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(config, name: str = "model") -> Family:
    """The adapter for a config, or a refusal that says why."""
    model_type = getattr(config, "model_type", None) or "?"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = BY_MODEL_TYPE.get(model_type) or BY_MODEL_TYPE.get(getattr(text, "model_type", None))
    if family is not None:
        return family
    if model_type == "glm4_moe_lite":
        raise CalibError(
            f"{name} is not a DSA model: model_type glm4_moe_lite (the published GLM-4.7-Flash) is plain MLA "
            "attention with no lightning indexer, so there are no top-k indices to share",
            hint="IndexCache applies to DSA models such as GLM-5 (glm_moe_dsa) and DeepSeek-V3.2 (deepseek_v32)",
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


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve_attr(root, path: str):
    """(parent, attribute name) of a dotted path below `root`; parent is None where a step is missing."""
    *steps, last = path.split(".")
    parent = root
    for step in steps:
        parent = getattr(parent, step, None)
        if parent is None:
            return None, last
    return parent, last

"""Scores patterns on fixed calibration tokens by running the model's own decoder layers one by one.

Running layer by layer (rather than `model(...)`) is what lets a candidate that flips layer l start
from the cached input of layer l: every layer before l sees exactly what the committed pattern saw.
The embedding, rotary tables and attention mask come from the model's own forward, captured at the
input of layer 0, so nothing of the model is re-implemented here.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from indexcache_calib.pattern import FULL, source_layers
from indexcache_calib.search import Score
from indexcache_calib.sharing import SharingState, install_sharing

CACHE_DEVICES = ("cpu", "gpu", "disk", "none")


class _Stop(Exception):
    pass


@dataclass
class Counters:
    layer_forwards: int = 0  # decoder-layer forward passes, counted per sequence
    tokens: int = 0  # tokens through decoder layers (layer_forwards x seq_len)
    patterns_scored: int = 0
    seconds: float = 0.0
    peak_cache_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Store:
    """Prefix cache: tensors keyed by (kind, layer, batch), on cpu, on the layer's device, or on disk."""

    def __init__(self, where: str):
        self.where = where
        self.items: dict = {}
        self.bytes = 0
        self._dir = tempfile.TemporaryDirectory(prefix="indexcache-cache-") if where == "disk" else None
        self._adopted: list = []

    def put(self, key, tensor: torch.Tensor) -> None:
        self.drop(key)
        size = tensor.numel() * tensor.element_size()
        if self.where == "cpu":
            value = (tensor.to("cpu", copy=True), tensor.device)
        elif self.where == "disk":
            path = Path(self._dir.name) / ("_".join(map(str, key)) + ".safetensors")
            save_file({"t": tensor.detach().cpu().contiguous()}, str(path))
            value = (path, tensor.device)
        else:
            value = (tensor.clone(), tensor.device)
        self.items[key] = (value, size)
        self.bytes += size

    def get(self, key) -> torch.Tensor:
        (obj, device), _ = self.items[key]
        if self.where == "disk":
            return load_file(str(obj))["t"].to(device)
        return obj.to(device)

    def drop(self, key) -> None:
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]

    def adopt(self, other: "_Store") -> None:
        """Take over every entry of `other` (its temp directory stays alive with this store)."""
        for key in list(other.items):
            self.drop(key)
        self.items.update(other.items)
        self.bytes += other.bytes
        if other._dir is not None:
            self._adopted.append(other._dir)
        other.items, other.bytes, other._dir = {}, 0, None

    def close(self) -> None:
        self.items.clear()
        self.bytes = 0
        for d in self._adopted + ([self._dir] if self._dir is not None else []):
            d.cleanup()
        self._adopted, self._dir = [], None


@dataclass
class _Candidate:
    rank: tuple
    pattern: str
    score: Score
    store: _Store
    overlap: tuple


class PatternRunner:
    """An `Evaluator` for the search: `score(pattern)` and `set_base(pattern)`."""

    def __init__(
        self,
        model,
        layout,
        tokens: torch.Tensor,
        batch_size: int = 1,
        measure_overlap: bool = True,
        indexer_chunk: int | None = None,
        cache_device: str = "cpu",
        logits_chunk: int = 1024,
    ):
        self.model, self.layout, self.tokens = model, layout, tokens
        self.batch_size = max(1, batch_size)
        self.logits_chunk = logits_chunk
        self.state = SharingState("F" * layout.num_layers, layout.index_topk, measure_overlap, indexer_chunk)
        self.counters = Counters()
        self.cache_device = cache_device
        self.store = _Store(cache_device) if cache_device != "none" else None
        self.base: str | None = None
        self.base_score: Score | None = None
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self._base_model, self._norm, self._head = base, base.norm, model.get_output_embeddings()
        self._takes_prev = [
            "prev_topk_indices" in inspect.signature(type(layer).forward).parameters for layer in layout.layers
        ]
        self._base_overlap: tuple[dict, dict] = ({}, {})
        self._last_overlap: tuple[dict, dict] = ({}, {})
        self._best: _Candidate | None = None
        self._last_scored: tuple | None = None  # without a cache: the step's best candidate
        self._kwargs: dict = {}  # per batch: the mask and rotary tables captured at layer 0
        self._batches = [tokens[i : i + self.batch_size] for i in range(0, len(tokens), self.batch_size)]

    # -- the pieces of one forward -------------------------------------------------------------

    def _layer0_inputs(self, ids: torch.Tensor):
        captured = {}

        def grab(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "prev_topk_indices")}
            raise _Stop

        handle = self.layout.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        device = self.model.get_input_embeddings().weight.device
        if device.type != "meta":  # offloaded embeddings: accelerate's hook moves the input itself
            ids = ids.to(device)
        try:
            self._base_model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    def _run_layers(self, hidden, kwargs, start: int, batch_no: int, into):
        for i in range(start, self.layout.num_layers):
            if into is not None:
                self._record(into, i, batch_no, hidden)
            layer = self.layout.layers[i]
            extra = {"prev_topk_indices": self.state.current} if self._takes_prev[i] else {}
            out = layer(hidden, **kwargs, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
            self.counters.layer_forwards += hidden.shape[0]
            self.counters.tokens += hidden.shape[0] * hidden.shape[1]
            if into is not None and self.state.pattern[i] == FULL and self.layout.indexers[i] is not None:
                into.put(("topk", i, batch_no), self.state.current)
        return hidden

    def _record(self, into, i: int, batch_no: int, hidden) -> None:
        # Only inputs a candidate can start from are kept: full layers other than 0.
        if i > 0 and self.state.pattern[i] == FULL and i not in self.layout.fixed_shared:
            into.put(("hidden", i, batch_no), hidden)
        held = self.store.bytes + (into.bytes if into is not self.store else 0) + (self._best.store.bytes if self._best else 0)
        self.counters.peak_cache_bytes = max(self.counters.peak_cache_bytes, held)

    def _seq_losses(self, hidden, ids) -> list[float]:
        """Summed next-token cross-entropy per sequence, with the head applied in chunks so the
        logits never exceed [batch, logits_chunk, vocab]."""
        hidden = self._norm(hidden)
        sums = torch.zeros(ids.shape[0], dtype=torch.float64)
        for p0 in range(0, ids.shape[1] - 1, self.logits_chunk):
            p1 = min(p0 + self.logits_chunk, ids.shape[1] - 1)
            logits = self._head(hidden[:, p0:p1]).float()
            labels = ids[:, p0 + 1 : p1 + 1].to(logits.device)
            ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            sums += ce.double().sum(dim=1).cpu()
        return sums.tolist()

    # -- Evaluator API ------------------------------------------------------------------------

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    @torch.no_grad()
    def _evaluate(self, pattern: str, start: int, into: "_Store | None", batches=None) -> Score:
        t0 = time.perf_counter()
        self.state.pattern = pattern
        self.state.reset_overlap()
        if start > 0:  # layers before `start` are not rerun: their overlap is the base's
            hits, total = self._base_overlap
            self.state.overlap_hits.update({i: v for i, v in hits.items() if i < start})
            self.state.overlap_total.update({i: v for i, v in total.items() if i < start})
        sources = source_layers(pattern)
        seq_sums: list[float] = []
        with install_sharing(self.layout, self.state):
            for b in range(len(self._batches)) if batches is None else batches:
                ids = self._batches[b]
                if start == 0:
                    hidden, kwargs = self._layer0_inputs(ids)
                    self.state.current = None
                else:
                    hidden = self.store.get(("hidden", start, b))
                    kwargs = self._kwargs[b]
                    self.state.current = self.store.get(("topk", sources[start - 1], b))
                if start == 0 and self.store is not None:
                    self._kwargs[b] = kwargs
                hidden = self._run_layers(hidden, kwargs, start, b, into)
                seq_sums += self._seq_losses(hidden, ids)
        self.state.current = None
        per_token = self.tokens.shape[1] - 1
        overlaps = self.state.layer_overlap()
        score = Score(
            loss=math.fsum(seq_sums) / (per_token * len(seq_sums)),
            seq_losses=[s / per_token for s in seq_sums],
            overlap=(math.fsum(overlaps.values()) / len(overlaps)) if overlaps else None,
        )
        self.last_layer_overlap = overlaps
        self._last_overlap = (dict(self.state.overlap_hits), dict(self.state.overlap_total))
        self.counters.patterns_scored += 1
        self.counters.seconds += time.perf_counter() - t0
        return score

    def _restart_layer(self, pattern: str) -> int:
        """The layer a pattern that flips one cached full layer of the base can restart from, else 0."""
        if self.store is None or self.base is None or len(self.base) != len(pattern):
            return 0
        diff = [i for i, (a, b) in enumerate(zip(self.base, pattern)) if a != b]
        if len(diff) == 1 and self.base[diff[0]] == FULL and ("hidden", diff[0], 0) in self.store.items:
            return diff[0]
        return 0

    def set_base(self, pattern: str) -> Score:
        """Score the committed pattern and cache what its candidates share with it."""
        if self.store is None:
            # The committed pattern was scored as a candidate a moment ago: no need to run it again.
            last, self._last_scored = self._last_scored, None
            if last is not None and last[0] == pattern:
                score, self.last_layer_overlap = last[1], last[2]
            else:
                score = self._evaluate(pattern, 0, None)
            self.base, self.base_score = pattern, score
            return score
        start = self._restart_layer(pattern)
        # Everything from the flipped layer on changes; the input of the flipped layer itself does not,
        # and is the starting point of the refresh.
        stale = [k for k in self.store.items if start == 0 or k[1] > start or (k[0] == "topk" and k[1] == start)]
        for key in stale:
            self.store.drop(key)
        best, self._best = self._best, None
        if start > 0 and best is not None and best.pattern == pattern:
            # The committed pattern is the step's best candidate, whose layer inputs were kept while it
            # was scored: adopt them instead of running its layers again.
            self.store.adopt(best.store)
            self.base, self.base_score, self._base_overlap = pattern, best.score, best.overlap
            hits, total = best.overlap
            self.last_layer_overlap = {i: hits[i] / total[i] for i in sorted(total) if total[i]}
        else:
            if best is not None:
                best.store.close()
            self.base, self.base_score = pattern, self._evaluate(pattern, start, self.store)
            self._base_overlap = self._last_overlap
        for key in [k for k in self.store.items if k[0] == "hidden" and k[1] == start]:
            self.store.drop(key)  # no longer a candidate
        return self.base_score

    def score(self, pattern: str, batches: list[int] | None = None) -> Score:
        """Score `pattern` on every calibration batch, or only on `batches` (indices into the batches of
        `batch_size` sequences): its `seq_losses` are then those batches' sequences, in that order."""
        if batches is not None and list(batches) != list(range(self.num_batches)):
            # A partial score is never the step's best candidate: committing needs every batch's inputs.
            return self._evaluate(pattern, self._restart_layer(pattern), None, list(batches))
        start = self._restart_layer(pattern)
        if start == 0:
            score = self._evaluate(pattern, 0, None)
            if self.store is None and (self._last_scored is None or score.loss < self._last_scored[1].loss):
                self._last_scored = (pattern, score, self.last_layer_overlap)
            return score
        # Keep the layer inputs of the best candidate so far: it is the likely next base.
        scratch = _Store(self.cache_device)
        score = self._evaluate(pattern, start, scratch)
        rank = (score.loss, start)
        if self._best is None or rank < self._best.rank:
            if self._best is not None:
                self._best.store.close()
            self._best = _Candidate(rank, pattern, score, scratch, self._last_overlap)
        else:
            scratch.close()
        return score

    def close(self) -> None:
        if self._best is not None:
            self._best.store.close()
            self._best = None
        if self.store is not None:
            self.store.close()


def cache_bytes_estimate(layout, num_samples: int, seq_len: int, hidden_size: int, dtype_bytes: int) -> int:
    """Prefix cache upper bound: one hidden input per candidate layer plus one top-k per full layer."""
    hidden = (layout.num_layers - 1) * num_samples * seq_len * hidden_size * dtype_bytes
    topk = layout.num_layers * num_samples * seq_len * layout.index_topk * 4
    return hidden + topk

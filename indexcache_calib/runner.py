"""Scores patterns on fixed calibration tokens by driving the model's own forward.

Every evaluation is `model(input_ids, logits_to_keep=...)`: each decoder layer gets the arguments the
model itself gives it (its mask type, sliding window, RoPE or none, hyper-connection streams, whatever
the loop threads between layers), and the logits come from the model's own tail (hyper-connection head,
norm, soft-capping, head). Prefix reuse (prefix_cache.py) starts a candidate at the layer it flips; this
module decides what is scored on which batches and what the cache keeps: the committed pattern's layer
inputs, the step's best candidate's (exact), and the race's candidates' and lazy base's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from indexcache_calib.attention import SPARSE, attention_path, current, lazy_masks
from indexcache_calib.errors import CalibError, is_out_of_memory
from indexcache_calib.pattern import FULL, source_layers
from indexcache_calib.prefix_cache import Driver, Store, slots
from indexcache_calib.search import Score
from indexcache_calib.sharing import install_sharing, sharing_state

CACHE_DEVICES = ("cpu", "gpu", "disk", "none")


@dataclass
class Counters:
    layer_forwards: int = 0  # decoder-layer forward passes, counted per sequence
    tokens: int = 0  # tokens through decoder layers (layer_forwards x seq_len)
    base_layer_forwards: int = 0  # of `layer_forwards`: the committed pattern's own, after the first
    patterns_scored: int = 0
    seconds: float = 0.0
    peak_cache_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Batch:
    """One batch's part of an evaluation: summed loss per sequence, and overlap counts by decoder layer of
    the layers it ran (or, for the lazy base, of every layer whose input is still the committed pattern's)."""

    sums: list[float] | None
    hits: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)

    def below(self, layer: int) -> "_Batch":
        return _Batch(None, {i: v for i, v in self.hits.items() if i < layer}, {i: v for i, v in self.total.items() if i < layer})

    def joined(self, later: "_Batch") -> "_Batch":
        return _Batch(later.sums, {**self.hits, **later.hits}, {**self.total, **later.total})


def _hit_totals(parts: list[_Batch]) -> tuple[dict, dict]:
    hits: dict = {}
    total: dict = {}
    for part in parts:
        for i, v in part.hits.items():
            hits[i] = hits.get(i, 0.0) + v
        for i, v in part.total.items():
            total[i] = total.get(i, 0.0) + v
    return hits, total


def _overlaps(parts: list[_Batch]) -> dict[int, float]:
    hits, total = _hit_totals(parts)
    return {i: hits.get(i, 0.0) / total[i] for i in sorted(total) if total[i]}


@dataclass
class _Candidate:
    """A candidate of the current step whose layer inputs are kept, so committing it runs nothing again:
    exact's best whole score so far, with `score` and `overlap` (hits and totals by layer, the base's
    layers before `start` included); or a race's candidate, batch by batch (`batches`: the `_Batch` of
    the layers it ran on each batch scored)."""

    pattern: str
    start: int
    store: Store
    score: Score | None = None
    overlap: tuple = ({}, {})
    batches: dict = field(default_factory=dict)

    @property
    def rank(self) -> tuple:
        return (self.score.loss, self.start)

    def partial_mean(self) -> float:
        sums = [x for v in self.batches.values() for x in v.sums]
        return math.fsum(sums) / len(sums) if sums else math.inf


class PatternRunner:
    """An `Evaluator` for the search: `score(pattern)` and `set_base(pattern)`. Patterns have one
    character per position of `layout`."""

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
        weights: torch.Tensor | None = None,
    ):
        """`weights`: [sequences, seq_len - 1], how much each label position counts (the objective's token
        weights: answer tokens, key tokens); None counts every position once, the paper's LM loss. A
        sequence's loss is its weighted sum over the mean weight of a sequence, so the mean of sequence
        losses is the weighted mean over every token and paired differences stay per sequence."""
        self.model, self.layout, self.tokens = model, layout, tokens
        self.batch_size = max(1, batch_size)
        self.logits_chunk = logits_chunk
        self.state = sharing_state(layout, FULL * layout.num_positions, measure_overlap, indexer_chunk)
        self.counters = Counters()
        self.cache_device = cache_device
        self.store = Store(cache_device) if cache_device != "none" else None
        self.base: str | None = None
        self.base_score: Score | None = None
        self._driver = Driver(self)
        self._base_overlap: tuple[dict, dict] = ({}, {})
        self._last_overlap: tuple[dict, dict] = ({}, {})
        self._best: _Candidate | None = None
        self._pieces: dict[str, _Candidate] = {}  # a race's partial scores this step, by pattern
        self._last_scored: tuple | None = None  # without a cache: the step's best candidate
        self._batches = [tokens[i : i + self.batch_size] for i in range(0, len(tokens), self.batch_size)]
        self._weights = None if weights is None else [weights[i : i + self.batch_size] for i in range(0, len(tokens), self.batch_size)]
        total = tokens.shape[1] - 1 if weights is None else float(weights.double().sum()) / len(tokens)
        if not total > 0:
            raise ValueError("the token weights weigh no token")
        self.norm = total
        self.last_exact: list[bool] | None = None  # with weights: per sequence of the last evaluation
        self._token_losses: list | None = None
        self._last_batches: dict[int, _Batch] = {}
        # The race's lazy base (`rebase`): per batch, what is known of the committed pattern there (its sums
        # once it has run to the end; overlap counts of the layers whose input is still its own), and the
        # batches where it must rerun from a layer before a candidate past that layer can start there.
        self._lazy = False
        self._known: dict[int, _Batch] = {}
        self._stale: dict[int, int] = {}
        self.last_layer_overlap: dict[int, float] = {}
        # Called after each batch of an evaluation: (sequences done, sequences in this evaluation).
        self.on_sequences: Callable[[int, int], None] | None = None

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def note_cache(self, into: Store) -> None:
        held = (self.store.bytes + (into.bytes if into is not self.store else 0) + (self._best.store.bytes if self._best else 0)
                + sum(p.store.bytes for p in self._pieces.values()))
        self.counters.peak_cache_bytes = max(self.counters.peak_cache_bytes, held)

    # -- one forward -------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None, per_token: bool = False):
        """Summed next-token cross-entropy per sequence, weighted by `weights` ([batch, seq - 1], one per
        label position) where given. The logits come `logits_chunk` positions at a time, and with weights
        only at the positions some sequence weighs: the first call runs the layers, later calls replay the
        last layer's output, so the logits never exceed [batch, logits_chunk, vocab].

        Returns (sums, exact, losses): with weights, `exact` says per sequence whether every weighted label is
        the argmax of its logits (teacher-forced exact match); with `per_token`, `losses` is the whole
        [batch, seq - 1] cross-entropy."""
        device = self.model.get_input_embeddings().weight.device
        if device.type != "meta":  # offloaded embeddings: accelerate's hook moves the input itself
            ids = ids.to(device)
        driver = self._driver
        sums = torch.zeros(ids.shape[0], dtype=torch.float64)
        wrong = torch.zeros(ids.shape[0], dtype=torch.long)
        losses = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32) if per_token else None
        if weights is None:
            scored = torch.arange(ids.shape[1] - 1)
        else:
            scored = (weights > 0).any(dim=0).nonzero().flatten()
            if not len(scored):  # nothing weighed here, but the layers still run: the prefix cache records them
                scored = torch.tensor([ids.shape[1] - 2])
        for c0 in range(0, len(scored), self.logits_chunk):
            if c0 > 0:
                driver.start, driver.replay, driver.into = self.layout.num_layers, (driver.last_output, {}), None
            keep = scored[c0 : c0 + self.logits_chunk]
            contiguous = weights is None  # plain LM: one range of positions, as the model takes it
            keep_arg = torch.arange(int(keep[0]), int(keep[-1]) + 1, device=ids.device) if contiguous else keep.to(ids.device)
            with lazy_masks():  # the sparse path's masks come a block of rows at a time
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep_arg).logits.float()
            labels = ids[:, keep_arg + 1].to(logits.device)
            ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            if per_token:
                losses[:, keep] = ce.cpu()
            if weights is None:
                sums += ce.double().sum(dim=1).cpu()
            else:
                w = weights[:, keep].to(ce.device, torch.float64)
                sums += (ce.double() * w).sum(dim=1).cpu()
                wrong += ((logits.argmax(dim=-1) != labels) & (w > 0)).sum(dim=1).cpu()
        driver.last_output = None
        exact = (wrong == 0).tolist() if weights is not None else None
        return sums.tolist(), exact, losses

    # -- Evaluator API ------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, pattern: str, start: int, into: "Store | None", batches=None) -> Score:
        """Score `pattern`, starting at decoder layer `start` (0, or the layer of the one position it
        flips relative to the cached base)."""
        t0 = time.perf_counter()
        layout, state, driver = self.layout, self.state, self._driver
        state.pattern = pattern
        state.reset_overlap()
        if start > 0:  # layers before `start` are not rerun: their overlap is the base's
            hits, total = self._base_overlap
            state.overlap_hits.update({i: v for i, v in hits.items() if i < start})
            state.overlap_total.update({i: v for i, v in total.items() if i < start})
        positions = layout.positions
        sources = source_layers(pattern)
        flipped = positions.index(start) if start > 0 else 0
        keep_from = [positions[p] for p, c in enumerate(pattern) if c == FULL and p > 0 and p not in layout.fixed_shared]
        driver.record_at = set(keep_from)
        driver.full_at = {positions[p] for p, c in enumerate(pattern) if c == FULL and layout.indexers[p] is not None}
        seq_sums: list[float] = []
        exact: list[bool] = []
        todo = range(len(self._batches)) if batches is None else batches
        num_seqs = sum(len(self._batches[b]) for b in todo)
        self._last_batches = {}
        with install_sharing(layout, state), slots(layout, driver):
            for b in todo:
                driver.start, driver.into, driver.batch = start, into, b
                if start == 0:
                    state.current, driver.replay = None, None
                else:
                    driver.replay = self.store.get(("hidden", start, b))
                    state.current = self.store.get(("topk", positions[sources[flipped - 1]], b))
                hits0, total0 = dict(state.overlap_hits), dict(state.overlap_total)
                sums, right, losses = self._forward(self._batches[b], None if self._weights is None else self._weights[b],
                                                    per_token=self._token_losses is not None)
                if losses is not None:
                    self._token_losses.append(losses)
                seq_sums += sums
                exact += right or []
                # This batch's own counts of the layers it ran (whole numbers: the differences are exact).
                self._last_batches[b] = _Batch(
                    sums, {i: v - hits0.get(i, 0.0) for i, v in state.overlap_hits.items() if i >= start},
                    {i: v - total0.get(i, 0.0) for i, v in state.overlap_total.items() if i >= start})
                if self.on_sequences is not None:
                    self.on_sequences(len(seq_sums), num_seqs)
        state.current, driver.replay, driver.into = None, None, None
        overlaps = state.layer_overlap()
        self.last_exact = exact if self._weights is not None else None
        score = Score(
            loss=math.fsum(seq_sums) / (self.norm * len(seq_sums)),
            seq_losses=[s / self.norm for s in seq_sums],
            overlap=(math.fsum(overlaps.values()) / len(overlaps)) if overlaps else None,
        )
        self.last_layer_overlap = overlaps
        self._last_overlap = (dict(state.overlap_hits), dict(state.overlap_total))
        self.counters.patterns_scored += 1
        self.counters.seconds += time.perf_counter() - t0
        return score

    def token_losses(self, pattern: str) -> torch.Tensor:
        """[sequences, seq_len - 1]: the cross-entropy of every label under `pattern`, each sequence run whole."""
        self._token_losses = []
        try:
            self._evaluate(pattern, 0, None)
            return torch.cat(self._token_losses)
        finally:
            self._token_losses = None

    def _restart_layer(self, pattern: str) -> int:
        """The decoder layer a pattern that flips one cached full position of the base can restart
        from, else 0. The lazy base keeps every input it may restart from until the batch reruns."""
        if self.store is None or self.base is None or len(self.base) != len(pattern):
            return 0
        diff = [p for p, (a, b) in enumerate(zip(self.base, pattern)) if a != b]
        if len(diff) == 1 and self.base[diff[0]] == FULL:
            layer = self.layout.positions[diff[0]]
            if self._lazy or ("hidden", layer, 0) in self.store.items:
                return layer
        return 0

    def set_base(self, pattern: str) -> Score:
        """Score the committed pattern and cache what its candidates share with it."""
        if self._lazy:
            return self._whole_base(pattern)
        if self.store is None:
            # The committed pattern was scored as a candidate a moment ago: no need to run it again.
            last, self._last_scored = self._last_scored, None
            if last is not None and last[0] == pattern:
                score, self.last_layer_overlap = last[1], last[2]
            else:
                score = self._evaluate(pattern, 0, None)
                self._known = dict(self._last_batches)
            self.base, self.base_score = pattern, score
            return score
        start = self._restart_layer(pattern)
        best, self._best = self._best, None
        # Everything from the flipped layer on changes; the input of the flipped layer itself does not,
        # and is the starting point of the refresh.
        stale = [k for k in self.store.items if start == 0 or k[1] > start or (k[0] == "topk" and k[1] == start)]
        for key in stale:
            self.store.drop(key)
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
            if start == 0:  # every batch's counts: what a lazy base that follows starts from
                self._known = dict(self._last_batches)
        for key in [k for k in self.store.items if k[0] == "hidden" and k[1] == start]:
            self.store.drop(key)  # no longer a candidate
        return self.base_score

    def score(self, pattern: str, batches: list[int] | None = None) -> Score:
        """Score `pattern` on every calibration batch, or, after `rebase`, only on `batches` (indices into
        the batches of `batch_size` sequences): its `seq_losses` are then those batches' sequences, in
        that order."""
        if self._lazy:
            return self._score_lazy(pattern, batches)
        if batches is not None and list(batches) != list(range(self.num_batches)):
            raise ValueError("partial scores need a lazy base (rebase)")
        start = self._restart_layer(pattern)
        if start == 0:
            score = self._evaluate(pattern, 0, None)
            if self.store is None and (self._last_scored is None or score.loss < self._last_scored[1].loss):
                self._last_scored = (pattern, score, self.last_layer_overlap)
            return score
        scratch = Store(self.cache_device)
        score = self._evaluate(pattern, start, scratch)
        candidate = _Candidate(pattern, start, scratch, score, self._last_overlap)
        # Keep the layer inputs of the best candidate so far: it is the likely next base.
        if self._best is None or candidate.rank < self._best.rank:
            if self._best is not None:
                self._best.store.close()
            self._best = candidate
        else:
            candidate.store.close()
        return candidate.score

    # -- the race's lazy base -------------------------------------------------------------------------

    def rebase(self, pattern: str) -> None:
        """Commit `pattern` without running it. Where its candidate's run was kept (the batches a race
        scored it on), its layer inputs are adopted and it is known to the end; elsewhere its inputs are
        still the old base's up to the flipped layer, and it reruns from there only when a candidate past
        that layer, or `base_losses`, needs it on that batch."""
        if pattern == self.base and self._known.keys() == set(range(self.num_batches)):
            self._lazy = True  # the scored base, known on every batch: the race starts from it
            return
        start = self._restart_layer(pattern)
        kept = self._pieces.pop(pattern, None)
        for piece in self._pieces.values():
            piece.store.close()
        self._pieces = {}
        if self._best is not None:
            self._best.store.close()
            self._best = None
        if start == 0:  # not one flip of the cached base (or no cache): it reruns from layer 0 where needed
            if self.store is not None:
                self.store.close()
                self.store = Store(self.cache_device)
            covered = kept.batches if kept is not None else {}
            self._known = {b: covered[b] for b in covered}
            self._stale = {b: 0 for b in range(self.num_batches) if b not in covered}
        else:
            for key in [k for k in self.store.items if k[1] > start or (k[0] == "topk" and k[1] == start)]:
                self.store.drop(key)
            for b in range(self.num_batches):
                if kept is not None and b in kept.batches:
                    self.store.drop(("hidden", start, b))  # no longer a candidate, and nothing reruns from it
                    self._known[b] = self._known[b].below(start).joined(kept.batches[b])
                    self._stale.pop(b, None)
                else:
                    self._stale[b] = min(self._stale.get(b, start), start)
                    self._known[b] = self._known[b].below(self._stale[b])
            if kept is not None:
                self.store.adopt(kept.store)
        if kept is not None and start == 0:
            kept.store.close()
        self.base, self.base_score, self._lazy = pattern, None, True

    def _catch_up(self, batches, upto: int) -> None:
        """Rerun the committed pattern, to its last layer, on those of `batches` where its layer inputs are
        known only below `upto`: from the layer it changed at, with its selections and inputs recorded."""
        by_layer: dict[int, list[int]] = {}
        for b in batches:
            if b in self._stale and self._stale[b] < upto:
                by_layer.setdefault(self._stale[b], []).append(b)
        for layer, group in sorted(by_layer.items()):
            before = self.counters.layer_forwards
            self._evaluate(self.base, layer, self.store, group)
            self.counters.base_layer_forwards += self.counters.layer_forwards - before
            for b in group:
                self._known[b] = self._known[b].below(layer).joined(self._last_batches[b]) if layer else self._last_batches[b]
                del self._stale[b]
                if layer and self.store is not None:
                    self.store.drop(("hidden", layer, b))

    def base_losses(self, batches: list[int]) -> list[float]:
        """The committed pattern's per-sequence losses on `batches` (run where not yet known)."""
        self._catch_up(batches, self.layout.num_layers)
        return [x / self.norm for b in batches for x in self._known[b].sums]

    def _score_lazy(self, pattern: str, batches: list[int] | None) -> Score:
        whole = batches is None
        todo = list(range(self.num_batches)) if whole else list(batches)
        start = self._restart_layer(pattern)
        if start == 0:  # no cached base to start from: a plain forward, nothing kept
            score = self._evaluate(pattern, 0, None, todo)
            return score if whole else Score(score.loss, score.seq_losses, score.overlap)
        self._catch_up(todo, start)
        kept = self._pieces.get(pattern)
        if kept is None:
            kept = self._pieces[pattern] = _Candidate(pattern, start, Store(self.cache_device))
        missing = [b for b in todo if b not in kept.batches]
        if missing:
            scratch = Store(self.cache_device)
            self._evaluate(pattern, start, scratch, missing)
            kept.store.adopt(scratch)
            kept.batches.update({b: self._last_batches[b] for b in missing})
        sums = [x for b in todo for x in kept.batches[b].sums]
        overlaps = _overlaps([self._known[b].below(start) for b in todo] + [kept.batches[b] for b in todo])
        self.last_layer_overlap = overlaps
        self._trim_pieces()
        return Score(math.fsum(sums) / (self.norm * len(sums)), [x / self.norm for x in sums],
                     (math.fsum(overlaps.values()) / len(overlaps)) if overlaps else None)

    def _whole_base(self, pattern: str) -> Score:
        """`set_base` after a lazy base: the pattern on every batch, run only where not yet known. The base
        stays lazy: later candidates may be scored on some batches, and committed with `rebase`."""
        if pattern != self.base:
            self.rebase(pattern)
        self._catch_up(range(self.num_batches), self.layout.num_layers)
        parts = [self._known[b] for b in range(self.num_batches)]
        sums = [x for part in parts for x in part.sums]
        overlaps = _overlaps(parts)
        self._base_overlap = _hit_totals(parts)
        self.last_layer_overlap = overlaps
        self.base_score = Score(math.fsum(sums) / (self.norm * len(sums)), [x / self.norm for x in sums],
                                (math.fsum(overlaps.values()) / len(overlaps)) if overlaps else None)
        return self.base_score

    def _trim_pieces(self) -> None:
        """A race's candidates keep their layer inputs within the room of one whole candidate's cache (what
        `cache_bytes_estimate` counts for the step's best): past it, the candidates with the highest mean
        loss so far (a race drops those first) give theirs up; one of them that wins reruns on those
        batches when a later candidate needs them."""
        if self.store is None:
            return
        room = max(0, self.store.bytes)
        while self._pieces and sum(p.store.bytes for p in self._pieces.values()) > room:
            worst = max(self._pieces.values(), key=lambda p: (p.partial_mean(), p.start))
            self._pieces.pop(worst.pattern).store.close()

    def close(self) -> None:
        for kept in self._pieces.values():
            kept.store.close()
        self._pieces = {}
        if self._best is not None:
            self._best.store.close()
            self._best = None
        if self.store is not None:
            self.store.close()


# Relative difference past which the self-check refuses. Both numbers come from the same logits, so
# only the reduction order differs; a wrong mask, RoPE or head moves the loss by far more.
SELF_CHECK_TOLERANCE = 1e-4
SELF_CHECK_LOGITS_BYTES = 1 << 30
# On the sparse path the reference is the model's own dense forward, which builds [seq, seq] masks: the
# check runs on a prefix the dense path affords, long enough that most rows see more keys than the budget.
SELF_CHECK_DENSE_TOKENS = 2048


def self_check_tokens(layout, vocab: int, seq: int, sparse: bool) -> int:
    floor = layout.family.seq_len_floor(layout.text)
    cut = max(floor + 2, SELF_CHECK_LOGITS_BYTES // (4 * vocab))
    if sparse:
        cut = min(cut, max(SELF_CHECK_DENSE_TOKENS, 2 * floor))
    return min(seq, cut)


@torch.no_grad()
def self_check(model, layout, ids: torch.Tensor, name: str, indexer_chunk: int | None = None) -> dict:
    """The all-Full loss of the first calibration sequence as this tool computes it, against the model's
    own `forward(input_ids, labels=...)` on its dense attention. On the sparse path this checks the
    sparse kernel and the mask placeholders too. A difference means the tool would report wrong numbers
    for this model: refuse. The sequence is cut where the model's own full logits would pass 1 GiB and,
    on the sparse path, where the dense reference's masks would grow large (`SELF_CHECK_DENSE_TOKENS`)."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    path = "sparse" if current(model) == SPARSE else "dense"
    row = ids[:1, : self_check_tokens(layout, vocab, ids.shape[1], path == "sparse")]
    all_full = "".join("S" if p in layout.fixed_shared else FULL for p in range(layout.num_positions))
    what = f"self-check failed for {name} ({type(model).__name__}, {layout.family.name}, {path} attention)"
    hint = ("rerun with --attention dense, and report the model_type and transformers version" if path == "sparse"
            else "report the model_type and transformers version; this model is not supported as it is")
    try:
        ours = PatternRunner(model, layout, row, measure_overlap=False, indexer_chunk=indexer_chunk, cache_device="none").score(all_full).loss
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        if is_out_of_memory(e):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CalibError(
            f"{what}: the model's forward does not run as its adapter describes it ({type(e).__name__}: {first})", hint=hint,
        ) from None
    device = model.get_input_embeddings().weight.device
    row = row.to(device) if device.type != "meta" else row
    with attention_path(model, "dense"):
        theirs = float(model(input_ids=row, labels=row, use_cache=False).loss)
    diff = abs(ours - theirs)
    if not math.isfinite(theirs) or diff > SELF_CHECK_TOLERANCE * max(1.0, abs(theirs)):
        raise CalibError(
            f"{what}: the all-Full loss of the first "
            f"calibration sequence is {ours:.6f} as indexcache computes it but {theirs:.6f} from the model's own forward "
            f"(difference {diff:.2e}), so its numbers for this model would be wrong", hint=hint,
        )
    return {"tokens": int(row.shape[1]), "attention": path, "tool_loss": ours, "model_loss": theirs, "difference": diff}


def cache_bytes_estimate(num_positions: int, budget: int, num_samples: int, seq_len: int, hidden_size: int,
                         dtype_bytes: int) -> int:
    """Prefix cache upper bound, counted as `Counters.peak_cache_bytes` counts it: the committed pattern's
    layer inputs (one per candidate position) and selections (one per full position), the same again for
    the step's best candidate so far (kept to be adopted), and for the candidate in flight. `hidden_size`
    counts every hyper-connection stream."""
    hidden = (num_positions - 1) * num_samples * seq_len * hidden_size * dtype_bytes
    topk = num_positions * num_samples * seq_len * budget * 4
    return 3 * (hidden + topk)

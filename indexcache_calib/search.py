"""Greedy layer selection (the paper's Algorithm 1) and a cheaper variant with the same answer.

Pure logic: everything model-specific sits behind an `Evaluator`, so the search is tested with fakes.
A search is a list of `Step`s; replaying finished steps (from a checkpoint) and continuing gives the
same result as an uninterrupted run, because every decision depends only on the scores recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from indexcache_calib.pattern import FULL, flip, full_layers

SEARCHES = ("fast", "exact", "naive")


@dataclass
class Score:
    loss: float  # mean per-token LM loss over every calibration token
    seq_losses: list[float] = field(default_factory=list)  # per calibration sequence, for paired comparisons
    overlap: float | None = None  # mean top-k overlap of the shared layers with their own indexer's choice


@dataclass
class Step:
    step: int
    base: str  # committed pattern before this step
    base_loss: float
    scores: dict[int, Score]  # candidate layer -> score of `base` with that layer flipped to S
    chosen: int
    pattern: str  # committed pattern after this step
    swept: bool  # True if every candidate was scored

    @property
    def loss(self) -> float:
        return self.scores[self.chosen].loss

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = {str(k): asdict(v) for k, v in sorted(self.scores.items())}
        return d

    @staticmethod
    def from_json(d: dict) -> "Step":
        scores = {int(k): Score(**v) for k, v in d["scores"].items()}
        return Step(d["step"], d["base"], d["base_loss"], scores, d["chosen"], d["pattern"], d["swept"])


class Evaluator(Protocol):
    def score(self, pattern: str) -> Score: ...

    # Called once per step with the committed pattern before its candidates are scored, so an
    # evaluator can cache what every candidate shares with it (layer inputs before the flipped layer).
    def set_base(self, pattern: str) -> Score: ...


def candidates(pattern: str, fixed_shared: frozenset[int] = frozenset()) -> list[int]:
    """Layers that may still be flipped to S: full, not layer 0, with indexer weights."""
    return [i for i in full_layers(pattern) if i != 0 and i not in fixed_shared]


def _pick(scores: dict[int, Score]) -> int:
    # Lowest loss; ties go to the lower layer id so the result never depends on dict order.
    return min(scores, key=lambda layer: (scores[layer].loss, layer))


def _neighbours(pattern: str, layer: int, cands: list[int]) -> list[int]:
    """The nearest full candidates on either side of `layer`: committing `layer` merges their runs."""
    before = [c for c in cands if c < layer]
    after = [c for c in cands if c > layer]
    return ([before[-1]] if before else []) + ([after[0]] if after else [])


def greedy_search(
    start: str,
    num_full: int,
    evaluator: Evaluator,
    fixed_shared: frozenset[int] = frozenset(),
    search: str = "naive",
    done: list[Step] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_candidate: Callable[[int, int, int], None] | None = None,
    rescore_best: int = 2,
    allowed: Callable[[str], bool] | None = None,
) -> tuple[Score, list[Step]]:
    """Flip one layer per step to S until `num_full` layers are full. Returns (score of `start`, steps).

    search="naive": every candidate is scored at every step (Algorithm 1).
    search="exact": the same decisions as naive; only the evaluator differs (it reuses prefixes).
    search="fast": after the first full sweep, each step re-scores the `rescore_best` candidates with
    the lowest last-known delta plus the two full neighbours of the layer just committed, then keeps
    re-scoring in order of last-known delta while any unscored candidate's last delta is below the
    best fresh delta (its ranking is in doubt). Deltas are loss minus the step's base loss.
    `allowed`: patterns the target can run; a candidate whose flip it rejects is never scored, and the
    search stops early if no candidate is left.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}")
    steps = list(done or [])
    pattern = steps[-1].pattern if steps else start
    base_score = evaluator.set_base(start)
    start_score = base_score
    if steps:
        base_score = evaluator.set_base(pattern)
    last_delta: dict[int, float] = {}
    for s in steps:  # rebuild the fast search's memory from replayed steps
        for layer, sc in s.scores.items():
            last_delta[layer] = sc.loss - s.base_loss
    while pattern.count(FULL) > num_full:
        cands = candidates(pattern, fixed_shared)
        if allowed is not None:
            cands = [c for c in cands if allowed(flip(pattern, c))]
        if not cands:
            break
        step_no = len(steps) + 1
        scores: dict[int, Score] = {}

        def score(layers: list[int]) -> list[Score]:
            if on_candidate:
                on_candidate(step_no, len(scores), len(cands))
            patterns = [flip(pattern, layer) for layer in layers]
            if hasattr(evaluator, "score_many"):
                return evaluator.score_many(patterns)
            return [evaluator.score(p) for p in patterns]

        if search != "fast" or not steps or any(c not in last_delta for c in cands):
            scores.update(zip(cands, score(cands)))
        else:
            ranked = sorted(cands, key=lambda c: (last_delta[c], c))
            first = sorted(set(ranked[:rescore_best] + _neighbours(pattern, steps[-1].chosen, cands)))
            scores.update(zip(first, score(first)))
            doubt = [c for c in ranked if c not in scores]
            group = max(1, getattr(evaluator, "parallel", 1))

            def in_doubt(layer: int) -> bool:
                return last_delta[layer] < min(sc.loss for sc in scores.values()) - base_score.loss

            while doubt and in_doubt(doubt[0]):
                batch = doubt[:group]
                fresh = dict(zip(batch, score(batch)))
                # Apply the one-at-a-time rule to the batch in order and keep only what it would have
                # scored, so the answer never depends on how many workers score in parallel.
                stopped = False
                for layer in batch:
                    if not in_doubt(layer):
                        stopped = True
                        break
                    scores[layer] = fresh[layer]
                if stopped:
                    break
                doubt = doubt[len(batch):]
        for layer, sc in scores.items():
            last_delta[layer] = sc.loss - base_score.loss
        chosen = _pick(scores)
        new_pattern = flip(pattern, chosen)
        step = Step(step_no, pattern, base_score.loss, scores, chosen, new_pattern, len(scores) == len(cands))
        steps.append(step)
        pattern = new_pattern
        if on_step:
            on_step(step)
        if pattern.count(FULL) > num_full:
            base_score = evaluator.set_base(pattern)
    return start_score, steps


def paired(a: Score, b: Score) -> tuple[float, float | None]:
    """Mean over sequences of a - b (two Scores on the same tokens) and its standard error
    (None with fewer than two sequences)."""
    d = [x - y for x, y in zip(a.seq_losses, b.seq_losses)]
    mean = math.fsum(d) / len(d)
    if len(d) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def path(start: str, start_loss: float, steps: list[Step]) -> list[dict]:
    """The committed pattern after every step: one pattern per number of full layers, nested F-sets."""
    rows = [{"num_full": start.count(FULL), "pattern": start, "loss": start_loss, "step": 0}]
    for s in steps:
        rows.append({"num_full": s.pattern.count(FULL), "pattern": s.pattern, "loss": s.loss, "step": s.step})
    return rows

"""Greedy layer selection (the paper's Algorithm 1) and a race that takes its decisions for a fraction
of the work.

Pure logic: everything model-specific sits behind an `Evaluator`, so the search is tested with fakes.
A search is a list of `Step`s; replaying finished steps (from a checkpoint) and continuing gives the
same result as an uninterrupted run, because every decision depends only on the scores recorded.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from indexcache_calib.pattern import FULL, flip, full_layers
from indexcache_calib.stats import mean_se, paired_differences, t_quantile

SEARCHES = ("race", "exact", "naive")
DEFAULT_SEARCH = "race"
# Searches earlier versions offered, and what took their place.
RETIRED = {"fast": "race (the default) enters candidates lazily as fast did, and races them"}
DECIDED_SE = 2.0  # a step is decided when its choice beats every other candidate by at least this many paired SE
RACE_ORDER_SEED = 0  # the fixed order in which a race visits calibration batches
# `--tolerance auto`: the indifference zone of each step, as a share of the committed pattern's loss. Sharing a
# layer that costs this much more than the best candidate is a change of the loss users do not see, and a zone
# in nats ends a near-tie after a count of sequences that does not grow with their number.
AUTO_SHARE = 5e-4
WORSE_BY_BOUND = "worse by bound"
WITHIN_TOLERANCE = "within tolerance at commit"


@dataclass
class Score:
    loss: float  # mean per-token LM loss over the calibration tokens scored
    seq_losses: list[float] = field(default_factory=list)  # per calibration sequence, for paired comparisons
    overlap: float | None = None  # mean top-k overlap of the shared layers with their own indexer's choice
    sequences: list[int] | None = None  # the calibration sequences `seq_losses` are; None: every one, in order

    def by_sequence(self) -> dict[int, float]:
        ids = self.sequences if self.sequences is not None else range(len(self.seq_losses))
        return dict(zip(ids, self.seq_losses))

    @staticmethod
    def of(losses: dict[int, float], num_sequences: int) -> "Score":
        """The score of per-sequence losses (sequence id -> loss): whole when every sequence is there."""
        ids = sorted(losses)
        values = [losses[i] for i in ids]
        return Score(math.fsum(values) / len(values), values, None, None if len(ids) == num_sequences else ids)


@dataclass
class Confidence:
    """How surely a step's choice beats the other candidates scored at that step."""

    runner_up: int | None  # the candidate the choice beats by the fewest paired standard errors
    gap: float | None  # mean over shared sequences of runner-up minus chosen loss (nats/token)
    se: float | None  # its standard error (None with fewer than two shared sequences)
    sequences: int  # sequences the comparison shares
    decided: bool  # gap >= DECIDED_SE * se, or no other candidate

    @property
    def z(self) -> float | None:
        if self.gap is None or self.se is None:
            return None
        if self.se == 0:
            return math.inf if self.gap > 0 else 0.0 if self.gap == 0 else -math.inf
        return self.gap / self.se


@dataclass
class Step:
    step: int
    base: str  # committed pattern before this step
    base_loss: float  # its loss: over every sequence, or over `base_score`'s where the race kept the base lazy
    scores: dict[int, Score]  # candidate layer -> score of `base` with that layer flipped to S
    chosen: int
    pattern: str  # committed pattern after this step
    swept: bool  # True if every candidate was scored
    # search="race": {"sequences", "tolerance" (nats, None without one), "ended_after" (sequences seen when
    # the tolerance ended the step; None otherwise), "entered" (candidates raced, in the order they
    # entered), "dropped": [{"candidate", "sequences", "reason"}]}
    race: dict | None = None
    # search="race": the committed pattern's losses on the sequences this step's candidates were scored on
    # (the race runs the base only where it needs it); None where the base was scored on every sequence.
    base_score: Score | None = None
    # search="race": `pattern` scored on every sequence, where the search was asked for its loss (`whole_at`).
    committed: Score | None = None

    @property
    def loss(self) -> float:
        """The committed pattern's loss: over every sequence where known, else over those the race saw."""
        return self.whole.loss

    @property
    def whole(self) -> Score:
        return self.committed if self.committed is not None else self.scores[self.chosen]

    @property
    def confidence(self) -> Confidence:
        return confidence(self.scores, self.chosen)

    def delta(self, layer: int) -> float:
        """Candidate minus base, paired over the sequences the candidate was scored on."""
        if self.base_score is None:
            return self.scores[layer].loss - self.base_loss
        return paired(self.scores[layer], self.base_score)[0]

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = {str(k): asdict(v) for k, v in sorted(self.scores.items())}
        for key in ("race", "base_score", "committed"):  # other searches' steps (and older checkpoints)
            if d[key] is None:
                del d[key]
        return d

    @staticmethod
    def from_json(d: dict) -> "Step":
        scores = {int(k): Score(**v) for k, v in d["scores"].items()}
        base = Score(**d["base_score"]) if d.get("base_score") else None
        whole = Score(**d["committed"]) if d.get("committed") else None
        return Step(d["step"], d["base"], d["base_loss"], scores, d["chosen"], d["pattern"], d["swept"], d.get("race"), base,
                    whole)


@dataclass(frozen=True)
class Race:
    """Settings of `search="race"`, the default. Each step:

    - Entry (lazy): after the first step, only the `enter` candidates with the lowest last-known delta and
      the two Full neighbours of the layer just committed enter; then, one at a time, every candidate whose
      last-known delta, lowered by the largest fall per step seen among this step's entered candidates
      times its age and by one paired standard error, could still beat the leader's fresh delta.
    - Racing: the entered candidates are scored on the first `first` sequences of a fixed shuffled order,
      then twice as many each round, until every sequence; a candidate is dropped once its paired
      difference to the leader is above a one-sided Student t bound with the finite-population correction,
      at level `alpha / (looks x (candidates - 1))`: by the union bound, the chance that a step drops the
      candidate with the lowest loss over every sequence is at most `alpha`.
    - Indifference zone: `tolerance` nats (or "auto": AUTO_SHARE of the loss): the step ends and commits the
      leader once, for every candidate still racing, the upper bound of (leader's loss - its loss) over
      all sequences, at the same level, is at most the tolerance. With probability at least 1 - alpha the
      committed candidate is then no more than `tolerance` worse than the best of those raced. A
      tolerance in nats ends a near-tie after a count of sequences that does not grow with their number.
    - Lazy base: the committed pattern runs only on the sequences a later step scores candidates on, and
      only from the layers it needs; nothing is scored on every sequence unless the race gets there.
    None or 0: no indifference zone.
    """

    alpha: float = 0.05
    first: int = 4
    tolerance: float | str | None = "auto"
    enter: int = 1

    def __post_init__(self):
        if not 0.0 < self.alpha < 0.5:
            raise ValueError("race alpha must be in (0, 0.5)")
        if self.first < 2:
            raise ValueError("a race's first round needs at least 2 sequences")
        if self.enter < 1:
            raise ValueError("a race enters at least one candidate per step")
        t = self.tolerance
        if not (t is None or t == "auto" or (isinstance(t, (int, float)) and not isinstance(t, bool)
                                             and math.isfinite(t) and t >= 0)):
            raise ValueError("a race's tolerance is a number of nats >= 0, 'auto' or None")


class Evaluator(Protocol):
    def score(self, pattern: str) -> Score: ...

    # Called with the pattern a search starts from, and by naive and exact once per step with the committed
    # pattern before its candidates are scored, so an evaluator can cache what every candidate shares with
    # it (layer inputs before the flipped layer).
    def set_base(self, pattern: str) -> Score: ...

    # For search="race" only: `num_batches`, `batch_size`; `score(pattern, batches=[...])`, which scores
    # those batches (of `batch_size` consecutive sequences) and returns their sequences' losses;
    # `rebase(pattern)`, which commits a pattern without scoring it; and `base_losses(batches)`, the
    # committed pattern's per-sequence losses on those batches. After `rebase`, `set_base` of the committed
    # pattern scores it on every sequence, running it only where it is not yet known, and stays lazy.


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


def confidence(scores: dict[int, Score], chosen: int) -> Confidence:
    """Compare the chosen candidate with every other one on the sequences both were scored on; the
    runner-up is the one it beats by the fewest standard errors (without a standard error, by the
    smallest gap)."""
    best = scores[chosen].by_sequence()
    rows = []
    for layer, sc in scores.items():
        if layer == chosen:
            continue
        d = paired_differences(sc.by_sequence(), best)
        if not d:
            continue
        gap, se = mean_se(d)
        c = Confidence(layer, gap, se, len(d), False)
        rows.append(((-math.inf, gap) if c.z is None else (c.z, gap), layer, c))
    if not rows:
        return Confidence(None, None, None, len(best), True)
    _, _, c = min(rows, key=lambda r: (r[0], r[1]))
    c.decided = c.z is not None and c.z >= DECIDED_SE
    return c


def race_order(num_batches: int) -> list[int]:
    """The order a race visits calibration batches: shuffled (packed sequences sit in corpus order, and
    neighbours in a corpus are alike), the same for every step and every run."""
    order = list(range(num_batches))
    random.Random(RACE_ORDER_SEED).shuffle(order)
    return order


RACE_GROWTH = 1.25  # each round sees this many times the batches of the one before


def race_rounds(num_batches: int, first_batches: int) -> list[int]:
    """Batches seen after each round: first_batches, then RACE_GROWTH times as many (at least one more)
    each round, ending with every batch. Rounds closer than doubling let the tolerance end a step nearer
    the count it needs, for a few more looks in the union bound."""
    rounds, r = [], max(1, first_batches)
    while r < num_batches:
        rounds.append(r)
        r = max(r + 1, math.ceil(r * RACE_GROWTH))
    return rounds + [num_batches]


def _batch_sequences(evaluator, num_sequences: int) -> list[list[int]]:
    size = max(1, getattr(evaluator, "batch_size", 1))
    batches = [list(range(b, min(b + size, num_sequences))) for b in range(0, num_sequences, size)]
    if len(batches) != evaluator.num_batches:
        raise ValueError(f"{num_sequences} sequences in batches of {size} are not the evaluator's {evaluator.num_batches} batches")
    return batches


def greedy_search(
    start: str,
    num_full: int,
    evaluator: Evaluator,
    fixed_shared: frozenset[int] = frozenset(),
    search: str = "race",
    done: list[Step] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_candidate: Callable[[int, int, int], None] | None = None,
    allowed: Callable[[str], bool] | None = None,
    race: Race | None = None,
    whole_at: frozenset[int] = frozenset(),
) -> tuple[Score, list[Step]]:
    """Flip one layer per step to S until `num_full` layers are full. Returns (score of `start`, steps).

    search="naive": every candidate is scored at every step (Algorithm 1).
    search="exact": the same decisions as naive; only the evaluator differs (it reuses prefixes).
    search="race": candidates entered lazily and raced over calibration sequences, with an indifference
    zone and a lazy base (see `Race`).
    `allowed`: patterns the target can run; a candidate whose flip it rejects is never scored, and the
    search stops early if no candidate is left.
    `whole_at`: numbers of Full layers at which the race scores the committed pattern on every sequence
    (`Step.committed`): the end points a user reads. The other searches score every step's on all of them.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}")
    race = race or Race()
    steps = list(done or [])
    pattern = steps[-1].pattern if steps else start
    start_score = evaluator.set_base(start)
    num_sequences = len(start_score.seq_losses)
    lazy = search == "race"
    base_score = start_score
    if lazy:  # the race knows the committed pattern's losses where its last step scored it
        evaluator.rebase(pattern)
        if steps:
            base_score = steps[-1].whole
    elif steps:
        base_score = evaluator.set_base(pattern)
    # The race's memory: layer -> (step it was last scored at, its per-sequence deltas to that step's base),
    # rebuilt from replayed steps.
    memory: dict[int, tuple[int, dict[int, float]]] = {}
    for s in steps:
        if s.base_score is not None:
            _remember(memory, s, s.base_score)
    while pattern.count(FULL) > num_full:
        cands = candidates(pattern, fixed_shared)
        if allowed is not None:
            cands = [c for c in cands if allowed(flip(pattern, c))]
        if not cands:
            break
        step_no = len(steps) + 1
        progress = {"done": 0}

        def score(layers: list[int], batches: list[int] | None = None) -> list[Score]:
            if on_candidate:
                on_candidate(step_no, progress["done"], len(cands))
            patterns = [flip(pattern, layer) for layer in layers]
            extra = {} if batches is None else {"batches": batches}
            if hasattr(evaluator, "score_many"):
                out = evaluator.score_many(patterns, **extra)
            else:
                out = [evaluator.score(p, **extra) for p in patterns]
            if batches is None:
                progress["done"] += len(layers)
            return out

        log, step_base = None, None
        if lazy:
            last = steps[-1].chosen if steps else None
            scores, chosen, log, step_base = _race(pattern, cands, memory, step_no, last, race, evaluator, score,
                                                   num_sequences, base_score.by_sequence(), progress)
        else:
            scores = dict(zip(cands, score(cands)))
            chosen = _pick(scores)
        new_pattern = flip(pattern, chosen)
        step = Step(step_no, pattern, (step_base or base_score).loss, scores, chosen, new_pattern,
                    len(scores) == len(cands), log, step_base)
        if lazy:
            _remember(memory, step, step_base)
            # Committed without running anything: its losses are known where it was raced, and run on the
            # other sequences only where a later step, or an end point, needs them.
            evaluator.rebase(new_pattern)
            base_score = scores[chosen]
            if new_pattern.count(FULL) in whole_at:  # run where not yet known; the race goes on lazily
                step.committed = base_score = evaluator.set_base(new_pattern)
        steps.append(step)
        pattern = new_pattern
        if on_step:
            on_step(step)
        if pattern.count(FULL) > num_full and not lazy:
            base_score = evaluator.set_base(pattern)
    return start_score, steps


def _remember(memory: dict, step: Step, base: Score) -> None:
    """Each candidate scored at `step`: its per-sequence deltas to the step's base."""
    b = base.by_sequence()
    for layer, sc in step.scores.items():
        memory[layer] = (step.step, {i: x - b[i] for i, x in sc.by_sequence().items() if i in b})


def auto_tolerance(base: dict[int, float]) -> float:
    """`--tolerance auto` for one step: AUTO_SHARE of the committed pattern's loss, over the sequences it
    is known on when the step first looks. A zone in nats ends a near-tie after a count of sequences set
    by the zone and the pair's paired spread, however many sequences there are."""
    return AUTO_SHARE * math.fsum(base.values()) / len(base)


def _race(pattern, cands, memory, step_no, last_chosen, race: Race, evaluator, score, num_sequences: int,
          base_known: dict[int, float], progress: dict):
    """One step of the race (see `Race`). Returns (scores, chosen, log, base score on the sequences seen)."""
    batch_seqs = _batch_sequences(evaluator, num_sequences)
    num_batches = len(batch_seqs)
    order = race_order(num_batches)
    rounds = race_rounds(num_batches, math.ceil(race.first / len(batch_seqs[0])))
    q_level = race.alpha / (max(1, len(rounds) - 1) * max(1, len(cands) - 1))
    neighbours = set(_neighbours(pattern, last_chosen, cands)) if last_chosen is not None else set()
    # Candidates nothing is known of (every one at the first step) enter, with the committed layer's
    # neighbours, whose runs just merged, and the likeliest winners among the others by their last-known
    # delta (whose change since then is the drift that lazy entry allows for).
    known = sorted((c for c in cands if c in memory and c not in neighbours), key=lambda c: (_mean(memory[c][1]), c))
    first = sorted(set(known[: race.enter]) | neighbours | {c for c in cands if c not in memory})
    seen: dict[int, dict[int, float]] = {c: {} for c in cands}
    scored: dict[int, set[int]] = {c: set() for c in cands}  # batches each candidate was scored on
    overlaps: dict[int, list] = {c: [] for c in cands}  # (sequences, mean top-k overlap) of each of its scores
    base = dict(base_known)
    tolerance = race.tolerance if isinstance(race.tolerance, (int, float)) and race.tolerance else None
    log = {"sequences": num_sequences, "tolerance": tolerance, "ended_after": None, "entered": [], "dropped": []}
    alive: list[int] = []
    zoned: dict[int, dict] = {}  # candidates let go within the tolerance, with when
    pending = first
    ids: list[int] = []

    def mean(c: int) -> float:
        return math.fsum(seen[c][i] for i in ids) / len(ids)

    def deltas(c: int) -> dict[int, float]:  # on every sequence it raced this step
        return {i: x - base[i] for i, x in seen[c].items()}

    leader = None
    for r in rounds:
        prefix = order[:r]
        ids = [i for b in prefix for i in batch_seqs[b]]
        final = r == num_batches
        while True:
            alive += pending
            log["entered"] += pending
            pending = []
            # Every candidate racing is scored on every batch of the prefix (a newcomer on all of them).
            groups: dict[tuple, list[int]] = {}
            for c in alive:
                missing = tuple(b for b in prefix if b not in scored[c])
                if missing:
                    groups.setdefault(missing, []).append(c)
            for missing, group in groups.items():
                whole = len(missing) == num_batches
                if whole:  # scored whole: its losses come in sequence order
                    missing = tuple(range(num_batches))
                for c, sc in zip(group, score(group, None if whole else list(missing))):
                    got = [i for b in missing for i in batch_seqs[b]]
                    if len(sc.seq_losses) != len(got):
                        raise ValueError("a partial score returned a different number of sequences than its batches hold")
                    seen[c].update(zip(got, sc.seq_losses))
                    scored[c].update(missing)
                    if sc.overlap is not None:
                        overlaps[c].append((len(got), sc.overlap))
            need = [b for b in prefix if any(i not in base for i in batch_seqs[b])]
            if need:
                got = [i for b in need for i in batch_seqs[b]]
                base.update(zip(got, evaluator.base_losses(need)))
            leader = min(alive, key=lambda c: (mean(c), c))
            if not final:
                n = len(ids)
                q = t_quantile(q_level, n - 1)
                if race.tolerance == "auto" and log["tolerance"] is None:
                    log["tolerance"] = tolerance = auto_tolerance(base)
                kept = []
                for c in alive:
                    if c != leader:
                        gap, se = mean_se(paired_differences(seen[c], seen[leader]), num_sequences)
                        if se is not None and gap - q * se > 0:
                            log["dropped"].append({"candidate": c, "sequences": n, "reason": WORSE_BY_BOUND})
                            continue
                        # The indifference zone: at this level, c is at most `tolerance` better than the
                        # leader over all sequences (its upper bound on leader - c: -gap + q * se).
                        if tolerance and se is not None and q * se - gap <= tolerance:
                            zoned[c] = {"candidate": c, "sequences": n, "reason": WITHIN_TOLERANCE}
                            continue
                    kept.append(c)
                progress["done"] += len(alive) - len(kept)
                alive = kept
            if not (final or len(alive) == 1):
                break  # the next round
            # The step would end here. A candidate let go within the zone of an earlier leader must be within
            # it of this one too, on the sequences it saw; if not, it races again.
            back = [c for c in sorted(zoned) if not _within(seen[c], seen[leader], tolerance, q_level, num_sequences)]
            for c in back:
                del zoned[c]
            # And any candidate not racing whose last-known delta says it could still beat the leader by more
            # than the tolerance enters, scored on every batch seen so far.
            entering = None if back else _doubtful(cands, log["entered"], alive, memory, step_no, leader, deltas,
                                                    neighbours, tolerance or 0.0)
            if not back and entering is None:
                break
            alive += back
            pending = [entering] if entering is not None else []
        if final or len(alive) == 1:
            break
    log["dropped"] += [zoned[c] for c in sorted(zoned, key=lambda c: (zoned[c]["sequences"], c))]
    if zoned:
        log["ended_after"] = len(ids)
    scores = {}
    for c in log["entered"]:
        scores[c] = Score.of(seen[c], num_sequences)
        if overlaps[c]:  # weighted by sequences: each of them holds as many query rows
            scores[c].overlap = math.fsum(n * o for n, o in overlaps[c]) / sum(n for n, _ in overlaps[c])
    step_base = Score.of({i: base[i] for i in ids}, num_sequences)
    return scores, leader, log, step_base


def _within(losses: dict[int, float], leader: dict[int, float], tolerance: float | None, level: float,
            num_sequences: int) -> bool:
    """Whether, at `level`, a candidate is at most `tolerance` better than the leader over all sequences,
    paired over the sequences it was scored on."""
    gap, se = mean_se(paired_differences(losses, leader), num_sequences)
    n = len(paired_differences(losses, leader))
    return bool(tolerance) and se is not None and t_quantile(level, n - 1) * se - gap <= tolerance


def _mean(values: dict[int, float]) -> float:
    return math.fsum(values.values()) / len(values) if values else math.inf


def _doubtful(cands, entered, alive, memory, step_no, leader, deltas, neighbours, tolerance: float) -> int | None:
    """The candidate not yet racing whose last-known delta could most plausibly beat the leader's fresh
    one by more than `tolerance`, or None. A stale delta is lowered by the largest fall per step seen among
    this step's racing candidates (sharing a layer can lower another layer's delta; each fall less one
    standard error, so that noise in a few sequences is not taken for a fall) times its age, and by
    one paired standard error over the sequences it shares with the leader's fresh deltas (a gap that
    small is a tie). A candidate that can at best be `tolerance` better than the leader is one the step's
    indifference zone would let go anyway."""
    waiting = [c for c in cands if c not in entered]
    if not waiting:
        return None
    fresh = deltas(leader)
    falls = [0.0]
    for c in entered:
        if c in neighbours or c not in memory or memory[c][0] >= step_no:
            continue
        d = paired_differences(memory[c][1], deltas(c))
        if len(d) >= 2:  # a fall the sequences can tell from noise: its mean less one standard error
            mean, se = mean_se(d)
            falls.append((mean - se) / (step_no - memory[c][0]))
    fall = max(falls)
    bound = {}
    for c in waiting:
        then_step, then = memory[c]
        d = paired_differences(then, fresh)
        if len(d) < 2:
            bound[c] = -math.inf
            continue
        gap, se = mean_se(d)
        bound[c] = gap - fall * (step_no - then_step) - se
    doubt = sorted((c for c in waiting if bound[c] < -tolerance), key=lambda c: (bound[c], c))
    return doubt[0] if doubt else None


def race_summary(steps: list[Step], race: Race, positions: list[int] | None = None) -> dict:
    """What a race's tolerance can have cost: per step, the tolerance in nats, whether it ended the step
    early, which candidates entered, and what was dropped when and why (candidates named by decoder
    layer). Each step commits a candidate at most its tolerance worse than the best of those raced (with
    probability 1 - alpha), so the loss given away against that best at each step is at most the sum over
    the steps the tolerance ended."""
    layer = (lambda p: p) if positions is None else (lambda p: positions[p])
    rows, given = [], 0.0
    for s in steps:
        log = s.race or {}
        ended = log.get("ended_after") is not None
        if ended:
            given += log["tolerance"]
        rows.append({"step": s.step, "tolerance": log.get("tolerance"), "ended_after": log.get("ended_after"),
                     "entered": [layer(c) for c in log.get("entered", [])],
                     "dropped": [{**d, "candidate": layer(d["candidate"])} for d in log.get("dropped", [])]})
    return {"steps": rows, "steps_ended_early": sum(r["ended_after"] is not None for r in rows), "given_away_at_most": given}


def paired(a: Score, b: Score) -> tuple[float, float | None]:
    """Mean over the sequences both were scored on of a - b, and its standard error (None with fewer
    than two sequences)."""
    return mean_se(paired_differences(a.by_sequence(), b.by_sequence()))


def path(start: str, start_loss: float, steps: list[Step], positions: list[int] | None = None) -> list[dict]:
    """The committed pattern after every step: one pattern per number of full layers, nested F-sets,
    with how surely each step's choice beat the runner-up (both named by decoder layer: `positions` maps
    pattern positions to decoder layers; default: the same). `sequences` None: the loss is over every
    calibration sequence; a number: the race scored the step on that many, and the loss is an estimate,
    the row before plus the step's paired delta to its base on those sequences."""
    layer = (lambda p: p) if positions is None else (lambda p: None if p is None else positions[p])
    rows = [{"num_full": start.count(FULL), "pattern": start, "loss": start_loss, "step": 0, "sequences": None}]
    loss = start_loss
    for s in steps:
        c = s.confidence
        whole = s.whole
        # Scored on every sequence, or estimated: the row before plus the step's paired delta to its base.
        loss = whole.loss if whole.sequences is None else loss + s.delta(s.chosen)
        rows.append({
            "num_full": s.pattern.count(FULL), "pattern": s.pattern, "loss": loss, "step": s.step,
            "sequences": None if whole.sequences is None else len(whole.sequences),
            "chosen": layer(s.chosen), "runner_up": layer(c.runner_up), "gap": c.gap, "gap_se": c.se, "decided": c.decided,
        })
    return rows

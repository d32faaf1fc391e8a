"""Greedy layer selection (the paper's Algorithm 1) and cheaper searches that take its decisions.

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

SEARCHES = ("fast", "race", "exact", "naive")
DECIDED_SE = 2.0  # a step is decided when its choice beats every other candidate by at least this many paired SE
RACE_ORDER_SEED = 0  # the fixed order in which a race visits calibration batches
# `--tolerance auto`: this many paired standard errors of the step's differences over *every* calibration
# sequence. A gap under DECIDED_SE standard errors is one the whole calibration set leaves undecided (a
# different draw of sequences could flip it), so a candidate that close to the best is, as far as these
# sequences can tell, as good a choice as Algorithm 1's; the tolerance then says that, with the race's
# confidence, each early commit is at worst such an undecided choice. The standard error is estimated at the
# step's first round: the median over candidates of the per-sequence standard deviation of their paired
# difference to the leader, divided by sqrt(all sequences). The median pools every candidate (a first round
# has few sequences), and is not pulled up by clearly worse candidates, whose differences spread more.
# The loss level's own spread (all-Full per-sequence losses) is the wrong scale: pairing cancels most of it,
# and at the embedded models' sizes one SE of the level is larger than a whole path's loss increase.
AUTO_TOLERANCE_SE = DECIDED_SE
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
    base_loss: float
    scores: dict[int, Score]  # candidate layer -> score of `base` with that layer flipped to S
    chosen: int
    pattern: str  # committed pattern after this step
    swept: bool  # True if every candidate was scored
    # search="race": {"sequences", "tolerance" (nats, None without one), "ended_after" (sequences seen when
    # the tolerance ended the step; None otherwise), "dropped": [{"candidate", "sequences", "reason"}]}
    race: dict | None = None

    @property
    def loss(self) -> float:
        return self.scores[self.chosen].loss

    @property
    def confidence(self) -> Confidence:
        return confidence(self.scores, self.chosen)

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = {str(k): asdict(v) for k, v in sorted(self.scores.items())}
        if d["race"] is None:  # other searches' steps (and checkpoints written before races kept a log)
            del d["race"]
        return d

    @staticmethod
    def from_json(d: dict) -> "Step":
        scores = {int(k): Score(**v) for k, v in d["scores"].items()}
        return Step(d["step"], d["base"], d["base_loss"], scores, d["chosen"], d["pattern"], d["swept"], d.get("race"))


@dataclass(frozen=True)
class Race:
    """Settings of `search="race"`: every candidate is scored on a growing share of the calibration
    batches (first `first` sequences, then twice as many each round, in a fixed shuffled order) and
    dropped once it is worse than the step's current best by more than a bound; the survivors and the
    winner are scored on every sequence.

    The bound is a one-sided Student t test on the paired per-sequence differences, with the finite
    population correction (the question is about the mean over *these* calibration sequences, so the
    standard error shrinks to 0 as they are all seen), at level `alpha / (looks x (candidates - 1))`:
    by the union bound, the chance that a step drops the candidate with the lowest loss over every
    sequence (Algorithm 1's choice) is at most `alpha`, however many rounds and candidates it has.

    `tolerance` (nats per step, or "auto": `AUTO_TOLERANCE_SE` paired standard errors, see there) adds an
    indifference zone: after a round, the step ends and commits the current best once, for every candidate
    still racing, the upper bound of (best's loss - its loss) over all sequences, at the same level, is at
    most the tolerance. Then, with probability at least 1 - alpha, the committed candidate is no more than
    `tolerance` worse than the step's best over these sequences. The same level serves both rules at no
    extra cost: for the best candidate c* and the committed b, a false drop of c* and a false "b is within
    the tolerance of c*" both need b - c*'s t statistic below -q, one tail of one test per round and pair.
    None or 0: no early end, the race as without it.
    """

    alpha: float = 0.05
    first: int = 4
    tolerance: float | str | None = None

    def __post_init__(self):
        if not 0.0 < self.alpha < 0.5:
            raise ValueError("race alpha must be in (0, 0.5)")
        if self.first < 2:
            raise ValueError("a race's first round needs at least 2 sequences")
        t = self.tolerance
        if not (t is None or t == "auto" or (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0)):
            raise ValueError("a race's tolerance is a number of nats >= 0, 'auto' or None")


class Evaluator(Protocol):
    def score(self, pattern: str) -> Score: ...

    # Called once per step with the committed pattern before its candidates are scored, so an
    # evaluator can cache what every candidate shares with it (layer inputs before the flipped layer).
    def set_base(self, pattern: str) -> Score: ...

    # For search="race" only: `num_batches`, `batch_size`, and `score(pattern, batches=[...])`, which
    # scores those batches (of `batch_size` consecutive sequences) and returns their sequences' losses.


def candidates(pattern: str, fixed_shared: frozenset[int] = frozenset()) -> list[int]:
    """Layers that may still be flipped to S: full, not layer 0, with indexer weights."""
    return [i for i in full_layers(pattern) if i != 0 and i not in fixed_shared]


def _pick(scores: dict[int, Score]) -> int:
    # Lowest loss among the candidates scored on every sequence; ties go to the lower layer id so the
    # result never depends on dict order.
    complete = [layer for layer, sc in scores.items() if sc.sequences is None]
    return min(complete, key=lambda layer: (scores[layer].loss, layer))


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


def race_rounds(num_batches: int, first_batches: int) -> list[int]:
    """Batches seen after each round: first_batches, doubling, ending with every batch."""
    rounds, r = [], max(1, first_batches)
    while r < num_batches:
        rounds.append(r)
        r *= 2
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
    search: str = "naive",
    done: list[Step] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_candidate: Callable[[int, int, int], None] | None = None,
    rescore_best: int = 2,
    allowed: Callable[[str], bool] | None = None,
    race: Race | None = None,
) -> tuple[Score, list[Step]]:
    """Flip one layer per step to S until `num_full` layers are full. Returns (score of `start`, steps).

    search="naive": every candidate is scored at every step (Algorithm 1).
    search="exact": the same decisions as naive; only the evaluator differs (it reuses prefixes).
    search="fast": after the first full sweep, each step re-scores the `rescore_best` candidates with
    the lowest last-known delta plus the two full neighbours of the layer just committed, then every
    candidate whose last-known delta, lowered by the largest fall per step seen among the re-scored
    candidates times the steps since it was scored, comes within one paired standard error of the best
    fresh delta. Deltas are loss minus the step's base loss.
    search="race": every candidate at every step, raced over calibration sequences (see `Race`).
    `allowed`: patterns the target can run; a candidate whose flip it rejects is never scored, and the
    search stops early if no candidate is left.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}")
    race = race or Race()
    steps = list(done or [])
    pattern = steps[-1].pattern if steps else start
    base_score = evaluator.set_base(start)
    start_score = base_score
    if steps:
        base_score = evaluator.set_base(pattern)
    # For the fast search: layer -> (delta, step it was scored at, per-sequence deltas), rebuilt from
    # replayed steps (a step's base is the previous step's choice).
    memory: dict[int, tuple[float, int, list[float]]] = {}
    for i, s in enumerate(steps):
        base_seqs = (steps[i - 1].scores[steps[i - 1].chosen] if i else start_score).seq_losses
        _remember(memory, s.scores, s.base_loss, base_seqs, s.step)
    group = max(1, getattr(evaluator, "parallel", 1))
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

        chosen, log = None, None
        if search == "race":
            scores, chosen, log = _race(cands, score, evaluator, len(base_score.seq_losses), race, progress)
        elif search == "fast" and steps and all(c in memory for c in cands):
            scores = _lazy(pattern, cands, memory, step_no, steps[-1].chosen, base_score.loss, base_score.seq_losses,
                           score, group, rescore_best)
        else:
            scores = dict(zip(cands, score(cands)))
        _remember(memory, scores, base_score.loss, base_score.seq_losses, step_no)
        if chosen is None:
            chosen = _pick(scores)
        new_pattern = flip(pattern, chosen)
        step = Step(step_no, pattern, base_score.loss, scores, chosen, new_pattern, len(scores) == len(cands), log)
        steps.append(step)
        pattern = new_pattern
        if on_step:
            on_step(step)
        if pattern.count(FULL) > num_full:
            base_score = evaluator.set_base(pattern)
    return start_score, steps


def _remember(memory: dict, scores: dict[int, Score], base_loss: float, base_seqs: list[float], step_no: int) -> None:
    for layer, sc in scores.items():
        if sc.sequences is None:  # scored on every sequence
            memory[layer] = (sc.loss - base_loss, step_no, [x - b for x, b in zip(sc.seq_losses, base_seqs)])


def _lazy(pattern, cands, memory, step_no, last_chosen, base_loss, base_seqs, score, group, rescore_best) -> dict[int, Score]:
    """The fast search's step: re-score the likely winners, then whatever stale delta could still win."""

    def stale(c):
        return memory[c][0]

    def age(c):
        return step_no - memory[c][1]

    ranked = sorted(cands, key=lambda c: (stale(c), c))
    neighbours = _neighbours(pattern, last_chosen, cands)
    first = sorted(set(ranked[:rescore_best] + neighbours))
    scores = dict(zip(first, score(first)))
    fresh = {c: [x - b for x, b in zip(scores[c].seq_losses, base_seqs)] for c in scores}

    def fall() -> float:
        # The largest fall of a delta per step among the re-scored candidates whose runs did not just
        # merge (sharing a layer can lower other layers' deltas); 0 when every delta rose.
        falls = [(stale(c) - (scores[c].loss - base_loss)) / age(c) for c in scores if c not in neighbours]
        return max([0.0] + falls)

    def spread(c, best) -> float:
        # One paired standard error, over calibration sequences, of c's stale delta against the best's
        # fresh one: a gap this small the calibration sequences cannot tell from a tie.
        return mean_se([x - y for x, y in zip(memory[c][2], fresh[best])])[1] or 0.0

    pending: dict[int, Score] = {}
    while True:
        leader = min(scores, key=lambda c: (scores[c].loss, c))
        best = scores[leader].loss - base_loss
        drop = fall()
        bound = {c: stale(c) - drop * age(c) - spread(c, leader) for c in cands if c not in scores}
        doubt = sorted((c for c in bound if bound[c] < best), key=lambda c: (bound[c], c))
        if not doubt:
            return scores
        # One candidate at a time, always the most doubtful; with several workers the next few are
        # scored together, but only the ones this rule reaches are kept, so the steps never depend on
        # the number of workers.
        layer = doubt[0]
        if layer not in pending:
            batch = [c for c in doubt if c not in pending][:group]
            pending.update(zip(batch, score(batch)))
        scores[layer] = pending[layer]
        fresh[layer] = [x - b for x, b in zip(scores[layer].seq_losses, base_seqs)]


def _auto_tolerance(stats: dict[int, tuple[float, float | None]], n: int, num_sequences: int) -> float:
    """`AUTO_TOLERANCE_SE` paired standard errors over all `num_sequences`, from the first round's `n`
    sequences: `stats` holds each candidate's (gap, standard error without the finite-population
    correction) against the leader."""
    sds = sorted(se * math.sqrt(n) for _, se in stats.values() if se is not None)
    if not sds:
        return 0.0
    mid = len(sds) // 2
    median = sds[mid] if len(sds) % 2 else 0.5 * (sds[mid - 1] + sds[mid])
    return AUTO_TOLERANCE_SE * median / math.sqrt(num_sequences)


def _race(cands, score, evaluator, num_sequences: int, race: Race, progress: dict) -> tuple[dict[int, Score], int | None, dict | None]:
    """Algorithm 1's step with early stopping: every candidate is scored on a growing set of sequences
    and dropped once the bound says it is worse than the current best over *all* sequences; with a
    tolerance, the step also ends once every candidate left is within it of the best (see `Race`).
    Returns (scores, chosen, log); chosen is None where every candidate was scored whole, and log (see
    `Step.race`) is None where nothing was raced."""
    if len(cands) == 1:
        return dict(zip(cands, score(cands))), None, None
    batch_seqs = _batch_sequences(evaluator, num_sequences)
    num_batches = len(batch_seqs)
    order = race_order(num_batches)
    rounds = race_rounds(num_batches, math.ceil(race.first / len(batch_seqs[0])))
    if len(rounds) == 1:  # too few sequences to race: Algorithm 1's step
        return dict(zip(cands, score(cands))), None, None
    q_level = race.alpha / ((len(rounds) - 1) * (len(cands) - 1))
    seen: dict[int, dict[int, float]] = {c: {} for c in cands}
    full: dict[int, Score] = {}
    alive = list(cands)
    tolerance = race.tolerance if isinstance(race.tolerance, (int, float)) else None
    log = {"sequences": num_sequences, "tolerance": tolerance, "ended_after": None, "dropped": []}

    def mean(c: int) -> float:
        return math.fsum(seen[c].values()) / len(seen[c])

    done = 0
    for r in rounds:
        new = order[done:r]
        final = r == num_batches
        partial = list(alive)
        if final:
            # The current leader is the likely winner, and the winner needs a score on every batch in
            # one piece (its layer inputs become the next step's cache): score it whole now. An
            # evaluator that kept what it computed for the leader's earlier batches scores only the rest.
            leader = min(alive, key=lambda c: (mean(c), c))
            full[leader] = score([leader])[0]
            seen[leader] = full[leader].by_sequence()
            partial.remove(leader)
        if partial:
            for c, sc in zip(partial, score(partial, batches=new)):
                ids = [i for b in new for i in batch_seqs[b]]
                if len(sc.seq_losses) != len(ids):
                    raise ValueError("a partial score returned a different number of sequences than its batches hold")
                seen[c].update(zip(ids, sc.seq_losses))
        done = r
        if final:
            break
        best = min(alive, key=lambda c: (mean(c), c))
        n = len(seen[best])
        q = t_quantile(q_level, n - 1)
        stats = {c: mean_se(paired_differences(seen[c], seen[best]), num_sequences) for c in alive if c != best}
        if race.tolerance == "auto" and log["tolerance"] is None:
            log["tolerance"] = tolerance = _auto_tolerance(
                {c: mean_se(paired_differences(seen[c], seen[best])) for c in stats}, n, num_sequences)
        kept = []
        for c in alive:
            if c != best:
                gap, se = stats[c]
                if se is not None and gap - q * se > 0:
                    log["dropped"].append({"candidate": c, "sequences": n, "reason": WORSE_BY_BOUND})
                    continue
            kept.append(c)
        progress["done"] += len(alive) - len(kept)
        alive = kept
        if len(alive) == 1:
            break
        # The indifference zone: every candidate left is, at this level, at most `tolerance` better than
        # the best over all sequences (its upper bound on best - it: -gap + q * se).
        if tolerance and all(stats[c][1] is not None and q * stats[c][1] - stats[c][0] <= tolerance
                             for c in alive if c != best):
            log["ended_after"] = n
            log["dropped"] += [{"candidate": c, "sequences": n, "reason": WITHIN_TOLERANCE} for c in alive if c != best]
            progress["done"] += len(alive) - 1
            alive = [best]
            break
    winner = min(alive, key=lambda c: (full[c].loss if c in full else mean(c), c))
    if winner not in full:
        # Scored whole: an evaluator that kept what it computed on the winner's batches (see
        # runner.PatternRunner.score) runs only the sequences it has not seen.
        full[winner] = score([winner])[0]
    scores = {}
    for c in cands:
        if c in full:
            scores[c] = full[c]
        else:
            ids = sorted(seen[c])
            losses = [seen[c][i] for i in ids]
            scores[c] = Score(math.fsum(losses) / len(losses), losses, None,
                              None if len(ids) == num_sequences else ids)
    return scores, winner, log


def race_summary(steps: list[Step], race: Race, positions: list[int] | None = None) -> dict:
    """What a race's tolerance can have cost: per step, the tolerance in nats, whether it ended the step
    early, and what was dropped when and why (candidates named by decoder layer). Each step commits a
    candidate at most its tolerance worse than that step's best (with probability 1 - alpha), so the
    loss given away against the greedy best at each step is at most the sum over the steps the tolerance
    ended; steps x tolerance bounds it before the run."""
    layer = (lambda p: p) if positions is None else (lambda p: positions[p])
    rows, given = [], 0.0
    for s in steps:
        log = s.race or {}
        ended = log.get("ended_after") is not None
        if ended:
            given += log["tolerance"]
        rows.append({"step": s.step, "tolerance": log.get("tolerance"), "ended_after": log.get("ended_after"),
                     "dropped": [{**d, "candidate": layer(d["candidate"])} for d in log.get("dropped", [])]})
    tols = [r["tolerance"] for r in rows if r["tolerance"] is not None]
    return {
        "steps": rows,
        "steps_ended_early": sum(r["ended_after"] is not None for r in rows),
        "given_away_at_most": given,
        # The bound before the run: every step ended early at its tolerance.
        "steps_times_tolerance": math.fsum(tols) if race.tolerance == "auto" else len(steps) * (race.tolerance or 0.0),
    }


def paired(a: Score, b: Score) -> tuple[float, float | None]:
    """Mean over the sequences both were scored on of a - b, and its standard error (None with fewer
    than two sequences)."""
    return mean_se(paired_differences(a.by_sequence(), b.by_sequence()))


def path(start: str, start_loss: float, steps: list[Step], positions: list[int] | None = None) -> list[dict]:
    """The committed pattern after every step: one pattern per number of full layers, nested F-sets,
    with how surely each step's choice beat the runner-up (both named by decoder layer: `positions` maps
    pattern positions to decoder layers; default: the same)."""
    layer = (lambda p: p) if positions is None else (lambda p: None if p is None else positions[p])
    rows = [{"num_full": start.count(FULL), "pattern": start, "loss": start_loss, "step": 0}]
    for s in steps:
        c = s.confidence
        rows.append({
            "num_full": s.pattern.count(FULL), "pattern": s.pattern, "loss": s.loss, "step": s.step,
            "chosen": layer(s.chosen), "runner_up": layer(c.runner_up), "gap": c.gap, "gap_se": c.se, "decided": c.decided,
        })
    return rows

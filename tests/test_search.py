"""The greedy search against fake evaluators whose answers are known."""

import itertools
import math

import pytest

from indexcache_calib.pattern import FULL, flip, full_layers
from indexcache_calib.search import (
    AUTO_TOLERANCE_SE, DECIDED_SE, Race, Score, Step, candidates, confidence, greedy_search, path, race_order, race_rounds,
    race_summary,
)
from indexcache_calib.stats import mean_se, t_quantile


class Additive:
    """Loss = base + cost of each shared layer, plus a bonus when two adjacent layers are both shared.
    Counts every pattern scored."""

    def __init__(self, costs, pair_bonus=0.0):
        self.costs, self.pair_bonus, self.scored = costs, pair_bonus, []

    def loss(self, pattern):
        shared = [i for i, c in enumerate(pattern) if c == "S"]
        pairs = sum(1 for i in shared if i + 1 in shared)
        return 1.0 + sum(self.costs[i] for i in shared) - self.pair_bonus * pairs

    def score(self, pattern):
        self.scored.append(pattern)
        return Score(self.loss(pattern), [self.loss(pattern)])

    def set_base(self, pattern):
        return Score(self.loss(pattern), [self.loss(pattern)])


def brute_force_greedy(costs, num_full):
    ev = Additive(costs)
    pattern = "F" * len(costs)
    while pattern.count("F") > num_full:
        cands = [i for i in range(1, len(costs)) if pattern[i] == "F"]
        best = min(cands, key=lambda i: (ev.loss(pattern[:i] + "S" + pattern[i + 1 :]), i))
        pattern = pattern[:best] + "S" + pattern[best + 1 :]
    return pattern


def test_greedy_flips_cheapest_layers_in_order():
    costs = [0, 0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7]
    ev = Additive(costs)
    base, steps = greedy_search("F" * 8, 3, ev, search="naive")
    assert base.loss == 1.0
    assert [s.chosen for s in steps] == [6, 2, 4, 5, 1]
    assert steps[-1].pattern == "FSSFSSSF"
    assert steps[-1].pattern == brute_force_greedy(costs, 3)
    # Algorithm 1 scores every remaining candidate at every step: 7 + 6 + 5 + 4 + 3.
    assert len(ev.scored) == 25


def test_layer_zero_and_fixed_shared_are_never_candidates():
    costs = [0.0, 0.3, 0.0, 0.2, 0.4]
    ev = Additive(costs)
    start = "FFSFF"
    _, steps = greedy_search(start, 1, ev, fixed_shared=frozenset({2}), search="naive")
    for s in steps:
        assert 0 not in s.scores and 2 not in s.scores
    assert steps[-1].pattern == "FSSSS"


def test_path_is_nested_and_covers_every_ratio():
    costs = [0, 0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7, 0.4, 0.6]
    base, steps = greedy_search("F" * 10, 1, Additive(costs), search="naive")
    rows = path("F" * 10, base.loss, steps)
    assert [r["num_full"] for r in rows] == list(range(10, 0, -1))
    for a, b in itertools.pairwise(rows):
        assert set(full_layers(b["pattern"])) < set(full_layers(a["pattern"]))
    assert rows[-1]["pattern"] == "F" + "S" * 9


@pytest.mark.parametrize("seed", range(5))
def test_fast_search_matches_naive_on_increasing_costs_with_fewer_evaluations(seed):
    import random

    rng = random.Random(seed)
    costs = [0] + [rng.random() for _ in range(15)]
    naive, fast = Additive(costs), Additive(costs)
    _, s_naive = greedy_search("F" * 16, 2, naive, search="naive")
    _, s_fast = greedy_search("F" * 16, 2, fast, search="fast")
    assert [s.pattern for s in s_fast] == [s.pattern for s in s_naive]
    # One full sweep, then at most the best two plus the two neighbours of the committed layer.
    assert len(fast.scored) <= 15 + 4 * (len(s_fast) - 1) < len(naive.scored)


def test_fast_search_rescans_when_the_ranking_is_in_doubt():
    # Sharing a neighbour pair pays a bonus, so stale deltas understate some candidates.
    costs = [0, 0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36]
    naive, fast = Additive(costs, pair_bonus=0.2), Additive(costs, pair_bonus=0.2)
    _, s_naive = greedy_search("F" * 8, 2, naive, search="naive")
    _, s_fast = greedy_search("F" * 8, 2, fast, search="fast")
    assert [s.pattern for s in s_fast] == [s.pattern for s in s_naive]


def test_exact_search_scores_every_candidate_like_naive():
    costs = [0, 0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36]
    runs = {s: Additive(costs, pair_bonus=0.2) for s in ("naive", "exact")}
    steps = {s: greedy_search("F" * 8, 1, ev, search=s)[1] for s, ev in runs.items()}
    assert [s.to_json() for s in steps["exact"]] == [s.to_json() for s in steps["naive"]]
    assert runs["exact"].scored == runs["naive"].scored


def test_ties_go_to_the_lower_layer():
    _, steps = greedy_search("FFFF", 3, Additive([0, 0.2, 0.2, 0.2]), search="naive")
    assert steps[0].chosen == 1


def test_resume_from_recorded_steps_gives_the_same_answer_without_rescoring_them():
    costs = [0, 0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7]
    full_run = Additive(costs)
    _, all_steps = greedy_search("F" * 8, 2, full_run, search="naive")
    replayed = [Step.from_json(s.to_json()) for s in all_steps[:3]]
    resumed = Additive(costs)
    _, steps = greedy_search("F" * 8, 2, resumed, search="naive", done=replayed)
    assert [s.pattern for s in steps] == [s.pattern for s in all_steps]
    assert len(resumed.scored) == len(full_run.scored) - sum(len(s.scores) for s in all_steps[:3])


def test_candidates():
    assert candidates("FFSFS") == [1, 3]
    assert candidates("FFSFS", frozenset({3})) == [1]
    assert FULL == "F"


# -- the fast search where sharing a layer lowers other layers' deltas ------------------------------

class FallingDeltas(Additive):
    """Every pair of shared layers lowers the loss by `fall`: each step lowers every remaining candidate's
    delta by the same amount, so a delta last measured k steps ago overstates the present one by k x fall."""

    def __init__(self, costs, fall):
        super().__init__(costs)
        self.fall = fall

    def loss(self, pattern):
        k = pattern.count("S")
        return super().loss(pattern) - self.fall * k * (k - 1) / 2


@pytest.mark.parametrize("costs,fall", [
    ([0, 0.2, 0.73, 0.69, 0.95, 0.34, 0.33, 0.76, 0.69, 0.37], 0.07),
    ([0, 0.97, 0.11, 0.76, 0.24, 0.99, 0.12, 0.89, 0.71, 0.87], 0.1),
    ([0, 0.74, 0.86, 0.26, 1.0, 0.27, 0.7, 0.18, 0.78, 0.24], 0.07),
])
def test_fast_search_rescores_stale_deltas_that_may_have_fallen(costs, fall):
    # Trusting stale deltas picks another layer than Algorithm 1 on each of these (checked when they were
    # chosen): a candidate last scored several steps ago looks worse than it now is.
    naive, fast = FallingDeltas(costs, fall), FallingDeltas(costs, fall)
    _, s_naive = greedy_search("F" * 10, 2, naive, search="naive")
    _, s_fast = greedy_search("F" * 10, 2, fast, search="fast")
    assert [s.chosen for s in s_fast] == [s.chosen for s in s_naive]
    assert len(fast.scored) < len(naive.scored)


@pytest.mark.parametrize("seed", range(20))
def test_fast_search_matches_naive_whenever_deltas_fall_alike(seed):
    import random

    rng = random.Random(seed)
    costs, fall = [0] + [rng.uniform(0.1, 1.0) for _ in range(11)], rng.uniform(0, 0.1)
    _, s_naive = greedy_search("F" * 12, 2, FallingDeltas(costs, fall), search="naive")
    _, s_fast = greedy_search("F" * 12, 2, FallingDeltas(costs, fall), search="fast")
    assert [s.chosen for s in s_fast] == [s.chosen for s in s_naive]


class Drifting:
    """Per-sequence losses where every pair of shared layers moves each sequence's loss by its own small
    amount: deltas drift from step to step, by different amounts for different layers and sequences,
    and most candidates are within a few standard errors of each other (like the 48-layer model)."""

    def __init__(self, costs, num_sequences, seed):
        import random

        rng = random.Random(seed)
        n = len(costs)
        self.costs, self.num_sequences, self.scored = costs, num_sequences, 0
        self.wobble = [[0.02 * rng.gauss(0, 1) for _ in range(num_sequences)] for _ in range(n)]
        self.pair = {(a, b): [0.01 * rng.gauss(0, 1) for _ in range(num_sequences)] for a in range(n) for b in range(a + 1, n)}

    def seq_loss(self, pattern, j):
        shared = [i for i, c in enumerate(pattern) if c == "S"]
        own = sum(self.costs[i] + self.wobble[i][j] for i in shared)
        return 1.0 + own + sum(self.pair[(a, b)][j] for x, a in enumerate(shared) for b in shared[x + 1:])

    def set_base(self, pattern):
        losses = [self.seq_loss(pattern, j) for j in range(self.num_sequences)]
        return Score(math.fsum(losses) / len(losses), losses)

    def score(self, pattern):
        self.scored += 1
        return self.set_base(pattern)


@pytest.mark.parametrize("seed", range(8))
def test_fast_search_rescores_candidates_the_sequences_cannot_tell_from_the_best(seed):
    # Trusting stale deltas (even lowered by the largest fall seen) forks from Algorithm 1 on most of these
    # draws (checked when they were written); re-scoring whatever is within one paired SE of the best does not.
    import random

    costs = [0] + [random.Random(seed).uniform(0.0, 0.05) for _ in range(13)]
    naive, fast = Drifting(costs, 8, seed), Drifting(costs, 8, seed)
    _, s_naive = greedy_search("F" * 14, 2, naive, search="naive")
    _, s_fast = greedy_search("F" * 14, 2, fast, search="fast")
    assert [s.chosen for s in s_fast] == [s.chosen for s in s_naive]
    assert fast.scored < naive.scored


# -- per-step confidence -------------------------------------------------------------------------------

def test_confidence_names_the_candidate_beaten_by_the_fewest_standard_errors():
    chosen = Score(1.0, [1.0, 1.0, 1.0, 1.0])
    steady = Score(1.15, [1.1, 1.2, 1.1, 1.2])  # gap 0.15, SE 0.0289: 5.2 SE
    noisy = Score(1.05, [1.0, 1.2, 0.9, 1.1])  # gap 0.05, SE 0.0645: 0.77 SE
    c = confidence({3: chosen, 5: steady, 7: noisy}, 3)
    assert c.runner_up == 7 and c.sequences == 4 and not c.decided
    assert c.gap == pytest.approx(0.05) and c.se == pytest.approx(0.0645497, rel=1e-5)
    c = confidence({3: chosen, 5: steady}, 3)
    assert c.runner_up == 5 and c.decided and c.z == pytest.approx(0.15 / 0.0288675, rel=1e-5)
    # Only the sequences both were scored on are compared (a race's dropped candidate).
    partial = Score(1.3, [1.3, 1.3], sequences=[2, 0])
    c = confidence({3: chosen, 9: partial}, 3)
    assert (c.runner_up, c.sequences, c.gap, c.se) == (9, 2, pytest.approx(0.3), 0.0) and c.decided
    assert confidence({3: chosen}, 3).decided  # nothing else to choose


def test_t_quantiles_and_the_finite_population_standard_error():
    assert t_quantile(0.025, 3) == pytest.approx(3.182446, rel=1e-6)
    assert t_quantile(0.005, 10) == pytest.approx(3.169273, rel=1e-6)
    assert t_quantile(0.001, 30) == pytest.approx(3.385185, rel=1e-6)
    d = [0.1, 0.3, 0.2, 0.4]
    assert mean_se(d)[1] == pytest.approx(0.0645497, rel=1e-5)
    assert mean_se(d, population=4)[1] == 0.0  # every value seen: the mean is known
    assert mean_se(d, population=8)[1] == pytest.approx(0.0645497 * (4 / 7) ** 0.5, rel=1e-5)


# -- racing over calibration sequences -----------------------------------------------------------------

class Noisy:
    """Per-sequence losses: a shared layer i costs costs[i] plus a wobble of size `noise` that differs by
    sequence (fixed by the seed). Scores whole or on some batches, counting sequences scored."""

    def __init__(self, costs, num_sequences, noise, seed=0, batch_size=1):
        import random

        rng = random.Random(seed)
        self.costs, self.batch_size = costs, batch_size
        self.wobble = [[noise * rng.gauss(0, 1) for _ in range(num_sequences)] for _ in costs]
        self.num_sequences = num_sequences
        self.num_batches = -(-num_sequences // batch_size)
        self.sequences_scored = 0

    def seq_loss(self, pattern, j):
        return 1.0 + sum(self.costs[i] + self.wobble[i][j] for i, c in enumerate(pattern) if c == "S")

    def _score(self, pattern, ids):
        losses = [self.seq_loss(pattern, j) for j in ids]
        return Score(math.fsum(losses) / len(losses), losses)

    def score(self, pattern, batches=None):
        if batches is None:
            ids = list(range(self.num_sequences))
        else:
            ids = [j for b in batches for j in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_sequences))]
        self.sequences_scored += len(ids)
        return self._score(pattern, ids)

    def set_base(self, pattern):
        return self._score(pattern, list(range(self.num_sequences)))


def test_race_takes_algorithm_1s_decisions_for_a_fraction_of_the_sequences():
    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15, 0.80, 0.35]
    naive, raced = Noisy(costs, 64, 0.02), Noisy(costs, 64, 0.02)
    _, s_naive = greedy_search("F" * 10, 2, naive, search="naive")
    _, s_race = greedy_search("F" * 10, 2, raced, search="race")
    assert all(s.confidence.decided for s in s_naive)
    assert [s.chosen for s in s_race] == [s.chosen for s in s_naive]
    assert raced.sequences_scored < 0.5 * naive.sequences_scored
    for r, n in zip(s_race, s_naive):
        # The winner is scored on every sequence, exactly as Algorithm 1 scores it; losers on fewer.
        assert r.scores[r.chosen] == n.scores[n.chosen] and r.loss == n.loss
        dropped = [c for c, sc in r.scores.items() if sc.sequences is not None]
        assert dropped and all(len(r.scores[c].seq_losses) < 64 for c in dropped)
        order = race_order(64)
        for c in dropped:  # a dropped candidate saw a prefix of the race order, and those losses are exact
            ids = r.scores[c].sequences
            assert sorted(order[: len(ids)]) == ids
            assert r.scores[c].seq_losses == [naive.seq_loss(flip(r.base, c), j) for j in ids]


@pytest.mark.parametrize("seed", range(10))
def test_race_matches_algorithm_1_on_every_decided_step_of_a_noisy_search(seed):
    import random

    rng = random.Random(seed)
    costs = [0] + [rng.uniform(0.0, 0.2) for _ in range(9)]
    _, s_naive = greedy_search("F" * 10, 2, Noisy(costs, 48, 0.05, seed), search="naive")
    _, s_race = greedy_search("F" * 10, 2, Noisy(costs, 48, 0.05, seed), search="race")
    for r, n in zip(s_race, s_naive):
        if n.confidence.decided:
            assert r.chosen == n.chosen
        if r.chosen != n.chosen:
            break  # the paths part at a step no number of these sequences decides


def test_race_in_batches_maps_every_loss_to_its_sequence():
    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20]
    ev = Noisy(costs, 21, 0.05, batch_size=4)  # 6 batches, the last holding one sequence
    _, steps = greedy_search("F" * 6, 2, ev, search="race", race=Race(first=8))
    for s in steps:
        for c, sc in s.scores.items():
            assert sc.seq_losses == [ev.seq_loss(flip(s.base, c), j) for j in sorted(sc.by_sequence())]


def test_race_resumes_from_recorded_steps():
    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15]
    whole = Noisy(costs, 32, 0.05)
    _, all_steps = greedy_search("F" * 8, 2, whole, search="race")
    replayed = [Step.from_json(s.to_json()) for s in all_steps[:3]]
    resumed = Noisy(costs, 32, 0.05)
    _, steps = greedy_search("F" * 8, 2, resumed, search="race", done=replayed)
    assert [s.to_json() for s in steps] == [s.to_json() for s in all_steps]
    assert resumed.sequences_scored < whole.sequences_scored


def test_race_rounds_double_and_the_order_is_fixed():
    assert race_rounds(64, 4) == [4, 8, 16, 32, 64]
    assert race_rounds(10, 4) == [4, 8, 10]
    assert race_rounds(4, 4) == [4]
    assert race_order(16) == race_order(16) and sorted(race_order(16)) == list(range(16))
    with pytest.raises(ValueError):
        Race(first=1)


def test_a_search_replayed_on_a_recorded_exact_trace_makes_the_same_decisions_and_counts_its_work():
    """bench replays searches on exact's recorded trace (per-sequence losses of every candidate of every
    step); the replay must decide as the search does live, and charge each candidate from its own layer."""
    from dataclasses import asdict

    from indexcache_calib.bench import replay

    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15, 0.80, 0.35]
    base, steps = greedy_search("F" * 10, 2, Noisy(costs, 64, 0.02), search="exact")
    trace = {"base": asdict(base), "steps": [s.to_json() for s in steps], "floor": 2}
    for search, opts in (("exact", {}), ("fast", {}), ("race", {"race": Race(0.05, 4)})):
        live_ev = Noisy(costs, 64, 0.02)
        _, live = greedy_search("F" * 10, 2, live_ev, search=search, **opts)
        r = replay(trace, 10, search, **opts)
        assert r["left_path_at"] is None and [s.chosen for s in r["steps"]] == [s.chosen for s in live]
    # exact: every candidate of every step runs from its own layer to the last, on all 64 sequences.
    runs = sum(10 - c for s in steps for c in s.scores)
    assert replay(trace, 10, "exact")["layer_forwards"] >= runs * 64
    assert replay(trace, 10, "race", race=Race(0.05, 4))["layer_forwards"] < replay(trace, 10, "exact")["layer_forwards"]


# -- racing with a tolerance (an indifference zone) ----------------------------------------------------

class Reusing(Noisy):
    """Counts sequences as the runner runs them: a candidate scored whole after partial scores this step
    runs only the sequences it was not scored on (what was computed is kept), and committing costs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[str, set[int]] = {}

    def score(self, pattern, batches=None):
        ids = list(range(self.num_sequences)) if batches is None else [
            j for b in batches for j in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_sequences))]
        done = self.kept.setdefault(pattern, set())
        self.sequences_scored += len(set(ids) - done)
        done.update(ids)
        return self._score(pattern, ids)

    def set_base(self, pattern):
        self.kept = {}
        return super().set_base(pattern)


def _true_losses(ev, step):
    return {c: math.fsum(ev.seq_loss(flip(step.base, c), j) for j in range(ev.num_sequences)) / ev.num_sequences
            for c in step.scores}


@pytest.mark.parametrize("tolerance", [0.004, "auto"])
def test_a_race_ended_by_its_tolerance_commits_within_it_of_the_steps_best_at_the_stated_confidence(tolerance):
    # Near-ties over many seeded steps: every candidate costs within a few paired SE of the others.
    import random

    alpha, errors, ended, steps_seen = 0.2, 0, 0, 0
    for seed in range(60):
        rng = random.Random(seed)
        ev = Noisy([0] + [rng.uniform(0, 0.02) for _ in range(9)], 64, 0.02, seed)
        _, steps = greedy_search("F" * 10, 4, ev, search="race", race=Race(alpha, 4, tolerance))
        for s in steps:
            true = _true_losses(ev, s)  # every candidate over every sequence: the step's best is known
            tol = s.race["tolerance"]
            assert tol > 0 and s.scores[s.chosen].sequences is None  # the committed loss is exact
            errors += true[s.chosen] - min(true.values()) > tol + 1e-12
            ended += s.race["ended_after"] is not None
            steps_seen += 1
    assert steps_seen == 360 and ended >= 0.2 * steps_seen  # the zone ends many steps early
    # A step errs with probability at most alpha (the union bound makes it far rarer in practice).
    assert errors / steps_seen <= alpha + 0.03


def test_the_tolerance_holds_where_every_other_candidate_sits_just_outside_it():
    # One best candidate; every other one 1.5 tolerances worse. Committing any of them is an error.
    import random

    alpha, tol, trials, errors, ended = 0.2, 0.004, 300, 0, 0
    for seed in range(trials):
        costs = [0] + [1.5 * tol] * 8
        costs[1 + random.Random(seed).randrange(8)] = 0.0
        ev = Noisy(costs, 64, 0.02, seed)
        _, (s,) = greedy_search("F" * 9, 8, ev, search="race", race=Race(alpha, 4, tol))
        true = _true_losses(ev, s)
        errors += true[s.chosen] - min(true.values()) > tol
        ended += s.race["ended_after"] is not None
    assert ended >= 0.05 * trials and errors / trials <= alpha + 0.03


def test_a_tolerance_ends_near_ties_earlier_and_records_what_it_dropped():
    costs = [0, 0.010, 0.011, 0.012, 0.013, 0.30, 0.40, 0.50, 0.60, 0.70]  # four near-ties, five clearly worse
    plain, zoned = Reusing(costs, 64, 0.02, seed=3), Reusing(costs, 64, 0.02, seed=3)
    _, s_plain = greedy_search("F" * 10, 6, plain, search="race")
    _, s_zoned = greedy_search("F" * 10, 6, zoned, search="race", race=Race(tolerance=0.015))
    assert zoned.sequences_scored < 0.8 * plain.sequences_scored
    assert any(s.race["ended_after"] for s in s_zoned) and not any(s.race["ended_after"] for s in s_plain)
    for s in s_zoned:
        log = s.race
        assert log["tolerance"] == 0.015 and log["sequences"] == 64
        reasons = {d["candidate"]: d["reason"] for d in log["dropped"]}
        assert s.chosen not in reasons and set(reasons) <= set(s.scores)
        for d in log["dropped"]:  # dropped after a round, and scored on exactly those sequences
            assert d["reason"] in ("worse by bound", "within tolerance at commit")
            assert d["sequences"] == len(s.scores[d["candidate"]].seq_losses) < 64
        if log["ended_after"] is not None:
            within = [c for c, r in reasons.items() if r == "within tolerance at commit"]
            assert within and all(len(s.scores[c].seq_losses) == log["ended_after"] for c in within)
        else:
            assert "within tolerance at commit" not in reasons.values()
    summary = race_summary(s_zoned, Race(tolerance=0.015))
    ended = sum(s.race["ended_after"] is not None for s in s_zoned)
    assert summary["steps_ended_early"] == ended and summary["given_away_at_most"] == pytest.approx(0.015 * ended)
    assert summary["steps_times_tolerance"] == pytest.approx(0.015 * len(s_zoned))
    # Replayed from a checkpoint, a race with a tolerance takes the same steps and keeps their logs.
    replayed = [Step.from_json(s.to_json()) for s in s_zoned[:2]]
    _, resumed = greedy_search("F" * 10, 6, Reusing(costs, 64, 0.02, seed=3), search="race", race=Race(tolerance=0.015),
                               done=replayed)
    assert [s.to_json() for s in resumed] == [s.to_json() for s in s_zoned]


@pytest.mark.parametrize("seed", range(4))
def test_a_tolerance_of_zero_is_the_race_without_one(seed):
    import random

    rng = random.Random(seed)
    costs = [0] + [rng.uniform(0.0, 0.05) for _ in range(9)]
    runs = {}
    for tol in (None, 0, 0.0):
        ev = Noisy(costs, 48, 0.05, seed)
        _, steps = greedy_search("F" * 10, 2, ev, search="race", race=Race(tolerance=tol))
        runs[tol] = ([{**s.to_json(), "race": {**s.race, "tolerance": None}} for s in steps], ev.sequences_scored)
    assert runs[None] == runs[0] == runs[0.0]


def test_auto_tolerance_is_two_paired_standard_errors_over_every_sequence_from_the_first_round():
    costs = [0, 0.01, 0.02, 0.03, 0.04]
    ev = Noisy(costs, 32, 0.02, seed=1)
    _, (s, *_) = greedy_search("F" * 5, 2, ev, search="race", race=Race(0.05, 4, "auto"))
    first = race_order(32)[:4]
    seqs = {c: [ev.seq_loss(flip("F" * 5, c), j) for j in first] for c in s.scores}
    leader = min(seqs, key=lambda c: (math.fsum(seqs[c]) / 4, c))
    sds = sorted(mean_se([a - b for a, b in zip(seqs[c], seqs[leader])])[1] * 2 for c in seqs if c != leader)
    assert len(sds) == 3 and s.race["tolerance"] == pytest.approx(AUTO_TOLERANCE_SE * sds[1] / math.sqrt(32), rel=1e-12)
    assert AUTO_TOLERANCE_SE == DECIDED_SE


def test_a_race_refuses_a_bad_tolerance():
    for bad in (-0.1, math.nan, math.inf, "lots"):
        with pytest.raises(ValueError):
            Race(tolerance=bad)

"""The greedy search against fake evaluators whose answers are known."""

import itertools
import math

import pytest

from indexcache_calib.pattern import FULL, flip, full_layers
from indexcache_calib.search import (
    AUTO_SHARE, Race, Score, Step, candidates, confidence, greedy_search, path, race_order, race_rounds,
    race_summary,
)
from indexcache_calib.stats import mean_se, t_quantile


class Fake:
    """What a fake evaluator needs for the race: batches of one sequence each, scores on some of them,
    and a lazy base (`rebase`, `base_losses`), from per-sequence losses `seq_loss(pattern, j)`. Counts
    every pattern scored (`scored`) and every sequence scored (`sequences_scored`)."""

    num_sequences = 1
    batch_size = 1

    @property
    def num_batches(self):
        return -(-self.num_sequences // self.batch_size)

    def _ids(self, batches):
        if batches is None:
            return list(range(self.num_sequences))
        return [j for b in batches for j in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_sequences))]

    def _score(self, pattern, ids):
        losses = [self.seq_loss(pattern, j) for j in ids]
        return Score(math.fsum(losses) / len(losses), losses)

    def score(self, pattern, batches=None):
        ids = self._ids(batches)
        self.scored.append(pattern)
        self.sequences_scored = getattr(self, "sequences_scored", 0) + len(ids)
        return self._score(pattern, ids)

    def set_base(self, pattern):
        self.base = pattern
        return self._score(pattern, self._ids(None))

    def rebase(self, pattern):
        self.base = pattern

    def base_losses(self, batches):
        return [self.seq_loss(self.base, j) for j in self._ids(batches)]


class Additive(Fake):
    """Loss = base + cost of each shared layer, plus a bonus when two adjacent layers are both shared;
    the same on each of `num_sequences` sequences. Counts every pattern scored."""

    def __init__(self, costs, pair_bonus=0.0, num_sequences=1):
        self.costs, self.pair_bonus, self.scored, self.num_sequences = costs, pair_bonus, [], num_sequences

    def loss(self, pattern):
        shared = [i for i, c in enumerate(pattern) if c == "S"]
        pairs = sum(1 for i in shared if i + 1 in shared)
        return 1.0 + sum(self.costs[i] for i in shared) - self.pair_bonus * pairs

    def seq_loss(self, pattern, j):
        return self.loss(pattern)


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


EXACT_RACE = Race(tolerance=0)  # no indifference zone: on noiseless fakes, Algorithm 1's steps


@pytest.mark.parametrize("seed", range(5))
def test_the_race_enters_candidates_lazily_and_matches_naive_on_increasing_costs(seed):
    import random

    rng = random.Random(seed)
    costs = [0] + [rng.random() for _ in range(15)]
    naive, raced = Additive(costs), Additive(costs, num_sequences=4)
    _, s_naive = greedy_search("F" * 16, 2, naive, search="naive")
    _, s_race = greedy_search("F" * 16, 2, raced, search="race", race=EXACT_RACE)
    assert [s.pattern for s in s_race] == [s.pattern for s in s_naive]
    # Every candidate at the first step; then the likeliest one plus the two neighbours of the committed
    # layer, and whatever stale delta could still win (none, with these costs).
    assert len(raced.scored) <= 15 + 3 * (len(s_race) - 1) < len(naive.scored)
    assert all(len(s.race["entered"]) <= 3 for s in s_race[1:])


def test_the_race_enters_more_candidates_when_the_ranking_is_in_doubt():
    # Sharing a neighbour pair pays a bonus, so stale deltas understate some candidates.
    costs = [0, 0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36]
    naive, raced = Additive(costs, pair_bonus=0.2), Additive(costs, pair_bonus=0.2, num_sequences=4)
    _, s_naive = greedy_search("F" * 8, 2, naive, search="naive")
    _, s_race = greedy_search("F" * 8, 2, raced, search="race", race=EXACT_RACE)
    assert [s.pattern for s in s_race] == [s.pattern for s in s_naive]


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


# -- lazy entry where sharing a layer lowers other layers' deltas ------------------------------------

class FallingDeltas(Additive):
    """Every pair of shared layers lowers the loss by `fall`: each step lowers every remaining candidate's
    delta by the same amount, so a delta last measured k steps ago overstates the present one by k x fall."""

    def __init__(self, costs, fall, num_sequences=1):
        super().__init__(costs, num_sequences=num_sequences)
        self.fall = fall

    def loss(self, pattern):
        k = pattern.count("S")
        return super().loss(pattern) - self.fall * k * (k - 1) / 2


@pytest.mark.parametrize("costs,fall", [
    ([0, 0.2, 0.73, 0.69, 0.95, 0.34, 0.33, 0.76, 0.69, 0.37], 0.07),
    ([0, 0.97, 0.11, 0.76, 0.24, 0.99, 0.12, 0.89, 0.71, 0.87], 0.1),
    ([0, 0.74, 0.86, 0.26, 1.0, 0.27, 0.7, 0.18, 0.78, 0.24], 0.07),
])
def test_lazy_entry_lets_in_stale_deltas_that_may_have_fallen(costs, fall):
    # Trusting stale deltas picks another layer than Algorithm 1 on each of these: a candidate last scored
    # several steps ago looks worse than it now is.
    naive, raced = FallingDeltas(costs, fall), FallingDeltas(costs, fall, num_sequences=4)
    _, s_naive = greedy_search("F" * 10, 2, naive, search="naive")
    _, s_race = greedy_search("F" * 10, 2, raced, search="race", race=EXACT_RACE)
    assert [s.chosen for s in s_race] == [s.chosen for s in s_naive]
    assert len(raced.scored) < len(naive.scored)


@pytest.mark.parametrize("seed", range(20))
def test_the_race_matches_naive_whenever_deltas_fall_alike(seed):
    import random

    rng = random.Random(seed)
    costs, fall = [0] + [rng.uniform(0.1, 1.0) for _ in range(11)], rng.uniform(0, 0.1)
    _, s_naive = greedy_search("F" * 12, 2, FallingDeltas(costs, fall), search="naive")
    _, s_race = greedy_search("F" * 12, 2, FallingDeltas(costs, fall, num_sequences=4), search="race", race=EXACT_RACE)
    assert [s.chosen for s in s_race] == [s.chosen for s in s_naive]


def test_lazy_entry_is_what_keeps_the_race_on_algorithm_1s_path():
    # Without its allowance for falling deltas (every waiting candidate trusted at its stale delta), the
    # race leaves Algorithm 1's path on this draw; with it, it does not.
    import indexcache_calib.search as search

    costs, fall = [0, 0.2, 0.73, 0.69, 0.95, 0.34, 0.33, 0.76, 0.69, 0.37], 0.07
    _, s_naive = greedy_search("F" * 10, 2, FallingDeltas(costs, fall), search="naive")
    doubtful = search._doubtful
    try:
        search._doubtful = lambda *a, **k: None
        _, trusting = greedy_search("F" * 10, 2, FallingDeltas(costs, fall, 4), search="race", race=EXACT_RACE)
    finally:
        search._doubtful = doubtful
    assert [s.chosen for s in trusting] != [s.chosen for s in s_naive]


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

class Noisy(Fake):
    """Per-sequence losses: a shared layer i costs costs[i] plus a wobble of size `noise` that differs by
    sequence (fixed by the seed). Scores whole or on some batches, counting sequences scored."""

    def __init__(self, costs, num_sequences, noise, seed=0, batch_size=1):
        import random

        rng = random.Random(seed)
        self.costs, self.batch_size, self.scored, self.sequences_scored = costs, batch_size, [], 0
        self.wobble = [[noise * rng.gauss(0, 1) for _ in range(num_sequences)] for _ in costs]
        self.num_sequences = num_sequences
        self.base_asked = 0

    def seq_loss(self, pattern, j):
        return 1.0 + sum(self.costs[i] + self.wobble[i][j] for i, c in enumerate(pattern) if c == "S")

    def base_losses(self, batches):
        self.base_asked += len(self._ids(batches))
        return super().base_losses(batches)


def test_race_takes_algorithm_1s_decisions_for_a_fraction_of_the_sequences():
    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15, 0.80, 0.35]
    naive, raced = Noisy(costs, 64, 0.02), Noisy(costs, 64, 0.02)
    _, s_naive = greedy_search("F" * 10, 2, naive, search="naive")
    _, s_race = greedy_search("F" * 10, 2, raced, search="race", race=EXACT_RACE)
    assert all(s.confidence.decided for s in s_naive)
    assert [s.chosen for s in s_race] == [s.chosen for s in s_naive]
    assert raced.sequences_scored < 0.2 * naive.sequences_scored
    order = race_order(64)
    for r in s_race:
        for c, sc in r.scores.items():  # every candidate raced a prefix of the race order, with exact losses
            ids = sc.sequences if sc.sequences is not None else list(range(64))
            assert sorted(order[: len(ids)]) == sorted(ids)
            assert sc.seq_losses == [naive.seq_loss(flip(r.base, c), j) for j in ids]
        # The base's losses where the step saw it, and the delta paired over them.
        assert r.base_score.seq_losses == [naive.seq_loss(r.base, j) for j in r.base_score.by_sequence()]


@pytest.mark.parametrize("seed", range(10))
def test_race_matches_algorithm_1_on_every_decided_step_of_a_noisy_search(seed):
    import random

    rng = random.Random(seed)
    costs = [0] + [rng.uniform(0.0, 0.2) for _ in range(9)]
    _, s_naive = greedy_search("F" * 10, 2, Noisy(costs, 48, 0.05, seed), search="naive")
    _, s_race = greedy_search("F" * 10, 2, Noisy(costs, 48, 0.05, seed), search="race", race=EXACT_RACE)
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
    _, all_steps = greedy_search("F" * 8, 2, whole, search="race", whole_at=frozenset({4}))
    replayed = [Step.from_json(s.to_json()) for s in all_steps[:3]]
    resumed = Noisy(costs, 32, 0.05)
    _, steps = greedy_search("F" * 8, 2, resumed, search="race", done=replayed, whole_at=frozenset({4}))
    assert [s.to_json() for s in steps] == [s.to_json() for s in all_steps]
    assert resumed.sequences_scored < whole.sequences_scored


def test_race_rounds_grow_and_the_order_is_fixed():
    assert race_rounds(64, 4) == [4, 5, 7, 9, 12, 15, 19, 24, 30, 38, 48, 60, 64]
    assert race_rounds(10, 4) == [4, 5, 7, 9, 10]
    assert race_rounds(4, 4) == [4]
    assert race_order(16) == race_order(16) and sorted(race_order(16)) == list(range(16))
    with pytest.raises(ValueError):
        Race(first=1)


def test_the_race_runs_its_base_only_where_a_step_needs_it_and_scores_the_end_points_whole():
    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15, 0.80, 0.35]
    ev = Noisy(costs, 64, 0.02)
    start, steps = greedy_search("F" * 10, 2, ev, search="race", whole_at=frozenset({5, 2}))
    assert ev.base_asked < 64 * len(steps)  # the committed pattern's losses are asked for on few sequences
    rows = path("F" * 10, start.loss, steps)
    for s, row in zip(steps, rows[1:]):
        if s.pattern.count("F") in (5, 2):  # an end point: the committed pattern on every sequence
            assert s.committed.sequences is None and len(s.committed.seq_losses) == 64
            assert row["sequences"] is None and row["loss"] == s.committed.loss
            assert s.committed.seq_losses == [ev.seq_loss(s.pattern, j) for j in range(64)]
        else:  # an estimate: the row before plus the step's paired delta on the sequences it raced
            assert s.committed is None and row["sequences"] == len(s.scores[s.chosen].seq_losses) < 64
    assert any(row["sequences"] is not None for row in rows)
    for a, b in itertools.pairwise(rows):
        if b["sequences"] is not None:
            step = steps[b["step"] - 1]
            assert b["loss"] == pytest.approx(a["loss"] + step.delta(step.chosen))


def test_a_search_replayed_on_a_recorded_exact_trace_makes_the_same_decisions_and_counts_its_work():
    """bench replays searches on exact's recorded trace (per-sequence losses of every candidate of every
    step); the replay must decide as the search does live, and charge each candidate from its own layer."""
    from dataclasses import asdict

    from indexcache_calib.evidence.bench_search import replay

    costs = [0, 0.05, 0.30, 0.10, 0.60, 0.20, 0.45, 0.15, 0.80, 0.35]
    base, steps = greedy_search("F" * 10, 2, Noisy(costs, 64, 0.02), search="exact")
    trace = {"base": asdict(base), "steps": [s.to_json() for s in steps], "floor": 2}
    for search, opts in (("exact", {}), ("race", {"race": EXACT_RACE}), ("race", {})):
        live_ev = Noisy(costs, 64, 0.02)
        _, live = greedy_search("F" * 10, 2, live_ev, search=search, **opts)
        r = replay(trace, 10, search, **opts)
        assert r["left_path_at"] is None and [s.chosen for s in r["steps"]] == [s.chosen for s in live]
    # exact: every candidate of every step runs from its own layer to the last, on all 64 sequences.
    runs = sum(10 - c for s in steps for c in s.scores)
    assert replay(trace, 10, "exact")["layer_forwards"] >= runs * 64
    assert replay(trace, 10, "race")["layer_forwards"] < 0.2 * replay(trace, 10, "exact")["layer_forwards"]


# -- racing with a tolerance (an indifference zone) ----------------------------------------------------

def _true_losses(ev, step):
    return {c: math.fsum(ev.seq_loss(flip(step.base, c), j) for j in range(ev.num_sequences)) / ev.num_sequences
            for c in step.scores}


@pytest.mark.parametrize("tolerance", [0.004, "auto"])
def test_a_race_commits_within_its_tolerance_of_the_best_it_raced_at_the_stated_confidence(tolerance):
    # Near-ties over many seeded steps: every candidate costs within a few paired SE of the others.
    import random

    alpha, errors, zoned, steps_seen = 0.2, 0, 0, 0
    for seed in range(60):
        rng = random.Random(seed)
        ev = Noisy([0] + [rng.uniform(0, 0.02) for _ in range(9)], 64, 0.02, seed)
        _, steps = greedy_search("F" * 10, 4, ev, search="race", race=Race(alpha, 4, tolerance))
        for s in steps:
            true = _true_losses(ev, s)  # every candidate raced, over every sequence: their best is known
            tol = s.race["tolerance"]
            assert tol > 0
            errors += true[s.chosen] - min(true.values()) > tol + 1e-12
            zoned += s.race["ended_after"] is not None
            steps_seen += 1
    assert steps_seen == 360 and zoned >= 0.2 * steps_seen  # the zone lets many near-ties go early
    # A step errs with probability at most alpha (the union bound makes it far rarer in practice).
    assert errors / steps_seen <= alpha + 0.03


def test_the_tolerance_holds_where_every_other_candidate_sits_just_outside_it():
    # One best candidate; every other one 1.5 tolerances worse. Committing any of them is an error.
    import random

    alpha, tol, trials, errors, zoned = 0.2, 0.004, 300, 0, 0
    for seed in range(trials):
        costs = [0] + [1.5 * tol] * 8
        costs[1 + random.Random(seed).randrange(8)] = 0.0
        ev = Noisy(costs, 64, 0.02, seed)
        _, (s,) = greedy_search("F" * 9, 8, ev, search="race", race=Race(alpha, 4, tol))
        true = _true_losses(ev, s)
        errors += true[s.chosen] - min(true.values()) > tol
        zoned += s.race["ended_after"] is not None
    assert zoned >= 0.05 * trials and errors / trials <= alpha + 0.03


def test_a_tolerance_lets_near_ties_go_earlier_and_records_what_it_dropped():
    costs = [0, 0.010, 0.011, 0.012, 0.013, 0.30, 0.40, 0.50, 0.60, 0.70]  # four near-ties, five clearly worse
    plain, zoned = Noisy(costs, 64, 0.02, seed=3), Noisy(costs, 64, 0.02, seed=3)
    _, s_plain = greedy_search("F" * 10, 6, plain, search="race", race=Race(tolerance=0))
    _, s_zoned = greedy_search("F" * 10, 6, zoned, search="race", race=Race(tolerance=0.015))
    assert zoned.sequences_scored < 0.8 * plain.sequences_scored
    assert any(s.race["ended_after"] for s in s_zoned) and not any(s.race["ended_after"] for s in s_plain)
    for s in s_zoned:
        log = s.race
        assert log["tolerance"] == 0.015 and log["sequences"] == 64 and set(log["entered"]) == set(s.scores)
        reasons = {d["candidate"]: d["reason"] for d in log["dropped"]}
        assert s.chosen not in reasons and set(reasons) <= set(s.scores)
        for d in log["dropped"]:  # dropped after a round, and scored on exactly those sequences
            assert d["reason"] in ("worse by bound", "within tolerance at commit")
            assert d["sequences"] == len(s.scores[d["candidate"]].seq_losses) < 64
        assert (log["ended_after"] is not None) == ("within tolerance at commit" in reasons.values())
    summary = race_summary(s_zoned, Race(tolerance=0.015))
    ended = sum(s.race["ended_after"] is not None for s in s_zoned)
    assert summary["steps_ended_early"] == ended and summary["given_away_at_most"] == pytest.approx(0.015 * ended)
    # Replayed from a checkpoint, a race with a tolerance takes the same steps and keeps their logs.
    replayed = [Step.from_json(s.to_json()) for s in s_zoned[:2]]
    _, resumed = greedy_search("F" * 10, 6, Noisy(costs, 64, 0.02, seed=3), search="race", race=Race(tolerance=0.015),
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


def test_auto_tolerance_is_a_share_of_the_committed_patterns_loss():
    costs = [0, 0.01, 0.02, 0.03, 0.04]
    ev = Noisy(costs, 32, 0.02, seed=1)
    start, (s, *_) = greedy_search("F" * 5, 2, ev, search="race", race=Race(0.05, 4, "auto"))
    assert s.race["tolerance"] == pytest.approx(AUTO_SHARE * start.loss, rel=1e-12)
    assert Race().tolerance == "auto"


def test_a_race_refuses_a_bad_tolerance():
    for bad in (-0.1, math.nan, math.inf, "lots", True):
        with pytest.raises(ValueError):
            Race(tolerance=bad)

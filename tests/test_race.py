"""Racing on the real runner: what a race computed on a candidate's batches is reused when it is scored
whole or committed, bit for bit; and the CLI's refusals of race settings, `--tolerance` among them."""

import json

import pytest
import torch
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib.artifact import CHECKPOINT, LAYER_MAP
from indexcache_calib.cli import app
from indexcache_calib.model import load_with_layout
from indexcache_calib.runner import PatternRunner

SEQ = 48
cli = CliRunner()


@pytest.fixture(scope="module")
def glm(glm_dir):
    return load_with_layout(str(glm_dir))


def _runners(glm, n=8, batch_size=2):
    model, layout = glm
    ids = torch.randint(3, 96, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return (PatternRunner(model, layout, ids, batch_size=batch_size, cache_device="cpu"),
            PatternRunner(model, layout, ids, batch_size=batch_size, cache_device="none"))


def _same(a, b):
    assert a.loss == b.loss and a.seq_losses == b.seq_losses and a.overlap == b.overlap


def _next_step_agrees(cached, plain, base):
    # The adopted cache is the committed pattern's own: the next step's candidates score bit for bit.
    for p in [i for i in range(1, len(base)) if base[i] == "F"]:
        pattern = base[:p] + "S" + base[p + 1:]
        _same(cached.score(pattern), plain.score(pattern))


def test_committing_a_winner_scored_in_pieces_runs_no_layer_again(glm):
    cached, plain = _runners(glm)
    base, layer = "FFFFFF", 2
    winner = base[:layer] + "S" + base[layer + 1:]
    cached.set_base(base), plain.set_base(base)
    cached.rebase(base)  # the race's lazy base: partial scores from here on
    # A race's rounds: the winner on batches 1 and 3, then 0 and 2 (every batch, in pieces).
    for batches in ([1, 3], [0, 2]):
        part = cached.score(winner, batches=batches)
        assert part.seq_losses == [plain.score(winner).seq_losses[j] for b in batches for j in (2 * b, 2 * b + 1)]
    before = cached.counters.layer_forwards
    whole = cached.score(winner)  # scored whole: assembled from the pieces
    assert cached.counters.layer_forwards == before
    _same(whole, plain.score(winner))
    cached.rebase(winner)  # committed: its layer inputs were kept, nothing runs
    committed = cached.set_base(winner)  # and known on every batch
    assert cached.counters.layer_forwards == before
    _same(committed, plain.set_base(winner))
    assert cached.last_layer_overlap == plain.last_layer_overlap
    _next_step_agrees(cached, plain, winner)
    cached.close()


def test_a_lazy_base_runs_only_where_a_candidate_or_its_losses_need_it(glm):
    model, layout = glm
    cached, plain = _runners(glm)
    base, layer = "FFFFFF", 3
    winner = base[:layer] + "S" + base[layer + 1:]
    cached.set_base(base), plain.set_base(base)
    cached.rebase(base)
    cached.score(winner, batches=[0, 2])
    cached.score(base[:1] + "S" + base[2:], batches=[0, 2])  # a rival's pieces are kept apart
    before = cached.counters.layer_forwards
    cached.rebase(winner)  # committed from its pieces: nothing runs
    assert cached.counters.layer_forwards == before
    # A candidate before the committed layer starts from inputs the old base left: only its own layers run.
    early = winner[:1] + "S" + winner[2:]
    _same(cached.score(early, batches=[1]), plain_part(plain, early, [1]))
    assert cached.counters.layer_forwards - before == (layout.num_layers - 1) * 2
    # A candidate past it needs the committed pattern there first: it reruns from the committed layer.
    before = cached.counters.layer_forwards
    late = winner[:4] + "S" + winner[5:]
    _same(cached.score(late, batches=[1]), plain_part(plain, late, [1]))
    assert cached.counters.layer_forwards - before == ((layout.num_layers - layer) + (layout.num_layers - 4)) * 2
    # Its losses where the race saw it cost nothing; elsewhere they rerun from the committed layer.
    before = cached.counters.layer_forwards
    plain.set_base(winner)
    assert cached.base_losses([0, 1, 2]) == [plain.base_score.seq_losses[j] for j in range(6)]
    assert cached.counters.layer_forwards == before
    assert cached.base_losses([3]) == plain.base_score.seq_losses[6:8]
    assert cached.counters.layer_forwards - before == (layout.num_layers - layer) * 2
    _same(cached.set_base(winner), plain.base_score)
    cached.close()


def plain_part(plain, pattern, batches):
    """`pattern` on `batches` by full forwards (a runner without a cache), overlap included."""
    plain.rebase(plain.base)
    return plain.score(pattern, batches=batches)


def test_a_race_on_the_runner_takes_exacts_losses_for_less_work(glm):
    from indexcache_calib.search import Race, greedy_search

    runs = {}
    for search, race in (("exact", None), ("race", Race(0.2, 2, tolerance=0)), ("race-tol", Race(0.2, 2, tolerance=1.0))):
        cached, plain = _runners(glm, n=16, batch_size=1)
        base, steps = greedy_search("F" * 6, 2, cached, search=search.split("-")[0], race=race, whole_at=frozenset({3}))
        runs[search] = (steps, cached.counters.layer_forwards)
        for s in steps:  # every loss the race reports is the model's own, bit for bit
            for c, sc in s.scores.items():
                whole = plain.score(s.base[:c] + "S" + s.base[c + 1:])
                assert sc.seq_losses == [whole.seq_losses[j] for j in sorted(sc.by_sequence())]
            if s.committed is not None:
                _same(s.committed, plain.score(s.pattern))
        cached.close()
    assert runs["race"][1] < runs["exact"][1]
    # A tolerance of a whole nat lets every candidate go within the first looks (a t bound on 2 sequences,
    # one degree of freedom, is too wide even for that), on 3 of 16 sequences at most.
    assert runs["race-tol"][1] < runs["race"][1]
    assert all(d["sequences"] <= 3 for s in runs["race-tol"][0] for d in s.race["dropped"])


# -- the command line ---------------------------------------------------------------------------------

BASE = ["--seq-len", "48", "--num-samples", "8", "--batch-size", "1", "--no-plots", "--num-full", "2"]


def calibrate(glm_dir, text_data, out, *args):
    return cli.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *BASE, *args])


@pytest.mark.parametrize("args,expect", [
    (["--search", "race", "--tolerance", "-0.1"], "--tolerance -0.1 is not a number of nats >= 0 or 'auto'"),
    (["--tolerance", "lots"], "--tolerance lots is not a number of nats >= 0 or 'auto'"),
    (["--search", "race", "--tolerance", "nan"], "--tolerance nan is not a number of nats >= 0 or 'auto'"),
    (["--search", "exact", "--tolerance", "auto"], "--tolerance sets the race, not --search exact"),
    (["--search", "naive", "--race-alpha", "0.1"], "--race-alpha sets the race, not --search naive"),
    (["--search", "exact", "--race-first", "2", "--race-alpha", "0.1"], "--race-alpha and --race-first set the race"),
    (["--search", "fast"], "--search fast is retired"),
    (["--race-first", "9"], "nothing to race"),
    (["--search", "race", "--race-first", "8"], "nothing to race"),
    (["--race-alpha", "0"], "--race-alpha 0.0 is not between 0 and 0.5"),
    (["--race-alpha", "0.7"], "the confidence, 1 - alpha, is between 0.5 and 1"),
])
@pytest.mark.parametrize("dry", [False, True])
def test_bad_race_settings_get_one_error_line(args, expect, dry, glm_dir, text_data, tmp_path):
    out = tmp_path / "r"
    r = calibrate(glm_dir, text_data, out, *args, *(["--dry-run"] if dry else []))
    assert r.exit_code == 2 and expect in one_error_line(r)
    assert not out.exists()


def test_a_race_with_a_tolerance_records_it_and_resume_refuses_another(glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    args = ["--search", "race", "--race-first", "2", "--race-alpha", "0.2", "--tolerance", "auto"]
    r = calibrate(glm_dir, text_data, out, *args)
    assert r.exit_code == 0, r.stderr
    lm = json.loads((out / LAYER_MAP).read_text())
    race = lm["search"]["race"]
    assert race["alpha"] == 0.2 and race["confidence"] == 0.8 and race["tolerance"]["requested"] == "auto"
    rows = lm["search"]["race_steps"]
    assert [row["step"] for row in rows] == [p["step"] for p in lm["path"][1:]]
    for row in rows:
        for d in row["dropped"]:
            assert d["reason"] in ("worse by bound", "within tolerance at commit") and 2 <= d["sequences"] < 8
            assert d["candidate"] in lm["positions"]
    per_step = race["tolerance"]["nats_per_step"]
    assert len(per_step) == len(rows) and race["tolerance"]["given_away_at_most"] <= sum(per_step)
    assert "tolerance" in r.stdout and "given away" in r.stdout
    # The checkpoint keeps the tolerance; a resume with another one is refused with old and new values.
    assert json.loads((out / CHECKPOINT).read_text())["fingerprint"]["settings"]["tolerance"] == "auto"
    r = calibrate(glm_dir, text_data, out, *args[:-1], "0.001", "--resume")
    assert r.exit_code == 3 and "tolerance (auto -> 0.001)" in one_error_line(r)


def test_the_dry_run_models_the_race_by_counts_of_sequences():
    # A tolerance in nats ends near-ties after a count of sequences, so the race's typical cost stays nearly
    # flat as the calibration set grows, while exact's grows with it; without a tolerance it is modelled
    # as at most exact's, plus its end points.
    from indexcache_calib.dryrun import search_work

    def typical(search, samples, tolerance="auto", ends=frozenset({8, 4, 2})):
        return search_work(16, frozenset(), 2, search, samples, tolerance=tolerance, endpoints=ends)["layer_forwards_typical"]

    for samples in (64, 256, 768):
        assert typical("race", samples) < typical("exact", samples)
        assert typical("race", samples, 0) >= typical("exact", samples)
    assert typical("race", 768) / typical("exact", 768) < typical("race", 64) / typical("exact", 64)
    # Each end point the race scores on every sequence is counted.
    assert typical("race", 256) > typical("race", 256, ends=frozenset())

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
    # A race's rounds: the winner on batches 1 and 3, then 0 and 2 (every batch, in pieces).
    for batches in ([1, 3], [0, 2]):
        part = cached.score(winner, batches=batches)
        assert part.seq_losses == [plain.score(winner).seq_losses[j] for b in batches for j in (2 * b, 2 * b + 1)]
    before = cached.counters.layer_forwards
    whole = cached.score(winner)  # scored whole: assembled from the pieces
    assert cached.counters.layer_forwards == before
    _same(whole, plain.score(winner))
    committed = cached.set_base(winner)  # committed: its layer inputs were kept, nothing runs
    assert cached.counters.layer_forwards == before
    _same(committed, plain.set_base(winner))
    assert cached.last_layer_overlap == plain.last_layer_overlap
    _next_step_agrees(cached, plain, winner)
    cached.close()


def test_a_winner_scored_on_some_batches_runs_only_the_others(glm):
    model, layout = glm
    cached, plain = _runners(glm)
    base, layer = "FFFFFF", 3
    winner = base[:layer] + "S" + base[layer + 1:]
    cached.set_base(base), plain.set_base(base)
    cached.score(winner, batches=[0, 2])
    cached.score(base[:1] + "S" + base[2:], batches=[0, 2])  # a rival's pieces are kept apart
    before = cached.counters.layer_forwards
    # Committed straight from its pieces (as a process that never scored it whole does): batches 1 and 3 run.
    committed = cached.set_base(winner)
    assert cached.counters.layer_forwards - before == (layout.num_layers - layer) * 4
    _same(committed, plain.set_base(winner))
    _next_step_agrees(cached, plain, winner)
    cached.close()


def test_a_race_on_the_runner_commits_exacts_losses_for_less_work(glm):
    from indexcache_calib.search import Race, greedy_search

    model, layout = glm
    runs = {}
    for search, race in (("exact", None), ("race", Race(0.2, 2)), ("race-tol", Race(0.2, 2, tolerance=1.0))):
        cached, _ = _runners(glm, n=16, batch_size=1)
        base, steps = greedy_search("F" * 6, 2, cached, search=search.split("-")[0], race=race)
        runs[search] = (steps, cached.counters.layer_forwards)
        cached.close()
    exact, race, loose = (runs[k][0] for k in ("exact", "race", "race-tol"))
    for r, e in zip(race, exact):
        if r.chosen != e.chosen:
            break
        assert r.loss == e.loss and r.scores[r.chosen] == e.scores[e.chosen]  # bit for bit
    assert runs["race"][1] < runs["exact"][1]
    # A tolerance of a whole nat ends every raced step after its first round.
    assert all(s.race["ended_after"] == 2 for s in loose if s.race) and runs["race-tol"][1] < runs["race"][1]


# -- the command line ---------------------------------------------------------------------------------

BASE = ["--seq-len", "48", "--num-samples", "8", "--batch-size", "1", "--no-plots", "--num-full", "2"]


def calibrate(glm_dir, text_data, out, *args):
    return cli.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *BASE, *args])


@pytest.mark.parametrize("args,expect", [
    (["--search", "race", "--tolerance", "-0.1"], "--tolerance -0.1 is not a number of nats >= 0 or 'auto'"),
    (["--search", "race", "--tolerance", "lots"], "--tolerance lots is not a number of nats >= 0 or 'auto'"),
    (["--search", "race", "--tolerance", "nan"], "--tolerance nan is not a number of nats >= 0 or 'auto'"),
    (["--tolerance", "0.01"], "--tolerance applies to --search race only"),
    (["--search", "exact", "--tolerance", "auto"], "--tolerance applies to --search race only"),
    (["--search", "race", "--race-first", "9"], "nothing to race"),
    (["--search", "race", "--race-first", "8"], "nothing to race"),
    (["--search", "race", "--race-alpha", "0"], "--race-alpha 0.0 is not between 0 and 0.5"),
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
    assert race["tolerance"]["given_away_at_most"] <= race["tolerance"]["steps_times_tolerance"]
    assert "tolerance" in r.stdout and "given away" in r.stdout
    # The checkpoint keeps the tolerance; a resume with another one is refused with old and new values.
    assert json.loads((out / CHECKPOINT).read_text())["fingerprint"]["settings"]["tolerance"] == "auto"
    r = calibrate(glm_dir, text_data, out, *args[:-1], "0.001", "--resume")
    assert r.exit_code == 3 and "tolerance (auto -> 0.001)" in one_error_line(r)


def test_the_dry_run_models_a_race_with_a_tolerance():
    # Near-ties stop at a share of the sequences, so the early end saves a share of the race at any size;
    # a tolerance of 0 is the race without one; the other searches ignore it.
    from indexcache_calib.dryrun import search_work

    def typical(search, samples, tolerance=None):
        return search_work(16, frozenset(), 2, search, samples, tolerance=tolerance)["layer_forwards_typical"]

    for samples in (64, 256, 768):
        assert typical("race", samples, "auto") < typical("race", samples) < typical("exact", samples)
        assert typical("race", samples, 0.0) == typical("race", samples)
        assert typical("fast", samples, "auto") == typical("fast", samples)
    # 1/3 of the default's tokens needs more than the tolerance gives at 64 sequences: the winner runs whole.
    assert typical("race", 64, "auto") > typical("fast", 64) / 3

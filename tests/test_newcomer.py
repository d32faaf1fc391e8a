"""Small fixes from the newcomer list: the license as an SPDX expression, counts of one read in the
singular ("1 step", not "1 steps") in the messages and reports of distill, dsa-convert, paper_table and
training_evidence, and calibrate's checks before any weights load (the dry run's too)."""

import json
import os
import re
import tomllib
import warnings
from pathlib import Path

import pytest
from conftest import one_error_line, write_docs
from test_commands import MODEL, SOURCE, models, workspace  # noqa: F401 - fixtures
from typer.testing import CliRunner

from indexcache_calib.errors import plural

ROOT = Path(__file__).resolve().parents[1]
# A count of one with a plural noun: "1 steps", "1 Full layers", "(1 sequences".
ONE_PLURAL = re.compile(r"(?<![\d.,/x])\b1 (?:Full |held-out )?(steps|sequences|layers|heads|patterns|keys|weights)\b")


def test_license_is_an_spdx_expression():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"
    # A string license is PEP 639, which setuptools reads from 77 on: older ones refuse the build.
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = next(Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.99") and setuptools.specifier.contains("77.0")


def test_plural():
    assert plural(1, "step") == "1 step"
    assert plural(0, "step") == "0 steps"
    assert plural(3, "Full layer") == "3 Full layers"
    assert plural(1, "query", "queries") == "1 query" and plural(2, "query", "queries") == "2 queries"


def _singular(text: str) -> None:
    found = [text[max(0, m.start() - 60):m.end() + 20] for m in ONE_PLURAL.finditer(text)]
    assert not found, found


def test_training_evidence_says_1_head_1_step_1_sequence(workspace, capsys):
    from indexcache_calib.evidence import training_evidence

    rc = training_evidence.main(["--source", SOURCE, "--model", MODEL, "--seq-len", "32", "--batch-size", "1",
                                 "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8", "--convert-steps", "1",
                                 "--distill-steps", "1", "--calibration-samples", "2", "--heldout-samples", "1",
                                 "--no-distill-mixed", "--no-distill-searched"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "1 head of 8; held-out: 1 sequence of 32 tokens" in out.out
    assert "Warm-up: 1 step of 1 x 32 tokens" in out.out and ", 1 step of 1 x 32 tokens" in out.out
    assert "[calibrate] greedy search down to 1 Full layer on code.jsonl" in out.err  # 4 layers, --every 4
    _singular(out.out)
    _singular("\n".join(l for l in out.err.splitlines() if l.startswith("[calibrate] greedy")))


def test_paper_table_says_1_sequence(workspace, capsys):
    from indexcache_calib.evidence import paper_table

    for d in ("code", "docs"):  # one held-out document of 40 characters: one sequence of 32 tokens
        (workspace / "calibration_data" / f"{d}.heldout.jsonl").write_text('{"text": "' + "abcd efgh " * 4 + '"}\n')
    rc = paper_table.main(["--model", MODEL, "--seq-len", "32", "--num-samples", "2", "--heldout-samples", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "warning: code.heldout.jsonl fills only 1 sequence of 32 tokens" in out.err
    assert re.search(r"scoring \d+ patterns on code held-out", out.err)
    # calibrate's own "the data fills only 1 sequences" (calibrate.py) is not paper_table's message.
    _singular(out.out + "\n".join(l for l in out.err.splitlines() if re.match(r"(warning: \S+\.heldout\.jsonl|scoring )", l)))


def test_distill_and_dsa_convert_say_1_step(workspace):
    from indexcache_calib.cli import app

    data = str(workspace / "calibration_data" / "code.jsonl")
    r = CliRunner().invoke(app, ["distill", "--model", MODEL, "--data", data, "--out", "distilled", "--uniform", "2",
                                 "--steps", "1", "--seq-len", "32", "--eval-data", data, "--eval-samples", "1"])
    assert r.exit_code == 0, r.stderr
    assert "training: 1 step, mean L_multi" in r.stdout
    card = (workspace / "distilled" / "MODEL_CARD.md").read_text()
    assert "- 1 step of 1 x 32 tokens" in card and "(1 sequence of 32 tokens" in card
    _singular(r.stdout + card)

    r = CliRunner().invoke(app, ["dsa-convert", "--model", SOURCE, "--data", data, "--out", "converted", "--steps", "1",
                                 "--seq-len", "32", "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8"])
    assert r.exit_code == 0, r.stderr
    assert "indexer warm-up: 1 step, mean KL" in r.stdout and "2 layers, every layer Full" in r.stdout
    _singular(r.stdout)


@pytest.mark.parametrize("n,expected", [(1, "1 layer with indexer weights"), (3, "3 layers with indexer weights")])
def test_distill_uniform_origin_counts_layers(n, expected):
    from indexcache_calib.training.distill import DistillOptions, read_pattern

    # The last layer ships no indexer: --uniform interleaves over the other n.
    opts = DistillOptions(model="m", data="d", out="o", uniform=1)
    pattern, origin = read_pattern(opts, n + 1, frozenset({n}))
    assert pattern == "F" * n + "S"
    assert origin.endswith(expected)


# -- calibrate: every check before any weights load, in the dry run too (issue 21, items 4, 5, 7-10, 21) ----

CAL = ["--seq-len", "48", "--num-samples", "3", "--batch-size", "3", "--no-plots"]


def cal(*args):
    from indexcache_calib.cli import app

    return CliRunner().invoke(app, ["calibrate", *map(str, args)])


@pytest.fixture(scope="module")
def finished(glm_dir, text_data, tmp_path_factory):
    """A finished 6-layer run down to 4 Full layers, in the default run directory of its workspace."""
    work = tmp_path_factory.mktemp("finished")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = cal("--model", glm_dir, "--data", text_data, "--num-full", 4, *CAL)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.stderr
    return work / "outputs" / run_name(glm_dir, text_data, 4)


def run_name(model, data, num_full):
    from indexcache_calib.artifact import default_run_name

    return default_run_name(str(model), str(data), f"{num_full}F")


def copy_run(run, tmp_path, name="run"):
    import shutil

    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def test_a_damaged_checkpoint_is_refused_before_the_weights_load(finished, glm_dir, text_data, tmp_path):
    run = copy_run(finished, tmp_path)
    saved = json.loads((run / "checkpoint.json").read_text())
    saved["steps"][1]["chosen"] = 99  # valid JSON, impossible step
    (run / "checkpoint.json").write_text(json.dumps(saved))
    for dry in ([], ["--dry-run"]):
        r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run, "--resume", *dry)
        assert r.exit_code == 2, r.stderr
        assert "is corrupt: step 2 chose layer 99" in one_error_line(r) and "loading" not in r.stderr
    saved["steps"][1]["chosen"], saved["steps"][1]["pattern"] = saved["steps"][0]["chosen"], "FFFFFF"
    (run / "checkpoint.json").write_text(json.dumps(saved))
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run, "--resume")
    assert r.exit_code == 2 and "is corrupt: step 2" in one_error_line(r)


@pytest.mark.parametrize("dry", [[], ["--dry-run"]])
def test_resume_and_overwrite_together_are_refused(finished, glm_dir, text_data, tmp_path, dry):
    run = copy_run(finished, tmp_path)
    before = (run / "checkpoint.json").read_text()
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run, "--resume", "--overwrite", *dry)
    assert r.exit_code == 2 and "--resume and --overwrite" in one_error_line(r)
    assert (run / "checkpoint.json").read_text() == before


@pytest.mark.parametrize("name,content", [("missing.jsonl", None), ("empty.jsonl", b""), ("bad.jsonl", b'{"text": '),
                                          ("latin1.txt", b"caf\xe9\n")])
def test_data_errors_leave_no_outputs_directory(name, content, glm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    for dry in ([], ["--dry-run"]):
        r = cal("--model", glm_dir, "--data", name, "--num-full", 2, *CAL, *dry)
        assert r.exit_code == 2, r.stderr
        one_error_line(r)
        assert not (tmp_path / "outputs").exists()


def test_the_dry_run_checks_the_run_directory_resume_and_data(finished, glm_dir, text_data, tmp_path):
    base = ["--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--dry-run"]
    run = copy_run(finished, tmp_path)
    r = cal(*base, "--data", tmp_path / "missing.jsonl")
    assert r.exit_code == 2 and "does not exist" in one_error_line(r)
    r = cal(*base, "--out", run)  # results there, neither --resume nor --overwrite
    assert r.exit_code == 2 and "already holds a calibration run" in one_error_line(r)
    r = cal(*base, "--out", tmp_path / "none", "--resume")
    assert r.exit_code == 2 and "nothing to resume" in one_error_line(r)
    r = cal(*base, "--seq-len", "32", "--out", run, "--resume")  # the real run exits 3 too
    assert r.exit_code == 3 and "settings.seq_len (48 -> 32)" in one_error_line(r)
    other = tmp_path / "other.jsonl"
    write_docs(other, seed=1)
    r = cal(*base, "--data", other, "--out", run, "--resume")  # other tokens: refused before the weights load
    assert r.exit_code == 3 and "tokens_sha256" in one_error_line(r)
    r = cal(*base, "--out", run, "--resume", "--json")
    assert r.exit_code == 0, r.stderr
    r = cal(*base, "--num-samples", "500", "--json")  # the real run warns and calibrates on what there is
    assert r.exit_code == 0, r.stderr
    assert any(re.match(r"the data fills only \d+ sequences of 48 tokens", w) for w in json.loads(r.stdout)["warnings"])
    assert not (tmp_path / "outputs").exists()


def test_a_new_target_resumes_the_run_with_the_same_settings(finished, glm_dir, text_data, tmp_path, monkeypatch):
    name = run_name(glm_dir, text_data, 4)
    (tmp_path / "outputs").mkdir()
    copy_run(finished, tmp_path / "outputs", name)
    monkeypatch.chdir(tmp_path)
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--resume")
    assert r.exit_code == 0, r.stderr
    assert f"resuming outputs/{name}" in r.stderr and "resuming after step 2" in r.stderr
    lm = json.loads((tmp_path / "outputs" / name / "layer_map.json").read_text())
    assert lm["num_full"] == 3 and lm["environment"]["resumed_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [name]
    # Settings that match no run: the runs there are named in the message.
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 2, *CAL[:2], "--seed", "1", *CAL[2:], "--resume")
    assert r.exit_code == 2 and f"outputs/{name}" in one_error_line(r)


def test_a_resumed_summary_says_which_numbers_are_this_sessions(finished, glm_dir, text_data, tmp_path):
    # Item 15: after a resume the steps and candidates are the whole search's, the layer-forwards and
    # seconds this session's; the summary and the layer map say which is which.
    run = copy_run(finished, tmp_path)
    whole = json.loads((run / "layer_map.json").read_text())["search"]
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run, "--resume")
    assert r.exit_code == 0, r.stderr
    lm = json.loads((run / "layer_map.json").read_text())
    session = lm["environment"]["session"]
    assert session["resumed_after_step"] == 2 and session["steps"] == 1 and lm["search"]["steps"] == 3
    assert lm["search"]["candidates_scored"] == whole["candidates_scored"] + session["candidates_scored"]
    assert session["candidate_sequences"] == 3 * session["candidates_scored"]
    from indexcache_calib.cli import search_rows

    rows = dict(search_rows(lm))
    assert rows["search"] == f"race, whole search: 3 steps, {lm['search']['candidates_scored']} candidates scored"
    forwards = lm["environment"]["work"]["layer_forwards"]
    assert rows["this session"].startswith(f"resumed after step 2: 1 step, {session['candidates_scored']} candidates "
                                           f"scored, {forwards} layer-forwards in ")
    assert "whole search" in r.stdout and "this session" in r.stdout
    # Not resumed: one row, without the words.
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 4, *CAL, "--out", tmp_path / "fresh")
    assert r.exit_code == 0, r.stderr
    assert "whole search" not in r.stdout and "this session" not in r.stdout and "layer-forward" in r.stdout
    assert json.loads((tmp_path / "fresh" / "layer_map.json").read_text())["environment"]["session"]["steps"] == 2


def test_no_overlap_on_resume_is_refused(finished, glm_dir, text_data, tmp_path):
    run = copy_run(finished, tmp_path)
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run, "--resume", "--no-overlap")
    assert r.exit_code == 3 and "settings.overlap (true -> false)" in one_error_line(r) and "loading" not in r.stderr
    # A run without overlap resumes without it.
    off = tmp_path / "off"
    assert cal("--model", glm_dir, "--data", text_data, "--num-full", 4, *CAL, "--out", off, "--no-overlap").exit_code == 0
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", off, "--resume")
    assert r.exit_code == 3 and "settings.overlap (false -> true)" in one_error_line(r)
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", off, "--resume", "--no-overlap")
    assert r.exit_code == 0, r.stderr
    assert json.loads((off / "layer_map.json").read_text())["provenance"]["measure_overlap"] is False


def test_an_interrupted_run_has_its_tokens_and_says_how_to_finish(glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib import calibrate as calib
    from indexcache_calib.cli import app

    real = calib.greedy_search

    def stop_after_one_step(*args, on_step, **kwargs):
        def step(s):
            on_step(s)
            raise KeyboardInterrupt

        return real(*args, on_step=step, **kwargs)

    monkeypatch.setattr(calib, "greedy_search", stop_after_one_step)
    run = tmp_path / "run"
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", run)
    assert r.exit_code == 130 and "1 finished search step is saved" in r.stderr
    assert (run / "tokens.safetensors").is_file() and not (run / "layer_map.json").exists()
    r = CliRunner().invoke(app, ["show", str(run)])
    assert r.exit_code == 2 and "unfinished calibration run (1 search step" in one_error_line(r) and "--resume" in r.stderr
    r = CliRunner().invoke(app, ["evaluate", "--model", str(glm_dir), "--tokens", str(run), "--uniform", "2"])
    assert r.exit_code == 0, r.stderr

    def stop_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calib, "greedy_search", stop_at_once)
    fresh = tmp_path / "fresh"
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--out", fresh)
    assert r.exit_code == 130 and "nothing was saved" in r.stderr
    assert not fresh.exists()  # nothing saved, nothing left


# -- calibrate's progress: bars with an ETA on a terminal, per-step lines on a log (item 12) -------------------


def test_the_search_eta_comes_from_the_work_so_far():
    from indexcache_calib.cli import SearchEta, _clock_text

    now = [100.0]
    eta = SearchEta(steps=3, clock=lambda: now[0])
    assert eta.step_left() is None and eta.search_left() is None
    eta.candidate(0, 5)
    assert eta.step_left() is None  # nothing scored yet
    now[0] = 110.0
    eta.candidate(2, 5)  # 5 s a candidate, 3 to go
    assert eta.step_left() == pytest.approx(15.0) and eta.search_left() is None
    now[0] = 125.0
    eta.step(5)  # one step in 25 s, two to go
    assert eta.search_left() == pytest.approx(50.0)
    eta.candidate(0, 4)
    assert eta.step_left() == pytest.approx(20.0)  # 5 s a candidate over the session
    assert _clock_text(None) == "-:--:--" and _clock_text(3725.9) == "1:02:05"


def test_calibrate_reports_candidates_and_sequences_as_they_go(glm_dir, text_data, tmp_path):
    from indexcache_calib.calibrate import Hooks, Options, calibrate

    events = []
    hooks = Hooks(search_started=lambda steps, first: events.append(("started", steps, first)),
                  candidate=lambda step, done, total: events.append(("candidate", step, done, total)),
                  sequences=lambda done, total: events.append(("sequences", done, total)),
                  step=lambda s: events.append(("step", s.step, len(s.scores))))
    opts = Options(model=str(glm_dir), data=str(text_data), num_full=4, out=str(tmp_path / "run"), seq_len=48,
                   num_samples=3, batch_size=1, search="exact", plots=False)  # exact: every candidate scored
    calibrate(opts, hooks)
    assert events[0] == ("started", 2, 5)
    assert [e[1:] for e in events if e[0] == "step"] == [(1, 5), (2, 4)]
    for e in events:
        if e[0] == "candidate":
            assert 0 <= e[2] <= e[3] and e[3] == {1: 5, 2: 4}[e[1]]
    seqs = [e[1:] for e in events if e[0] == "sequences"]
    assert seqs and all(total == 3 and 1 <= done <= 3 for done, total in seqs)
    assert seqs[:3] == [(1, 3), (2, 3), (3, 3)]  # one batch of one sequence at a time


def test_calibrate_progress_bars_only_on_a_terminal(glm_dir, text_data, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from indexcache_calib import cli

    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 4, *CAL, "--out", tmp_path / "log")
    assert r.exit_code == 0, r.stderr
    assert "step 1: layer" in r.stderr and "step 2: layer" in r.stderr
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr and "eta " not in r.stderr and "greedy steps" not in r.stderr
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=120, highlight=False))
    opts = cli_options(glm_dir, text_data, tmp_path / "tty")
    from indexcache_calib.calibrate import Hooks

    layer_map, _ = cli._run_calibration(opts, Hooks, {})
    drawn = screen.getvalue()
    assert layer_map["num_full"] == 4 and "step 2: layer" in drawn
    assert "\x1b[" in drawn and "greedy steps" in drawn and "candidates" in drawn and "eta " in drawn


def cli_options(model, data, out):
    from indexcache_calib.calibrate import Options

    return Options(model=str(model), data=str(data), num_full=4, out=str(out), seq_len=48, num_samples=3,
                   batch_size=3, plots=False)


# -- one sequence-length floor for every command: the family's own (issue 21, "two floor checks") -------------


def _training_opts(**extra):
    from types import SimpleNamespace

    return SimpleNamespace(steps=1, batch_size=1, checkpoint_every=1, eval_samples=1, lr=1e-3, **extra)


def test_training_checks_seq_len_against_the_familys_floor():
    from types import SimpleNamespace

    from indexcache_calib.errors import CalibError
    from indexcache_calib.training.trainloop import check_numbers

    # Key blocks: 2 blocks of 8 tokens select every key of a 16-token sequence, though index_topk_blocks is 2.
    blocks = SimpleNamespace(model_type="minimax_m3_vl_text", index_topk_blocks=2, index_block_size=8,
                             max_position_embeddings=1024)
    with pytest.raises(CalibError) as e:
        check_numbers(_training_opts(), 12, 2, blocks)
    assert e.value.message == ("--seq-len 12 is not above index_topk_blocks 2 of index_block_size 8 tokens: 16 tokens: "
                               "every token would be selected, so the indexer's choice would never matter")
    assert e.value.hint == "use a --seq-len above 16 (at 32 or more, each top-k leaves out most keys)"
    check_numbers(_training_opts(), 17, 2, blocks)
    # Token top-k (GLM-5's DSA): the floor is index_topk; only dsa-convert has --index-topk to lower.
    glm = SimpleNamespace(model_type="glm_moe_dsa", index_topk=8, max_position_embeddings=64)
    with pytest.raises(CalibError) as e:
        check_numbers(_training_opts(), 8, 8, glm)
    assert "not above index_topk 8: every token" in e.value.message and e.value.hint == "use a --seq-len above 8 (at 16 or more, each top-k leaves out most keys)"
    with pytest.raises(CalibError) as e:
        check_numbers(_training_opts(index_topk=8), 8, 8, glm)
    assert e.value.hint == "use a --seq-len above 8 (at 16 or more, each top-k leaves out most keys), or a smaller --index-topk"
    with pytest.raises(CalibError) as e:
        check_numbers(_training_opts(), 65, 8, glm)
    assert e.value.message == "--seq-len 65 exceeds the model's max_position_embeddings 64"


def test_calibrate_changes_none_of_its_options(glm_dir, text_data, tmp_path):
    # The cache device the run resolves (here: past --cache-budget, to disk) is recorded, not written back.
    from dataclasses import replace

    from indexcache_calib.calibrate import calibrate, dry_run

    opts = replace(cli_options(glm_dir, text_data, tmp_path / "run"), cache_budget="1KB")
    before = replace(opts)
    dry_run(opts)
    assert opts == before
    layer_map, _ = calibrate(opts)
    assert opts == before and layer_map["environment"]["cache_device"] == "disk"


def test_evaluate_and_overlap_change_none_of_their_options(glm_dir, text_data, tmp_path):
    # --tokens implies the data, length and count; they go into a new options object, not the caller's.
    from dataclasses import replace

    from indexcache_calib.calibrate import calibrate
    from indexcache_calib.diagnostics import evaluate, overlap

    _, run_dir = calibrate(cli_options(glm_dir, text_data, tmp_path / "run"))
    opts = replace(cli_options(glm_dir, text_data, tmp_path / "ov"), data=None)
    before = replace(opts)
    rows = evaluate(opts, tokens=str(run_dir), uniform="2")
    assert opts == before and rows[0]["name"]
    result = overlap(opts, tokens=str(run_dir))
    assert opts == before and result["data"].endswith("tokens.safetensors") and result["seq_len"] > 0


# -- deploying: apply --overwrite, export with an alias, undecided margins (items 1, 11, 14) -------------------


def invoke(*args, env=None):
    from indexcache_calib.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_apply_overwrite_replaces_only_what_apply_wrote(finished, glm_dir, tmp_path):
    out = tmp_path / "applied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("apply", finished, "--model", glm_dir, "--out", out, "--overwrite")
    assert r.exit_code == 2 and "files this tool did not write" in one_error_line(r)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert invoke("apply", finished, "--model", glm_dir, "--out", out).exit_code == 0
    r = invoke("apply", finished, "--model", glm_dir, "--out", out, "--overwrite")  # its own output: replaced
    assert r.exit_code == 0, r.stderr
    assert "other entries linked" in r.stdout and (out / "config.json").is_file()
    (out / "notes.md").write_text("mine")  # something of the user's inside an applied directory
    r = invoke("apply", finished, "--model", glm_dir, "--out", out, "--overwrite")
    assert r.exit_code == 2 and (out / "notes.md").read_text() == "mine"


def test_calibrate_overwrite_keeps_files_it_did_not_write(finished, glm_dir, text_data, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "figure.png").write_bytes(b"mine")
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 4, *CAL, "--out", run, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert (run / "figure.png").read_bytes() == b"mine"


def test_export_names_what_an_alias_resolves_to_and_refuses_another_model(finished, tmp_path):
    r = invoke("export", finished, "--engine", "vllm", "--model", "glm-5")
    assert r.exit_code == 2 and "decoder layers 6; glm-5 (zai-org/GLM-5) has 78" in one_error_line(r)
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"mine": {"id": "org/mine", "note": "glm_moe_dsa, 6 layers"},
                                   "mine-topk": {"id": "org/mine", "note": "6 layers, index_topk 2048"}}))
    env = {"INDEXCACHE_ALIASES": str(aliases)}
    r = invoke("export", finished, "--engine", "vllm", "--model", "mine", env=env)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("vllm serve org/mine --hf-overrides")
    r = invoke("export", finished, "--engine", "vllm", "--model", "mine-topk", env=env)
    assert r.exit_code == 2 and "index_topk 8; mine-topk (org/mine) has 2048" in one_error_line(r)


@pytest.mark.parametrize("gap,shown", [(1.966, "1.97 SE"), (0.84, "0.8 SE"), (1.9996, "1.9996 SE"), (2.04, "2.0 SE")])
def test_an_undecided_margin_never_reads_as_the_rule(gap, shown):
    from indexcache_calib.deploy import margin_note, undecided_line

    step = {"step": 3, "chosen": 4, "runner_up": 7, "gap": gap, "gap_se": 1.0, "decided": gap >= 2}
    assert margin_note(step) == f"layer 4 over layer 7 by {shown}"
    assert (undecided_line([step]) is None) == (gap >= 2)


# -- hints and help (items 16, 17, 22) -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [6, 7])
def test_a_target_with_nothing_to_share_names_the_largest_that_works(n, glm_dir, text_data):
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", n, *CAL, "--dry-run")
    assert r.exit_code == 2
    assert f"target of {n} full layers" in one_error_line(r) and "the model has 6 layers" in r.stderr
    assert "Hint: choose at most 5 full layers" in r.stderr and "start pattern" not in r.stderr


def test_the_start_pattern_is_named_only_when_given(glm_dir, text_data):
    r = cal("--model", glm_dir, "--data", text_data, "--num-full", 3, *CAL, "--start-pattern", "FFFSSS", "--dry-run")
    assert r.exit_code == 2 and "the start pattern has 3 full layers; nothing to share" in one_error_line(r)


def test_overlap_with_a_short_seq_len_does_not_speak_of_a_search(glm_dir, text_data, tmp_path):
    r = invoke("overlap", "--model", glm_dir, "--data", text_data, "--seq-len", 8, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "every token would be selected" in one_error_line(r)
    assert "search" not in r.stderr and not (tmp_path / "o").exists()


def test_calibrate_help_gives_the_real_defaults():
    r = invoke("calibrate", "--help")
    text = " ".join(r.stdout.split())
    assert "outputs/<model>_<data>_<N>F" in text and "outputs/<model>_<data>_<target>" not in text
    assert "[default: (1/4, unless --num-full)]" in text


def test_counts_of_one_read_singular(glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib.dryrun import describe
    from indexcache_calib.pattern import resolve_num_full

    with pytest.raises(Exception) as e:
        resolve_num_full(2, None, 2)
    assert e.value.message == "target of 2 full layers leaves nothing to share: the model has 2 layers"
    assert e.value.hint == "choose at most 1 full layer"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "abcdefgh " * 8}) + "\n")  # 73 tokens: one sequence of 48
    r = cal("--model", glm_dir, "--data", "one.jsonl", "--num-full", 5, *CAL, "--out", "run")
    assert r.exit_code == 0, r.stderr
    assert "the data fills only 1 sequence of 48 tokens" in r.stderr
    assert "5 candidates scored" in r.stderr and "1 step, 5 candidates scored" in r.stdout
    r = invoke("overlap", "--model", glm_dir, "--data", "one.jsonl", "--seq-len", 48, "--out", "o")
    assert r.exit_code == 0 and "on 1 sequence of 48 tokens" in r.stderr
    r = invoke("calibrate", "--model", glm_dir, "--data", "one.jsonl", "--num-full", 5, *CAL, "--dry-run", "--json")
    rows = dict(describe(json.loads(r.stdout)))
    assert rows["model"].startswith("glm_moe_dsa, 6 layers")
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "a"}) + "\n")
    r = cal("--model", glm_dir, "--data", "tiny.jsonl", "--num-full", 5, *CAL, "--dry-run")
    assert r.exit_code == 2 and "the data has 2 tokens" in one_error_line(r)
    _singular(r.stderr)


# -- the dry run on racing with few sequences (item 19) --------------------------------------------------------


@pytest.mark.parametrize("samples", [5, 8])
def test_the_dry_run_estimates_the_race_from_counts_that_few_sequences_cap(samples, glm_dir, text_data):
    # The race's counts (sequences per candidate) are capped by the sequences there are: with a handful, it
    # races nothing and its estimate is what lazy entry and its end points come to, never above its bound.
    r = cal("--model", glm_dir, "--data", text_data, "--seq-len", 48, "--num-samples", samples, "--num-full", 2,
            "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["search"] == "race" and plan["work"]["layer_forwards_typical"] <= plan["work"]["layer_forwards_at_most"]
    assert plan["work_by_search"]["race"]["layer_forwards"] == plan["work"]["layer_forwards_typical"]
    many = cal("--model", glm_dir, "--data", text_data, "--seq-len", 48, "--num-samples", 64, "--num-full", 2,
               "--dry-run", "--json")
    plan = json.loads(many.stdout)
    assert plan["work_by_search"]["race"]["tokens"] < plan["work_by_search"]["exact"]["tokens"]
    assert not [w for w in plan["warnings"] if "race" in w]


# -- dsa-convert interrupted before its first step (item 6) -----------------------------------------------------


def test_dsa_convert_interrupted_before_its_first_step_says_nothing_was_saved(workspace, monkeypatch):
    from indexcache_calib.training import trainloop as tl
    from indexcache_calib.cli import app

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tl, "indexer_step", stop)
    data = str(workspace / "calibration_data" / "code.jsonl")
    args = ["dsa-convert", "--model", SOURCE, "--data", data, "--out", "converted", "--steps", "2",
            "--seq-len", "32", "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130
    assert "nothing was saved" in r.stderr and "resume with" not in r.stderr, r.stderr
    assert "Hint: rerun without --resume: indexcache " in r.stderr
    assert not (workspace / "converted").exists()  # removed, so a --resume would find nothing


# -- apply's own output is the model calibrated on (item 13) ----------------------------------------------------


def test_apply_output_is_not_another_config(finished, glm_dir, tmp_path):
    out = tmp_path / "applied"
    assert invoke("apply", finished, "--model", glm_dir, "--out", out).exit_code == 0
    r = invoke("validate", finished, "--model", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert not [n for n in json.loads(r.stdout)["notes"] if "differs" in n]
    # Another value of a key that is not the pattern's is still another config.
    config = json.loads((out / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    r = invoke("validate", finished, "--model", out, "--json")
    assert [n for n in json.loads(r.stdout)["notes"] if "differs from the one calibrated on" in n]
    from indexcache_calib import model as mdl

    prov = json.loads((finished / "layer_map.json").read_text())["provenance"]
    assert mdl.same_config(prov["config_sha256"], mdl.resolve(str(glm_dir)))
    assert not mdl.same_config(prov["config_sha256"], mdl.resolve(str(out)))


# -- silent input handling (item 18) ----------------------------------------------------------------------------


def test_chat_messages_without_a_template_are_warned_about_once(tmp_path, monkeypatch):
    from indexcache_calib import data as dat
    from indexcache_calib.training import trainloop as tl

    path = tmp_path / "chat.jsonl"
    turn = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(turn) + "\n" + json.dumps(turn) + "\n")
    docs = dat.read_documents(path)
    assert docs.texts[0] == "user: hi there\nassistant: hello" and len(docs.notes) == 1
    assert "no chat template" in docs.notes[0]
    assert dat.read_documents(_text_jsonl(tmp_path)).notes == []
    monkeypatch.setattr(dat, "pack", lambda texts, tok, seq_len, n, seed: (texts, len(texts)))
    said = []
    tl.training_windows(str(path), None, 8, warn=said.append)
    assert len(said) == 1 and "no chat template" in said[0]


def _text_jsonl(tmp_path):
    p = tmp_path / "text.jsonl"
    p.write_text(json.dumps({"text": "plain"}) + "\n")
    return p


def test_a_csv_column_of_numbers_is_told_what_jsonl_is_told(tmp_path):
    from indexcache_calib.data import read_documents
    from indexcache_calib.errors import CalibError

    csv = tmp_path / "numbers.csv"
    csv.write_text("text\n1\n2\n")
    with pytest.raises(CalibError) as e:
        read_documents(csv)
    assert "field 'text' must be a string, got int" in e.value.message
    jsonl = tmp_path / "numbers.jsonl"
    jsonl.write_text('{"text": 1}\n')
    with pytest.raises(CalibError) as j:
        read_documents(jsonl)
    assert "field 'text' must be a string, got int" in j.value.message


def test_distill_refuses_a_uniform_above_the_layer_count():
    from indexcache_calib.training.distill import DistillOptions, read_pattern
    from indexcache_calib.errors import CalibError

    with pytest.raises(CalibError) as e:
        read_pattern(DistillOptions(model="m", data="d", out="o", uniform=99), 16, frozenset())
    assert "--uniform 99 is more than the model's 16 layers" in e.value.message
    pattern, _ = read_pattern(DistillOptions(model="m", data="d", out="o", uniform=16), 16, frozenset())
    assert pattern == "F" + "S" * 15


# -- dsa-convert's GLM-5 defaults on a small model (item 20) ----------------------------------------------------


def test_dsa_convert_warns_when_glm5_defaults_dwarf_the_model(workspace, monkeypatch):
    from indexcache_calib.training import convert as cv
    from indexcache_calib.training import trainloop as tl
    from indexcache_calib.cli import app

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tl, "indexer_step", stop)  # never a long step, whatever the settings
    max_pos = json.loads((workspace / SOURCE / "config.json").read_text())["max_position_embeddings"]
    data = str(workspace / "calibration_data" / "code.jsonl")
    r = CliRunner().invoke(app, ["dsa-convert", "--model", SOURCE, "--data", data, "--out", "converted", "--steps", "1",
                                 "--index-topk", str(max_pos // 2), "--index-heads", "1", "--index-head-dim", "8"])
    assert f"Warning: index_topk {max_pos // 2} is at least half the model's max_position_embeddings {max_pos}" in r.stderr, r.stderr
    assert f"--index-topk {max_pos // 8} --seq-len {max_pos // 4}" in r.stderr
    said = []
    cv.sized_warning(2048, 4096, type("C", (), {"max_position_embeddings": 4096})(), True, True, said.append)
    assert len(said) == 1 and "index_topk 2048 (GLM-5's default)" in said[0] and "--seq-len 4096 (GLM-5's default)" in said[0]
    cv.sized_warning(8, 32, type("C", (), {"max_position_embeddings": 4096})(), False, False, said.append)
    assert len(said) == 1  # a small index_topk says nothing


def test_resume_and_rerun_hints_are_quoted_for_every_command():
    from indexcache_calib.cli_common import rerun_command, resume_command

    argv = ["distill", "--model", "my model", "--out", "out dir", "--overwrite"]
    assert resume_command(argv) == "indexcache distill --model 'my model' --out 'out dir' --resume"
    assert rerun_command(argv + ["--resume"]) == "indexcache distill --model 'my model' --out 'out dir' --overwrite"

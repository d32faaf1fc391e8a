"""Retrieval on a model: teacher-forced exact match against greedy decoding, `evaluate --retrieval`
(rows, depths, --record, show), `calibrate --objective key-tokens|retrieval`, and bad input refused
before any weights load."""

import json

import pandas as pd
import pytest
import torch
from conftest import one_error_line
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, TOKENS, WEIGHTS
from indexcache_calib.calibrate import Hooks, Options, make_runner, prepare
from indexcache_calib.cli import app
from indexcache_calib.objective import answer_weights
from indexcache_calib.probes import Builder, Probe, haystack_stream
from indexcache_calib.recipes.train_tiny import REPO_ROOT
from indexcache_calib.retrieval import RETRIEVAL

runner = CliRunner()
PROBE_LEN = 320  # the character tokenizer spells every word out: four needles and a question need ~250 tokens


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def loaded(glm_dir, text_data):
    prep = prepare(Options(model=str(glm_dir), data=str(text_data), seq_len=PROBE_LEN, num_samples=2), Hooks())
    texts = [json.loads(line)["text"] for line in open(text_data)]
    return prep, Builder(prep.tokenizer, haystack_stream(texts, prep.tokenizer))


def exact(prep, probes):
    ids = torch.tensor([p.ids for p in probes])
    run = make_runner(type(prep)(**{**prep.__dict__, "ids": ids}), Options(model="", data=""), "none",
                      weights=answer_weights(probes, ids.shape[1]))
    run.score("F" * prep.layout.num_positions)
    return run.last_exact


@pytest.fixture(scope="module")
def trained():
    """The shipped default model: random tiny models tie index scores at zero (relu), and top-k breaks those ties
    differently as the sequence grows, so their earlier logits are not the same with a longer input."""
    data = REPO_ROOT / "calibration_data" / "docs.heldout.jsonl"
    prep = prepare(Options(model="tiny-dsa", data=str(data), seq_len=PROBE_LEN, num_samples=2), Hooks())
    texts = [json.loads(line)["text"] for line in open(data)][:30]
    return prep, Builder(prep.tokenizer, haystack_stream(texts, prep.tokenizer))


def test_teacher_forced_exact_match_is_greedy_decodings(trained):
    prep, builder = trained
    plain = AutoModelForCausalLM.from_pretrained(REPO_ROOT / "indexcache_calib" / "models" / "tiny-dsa")
    for kind in ("needle", "copy"):
        probe = builder.probe(kind, PROBE_LEN, 0, 1, 0)
        prefix = list(probe.ids[: probe.answer_start])
        n = len(probe.answer)
        # Greedy decoding by the library's own generate loop (its cache and attention, not the tool's path).
        greedy = plain.generate(torch.tensor([prefix]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)[0, len(prefix):].tolist()
        other = [(t + 1) % 1000 + 3 for t in greedy]
        answers = [tuple(probe.answer), tuple(greedy), tuple(greedy[:-1] + other[-1:]), tuple(other[:1] + greedy[1:])]
        probes = [Probe(kind, PROBE_LEN, probe.depth, tuple(prefix) + a, probe.answer_start) for a in answers]
        flags = exact(prep, probes)
        assert flags == [a == tuple(greedy) for a in answers] and flags[1:] == [True, False, False]


def test_weights_on_every_token_give_the_lm_loss(loaded):
    prep, _ = loaded
    plain = make_runner(prep, Options(model="", data=""), "none")
    ones = make_runner(prep, Options(model="", data=""), "none", weights=torch.ones(prep.ids.shape[0], prep.ids.shape[1] - 1))
    pattern = "F" * prep.layout.num_positions
    a, b = plain.score(pattern), ones.score(pattern)
    assert b.loss == pytest.approx(a.loss, rel=1e-12) and b.seq_losses == pytest.approx(a.seq_losses, rel=1e-12)


@pytest.fixture(scope="module")
def run_dir(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--seq-len", "48", "--num-samples", "3",
               "--num-full", "3", "--out", out, "--no-plots")
    assert r.exit_code == 0, r.stderr
    return out


def test_evaluate_scores_probes_by_kind_length_and_depth_and_records_them(glm_dir, text_data, run_dir, tmp_path):
    before = json.loads((run_dir / LAYER_MAP).read_text())
    args = ["evaluate", "--model", glm_dir, "--data", text_data, "--retrieval", "all", "--lengths", f"{PROBE_LEN},400",
            "--num-samples", "4", "--uniform", "2", "--layer-map", run_dir]
    r = invoke(*args, "--record", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    names = ("all-F", "uniform 1/2", "run")
    assert [(x["seq_len"], x["name"], x["probe"]) for x in rows] == [
        (n, name, kind) for n in (PROBE_LEN, 400) for name in names for kind in ("needle", "multikey", "copy")]
    for x in rows:
        assert {"name", "kind", "pattern", "num_full", "probe", "seq_len", "exact_match", "answer_loss"} <= set(x)
        assert x["probes"] == 4 and 0 <= x["exact_match"] <= 1 and x["answer_loss"] > 0
        assert sum(b["probes"] for b in x["by_depth"]) == 4 and len(x["by_depth"]) == 4
        if x["kind"] == "all-F":
            assert x["delta"] is None and x["exact_match_delta"] is None
        else:
            ref = next(y for y in rows if y["kind"] == "all-F" and y["seq_len"] == x["seq_len"] and y["probe"] == x["probe"])
            assert x["delta"] == pytest.approx(x["answer_loss"] - ref["answer_loss"])
            assert x["paired_se"] > 0
    # --record: the entry's rows are in the layer map beside all-Full's; nothing else changed; show prints them.
    after = json.loads((run_dir / LAYER_MAP).read_text())
    rec = after.pop(RETRIEVAL)
    assert after == before
    assert rec["kinds"] == ["needle", "multikey", "copy"] and rec["lengths"] == [PROBE_LEN, 400] and rec["seed"] == 0
    assert len(rec["points"]) == 6 and all("all_full_exact_match" in p and "1/2" in p["uniform_exact_match"] for p in rec["points"])
    assert invoke("validate", run_dir).exit_code == 0
    shown = invoke("show", run_dir)
    assert shown.exit_code == 0 and "retrieval (indexcache evaluate --retrieval" in shown.stdout and "multikey: exact match" in shown.stdout
    # The same probes for every entry: a pattern equal to all-F's scores exactly all-F's numbers; and the table.
    csv = tmp_path / "rows.csv"
    table = invoke("evaluate", "--model", glm_dir, "--data", text_data, "--retrieval", "needle", "--seq-len", PROBE_LEN,
                   "--num-samples", "3", "--uniform", "none", "--pattern", "F" * 6, "--out", csv)
    assert table.exit_code == 0 and "EM by depth" in table.stdout and "pattern 1: FFFFFF" in table.stdout
    again = pd.read_csv(csv)
    assert again["name"].tolist() == ["all-F", "pattern 1"] and again["answer_loss"].nunique() == 1
    assert again["exact_match"].nunique() == 1


@pytest.mark.parametrize("args,expect", [
    (["--retrieval", "needle,haystack"], "unknown probe kind 'haystack'"),
    (["--retrieval", "all", "--lengths", "8192"], "--lengths 8192 exceeds the model's max_position_embeddings 4096"),
    (["--retrieval", "all", "--lengths", f"8,{PROBE_LEN}"], "--lengths 8 is not above the model's index_topk"),
    (["--retrieval", "multikey", "--lengths", "100"], "leaves 0 for its haystack"),
    (["--retrieval", "needle", "--lengths", "1000", "--data-docs", "4"], "tokens of haystack; probes of 1,000 tokens need at least 8"),
    (["--retrieval", "all", "--plot", "x.png"], "--plot draws the loss across lengths"),
    (["--retrieval", "all", "--record"], "give exactly one --layer-map"),
])
def test_bad_probe_settings_are_refused_before_any_weights_load(args, expect, glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib import model as mdl

    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(mdl, "load_model", lambda *a, **k: loaded.append(1))
    if "--data-docs" in args:  # a haystack file too small for the length asked
        from conftest import write_docs

        i = args.index("--data-docs")
        text_data, args = write_docs(tmp_path / "small.jsonl", n=int(args[i + 1])), args[:i]
    r = invoke("evaluate", "--model", glm_dir, "--data", text_data, *args)
    assert r.exit_code == 2
    assert expect in one_error_line(r)
    assert not loaded


# -- calibrate --objective ---------------------------------------------------------------------------


def test_calibrate_on_probe_answers_records_what_rebuilds_them(glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--objective", "retrieval", "--retrieval", "needle,copy",
               "--seq-len", PROBE_LEN, "--num-samples", "4", "--num-full", "3", "--out", out, "--no-plots")
    assert r.exit_code == 0, r.stderr
    lm = json.loads((out / LAYER_MAP).read_text())
    o = lm["objective"]
    assert o["name"] == "retrieval" and o["kinds"] == ["needle", "copy"] and o["probes"] == 4 and o["seed"] == 0
    assert o["seq_len"] == PROBE_LEN and len(o["data_sha256"]) == 64
    saved = load_file(str(out / TOKENS))
    assert saved[WEIGHTS].sum() == o["answer_tokens"] and saved["input_ids"].shape == (4, PROBE_LEN)
    assert "objective retrieval: answer tokens of 4 probes" in invoke("show", out).stdout
    # The run's tokens carry their weights: evaluate --tokens scores what the run scored.
    r = invoke("evaluate", "--model", glm_dir, "--tokens", out, "--layer-map", out, "--uniform", "none", "--json")
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["all-F"]["loss"] == pytest.approx(lm["loss"]["all_full"], abs=1e-9)
    assert rows["run"]["loss"] == pytest.approx(lm["loss"]["final"], abs=1e-9)
    # Another objective on resume is refused as a changed setting.
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--seq-len", PROBE_LEN, "--num-samples", "4",
               "--num-full", "2", "--out", out, "--resume", "--no-plots")
    assert r.exit_code == 3 and "objective" in one_error_line(r)


def test_calibrate_on_key_tokens_finds_them_once_and_resumes_with_them(glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    base = ["calibrate", "--model", glm_dir, "--data", text_data, "--objective", "key-tokens", "--key-window", "8",
            "--key-margin", "0.05", "--seq-len", "64", "--num-samples", "3", "--out", out, "--no-plots"]
    r = invoke(*base, "--num-full", "4")
    assert r.exit_code == 0, r.stderr
    assert "finding key tokens" in r.stderr
    lm = json.loads((out / LAYER_MAP).read_text())
    o = lm["objective"]
    assert o["name"] == "key-tokens" and o["window"] == 8 and o["margin"] == 0.05 and 0 < o["share"] < 1
    weights = load_file(str(out / TOKENS))[WEIGHTS]
    assert int(weights.sum()) == o["key_tokens"] and weights[:, : 2 * 8].sum() == 0  # no label before two windows
    r = invoke(*base, "--num-full", "3", "--resume")
    assert r.exit_code == 0, r.stderr
    assert "finding key tokens" not in r.stderr  # read back from the run's tokens file
    assert json.loads((out / LAYER_MAP).read_text())["objective"] == o


@pytest.mark.parametrize("args,expect", [
    (["--objective", "retrieval"], "give their kinds with --retrieval"),
    (["--retrieval", "all"], "--retrieval sets the probes of --objective retrieval"),
    (["--objective", "ppl"], "unknown --objective 'ppl'"),
    (["--objective", "key-tokens", "--seq-len", "20", "--key-window", "16"], "leaves no token with more context"),
    (["--objective", "retrieval", "--retrieval", "all", "--seq-len", "100"], "for its haystack"),
])
def test_bad_objective_settings_are_refused_before_any_weights_load(args, expect, glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib import model as mdl

    loaded = []
    monkeypatch.setattr(mdl, "load_model", lambda *a, **k: loaded.append(1))
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--out", tmp_path / "o", *args)
    assert r.exit_code == 2
    assert expect in one_error_line(r)
    assert not loaded and not (tmp_path / "o").exists()
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--out", tmp_path / "o", *args, "--dry-run")
    assert r.exit_code == 2 and expect in one_error_line(r)

"""A pattern's loss across lengths (`indexcache evaluate --lengths`): the curve, what the layer map
carries of it, `show`, `export`, and bad lengths refused before any weights load."""

import json

import pytest
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib import length_curve as lc
from indexcache_calib.artifact import LAYER_MAP
from indexcache_calib.cli import app
from indexcache_calib.errors import CalibError

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- the pure parts ----------------------------------------------------------------------------------

def test_lengths_are_read_sorted_and_without_repeats():
    assert lc.parse_lengths("4K,1024, 2k,1K") == [1024, 2048, 4096]
    for bad in ("", "1K,,2K", "x", "-512", "0"):
        with pytest.raises(CalibError, match="cannot read --lengths"):
            lc.parse_lengths(bad)


def points(*deltas):
    return [{"seq_len": 1024 * 2 ** i, "delta": d} for i, d in enumerate(deltas)]


def test_the_recommended_minimum_is_where_the_cost_stays_within_the_tolerance():
    assert lc.recommend(points(0.003, 0.004, 0.002), 0.01)["min_seq_len"] is None  # nothing to gate
    within = lc.recommend(points(0.003, 0.004, 0.002), 0.01)["text"]
    assert "no minimum length needed" in within and "1,024 to 4,096" in within
    # Over at 1K and 2K, within from 4K on: share from 4K.
    rec = lc.recommend(points(0.05, 0.02, 0.004, 0.001), 0.01)
    assert rec["min_seq_len"] == 4096 and "share indices from 4,096 tokens on" in rec["text"]
    # Within at 2K but over at 4K again: only lengths past the last one over qualify.
    assert lc.recommend(points(0.02, 0.001, 0.03, 0.001), 0.01)["min_seq_len"] == 8192
    # Over at the longest length: no minimum helps.
    rec = lc.recommend(points(0.001, 0.02), 0.01)
    assert rec["min_seq_len"] is None and "no minimum length brings it within" in rec["text"]


def test_only_an_engine_with_a_minimum_length_setting_gets_a_key():
    lm = {lc.LENGTH_CURVE: {"recommendation": lc.recommend(points(0.05, 0.001), 0.01)}}
    keys, note = lc.engine_setting(lm, "sglang")
    assert keys == {"index_topk_min_seq_len": 2048} and "not merged upstream" in note
    for engine in ("vllm", "transformers", "trtllm"):
        keys, note = lc.engine_setting(lm, engine)
        assert keys == {} and "no setting that turns index sharing off below a length" in note and "2,048" in note
    assert lc.engine_setting({}, "sglang") == ({}, None)


# -- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("curve") / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--seq-len", "48", "--num-samples", "3",
               "--num-full", "3", "--out", out, "--no-plots")
    assert r.exit_code == 0, r.stderr
    return out


def test_evaluate_scores_every_entry_at_every_length_and_records_the_curve(glm_dir, text_data, run_dir, tmp_path):
    before = json.loads((run_dir / LAYER_MAP).read_text())
    plot = tmp_path / "curve.png"
    r = invoke("evaluate", "--model", glm_dir, "--data", text_data, "--lengths", "24,48,96", "--num-samples", "3",
               "--uniform", "2", "--layer-map", run_dir, "--record", "--plot", plot, "--max-delta", "0.001", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    rows = result["rows"]
    assert [(x["seq_len"], x["name"]) for x in rows] == [(n, name) for n in (24, 48, 96) for name in ("all-F", "uniform 1/2", "run")]
    assert all(x["sequences"] == 3 for x in rows)
    for x in rows:
        if x["kind"] == "all-F":
            assert x["delta"] == 0 and x["paired_se"] is None and x["layer_overlap"] == {}
        else:  # a Shared layer's own top-k against the one it reads
            shared = [str(i) for i, c in enumerate(x["pattern"]) if c == "S"]
            assert sorted(x["layer_overlap"]) == sorted(shared) and x["paired_se"] > 0
            assert all(0 <= v <= 1 for v in x["layer_overlap"].values())
    # At the calibrated length, the searched pattern costs what its run recorded (other sequences: close, not equal).
    curve = result["curves"]["run"]
    assert [p["seq_len"] for p in curve["points"]] == [24, 48, 96]
    assert curve["points"][1]["all_full_loss"] == next(x["loss"] for x in rows if x["seq_len"] == 48 and x["kind"] == "all-F")
    assert set(curve["points"][0]["uniform"]) == {"1/2"}
    assert curve["recommendation"] == lc.recommend(curve["points"], 0.001)
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    # --record: the curve is in the layer map, nothing else changed, and the map is still valid.
    after = json.loads((run_dir / LAYER_MAP).read_text())
    assert after.pop(lc.LENGTH_CURVE) == curve and after == before
    assert invoke("validate", run_dir).exit_code == 0
    shown = invoke("show", run_dir)
    assert shown.exit_code == 0, shown.stderr
    assert "length curve" in shown.stdout and "96" in shown.stdout and curve["recommendation"]["text"][:30] in shown.stdout
    assert json.loads(invoke("show", run_dir, "--json").stdout)["length_curve"]["recommendation"] == curve["recommendation"]


def test_export_writes_the_minimum_length_where_the_engine_reads_one(run_dir, tmp_path):
    lm = json.loads((run_dir / LAYER_MAP).read_text())
    lm[lc.LENGTH_CURVE] = {"recommendation": lc.recommend(points(0.05, 0.001), 0.01), "points": []}
    path = tmp_path / LAYER_MAP
    path.write_text(json.dumps(lm))
    r = invoke("export", path, "--engine", "sglang", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["overrides"]["index_topk_min_seq_len"] == 2048 and '"index_topk_min_seq_len":2048' in out["text"]
    r = invoke("export", path, "--engine", "vllm", "--json")
    out = json.loads(r.stdout)
    assert "index_topk_min_seq_len" not in out["overrides"]
    assert any("no setting that turns index sharing off" in n for n in out["notes"])


@pytest.mark.parametrize("args,expect", [
    (["--lengths", "8,48"], "--lengths 8 is not above the model's index_topk"),
    (["--lengths", "48,8192"], "--lengths 8192 exceeds the model's max_position_embeddings 4096"),
    (["--lengths", "48,4000", "--num-samples", "3"], "fewer than --num-samples 3"),
    (["--lengths", "4x"], "cannot read --lengths"),
    (["--lengths", "48", "--max-delta", "-1"], "--max-delta -1.0 is not a number of nats"),
    (["--record"], "give --lengths too"),
    (["--lengths", "48", "--record"], "give exactly one --layer-map"),
    (["--lengths", "48", "--plot", "curve.pdf"], "must name a .png file"),
])
def test_bad_lengths_are_refused_before_any_weights_load(args, expect, glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib import model as mdl

    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(mdl, "load_model", lambda *a, **k: loaded.append(1))
    r = invoke("evaluate", "--model", glm_dir, "--data", text_data, *args)
    assert r.exit_code == 2
    assert expect in one_error_line(r)
    assert not loaded


def test_the_dry_run_costs_a_long_calibration_against_a_short_one(glm_dir, text_data, tmp_path):
    base = ["calibrate", "--model", glm_dir, "--data", text_data, "--num-samples", "2", "--target", "1/3",
            "--out", tmp_path / "o", "--dry-run"]
    plan = json.loads(invoke(*base, "--seq-len", "2048", "--json").stdout)["length_cost"]
    assert plan == {"reference_seq_len": 512, "keys_scored_per_token": 2048, "indexer_work_vs_reference": 4.0,
                    "reference_sequences_same_tokens": 8.0}
    text = " ".join(invoke(*base, "--seq-len", "2048").stdout.replace("│", " ").split())
    assert "4x the indexer work of 8 sequences of 512 (as many tokens)" in text
    assert "length cost" not in invoke(*base, "--seq-len", "512").stdout

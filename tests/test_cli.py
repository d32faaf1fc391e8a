"""The command line end to end on both architectures, and every refusal it owes the user."""

import json
import os
import subprocess
import sys

import pytest
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, REQUIRED_KEYS, SCHEMA, TOKENS, TRACE, load_tokens
from indexcache_calib.cli import app
from indexcache_calib.pattern import check_pattern, full_layers

runner = CliRunner()
BASE = ["--seq-len", "48", "--num-samples", "3", "--batch-size", "3", "--no-plots"]


def calibrate(*args):
    return runner.invoke(app, ["calibrate", *args])


@pytest.mark.parametrize("arch", ["glm", "dsv32"])
def test_calibrate_end_to_end(arch, glm_dir, dsv32_dir, text_data, tmp_path):
    model = glm_dir if arch == "glm" else dsv32_dir
    out = tmp_path / "run"
    r = calibrate("--model", str(model), "--data", str(text_data), "--target", "1/3", "--out", str(out), *BASE, "--json")
    assert r.exit_code == 0, r.stderr
    printed = json.loads(r.stdout)
    lm = json.loads((out / LAYER_MAP).read_text())
    assert printed == lm
    assert lm["schema"] == SCHEMA and all(k in lm for k in REQUIRED_KEYS)
    assert lm["num_layers"] == 6 and lm["num_full"] == 2 and check_pattern(lm["pattern"], 6) == []
    assert lm["full_layers"] == full_layers(lm["pattern"])
    assert lm["indexer_types"] == ["full" if c == "F" else "shared" for c in lm["pattern"]]
    assert [p["num_full"] for p in lm["path"]] == [6, 5, 4, 3, 2]
    assert lm["path"][-1]["pattern"] == lm["pattern"]
    assert lm["loss"]["final"] == lm["path"][-1]["loss"]
    overrides = json.loads(lm["engines"]["vllm"]["value"])
    assert overrides["index_topk_pattern"] == lm["pattern"] and overrides["indexer_types"] == lm["indexer_types"]
    prov = lm["provenance"]
    assert prov["architecture"] == ("GlmMoeDsaForCausalLM" if arch == "glm" else "DeepseekV32ForCausalLM")
    assert len(prov["config_sha256"]) == 64 and len(prov["tokens_sha256"]) == 64
    assert prov["seq_len"] == 48 and prov["num_samples"] == 3 and set(prov["versions"]) >= {"torch", "transformers", "accelerate"}
    ids = load_tokens(out / TOKENS)
    assert tuple(ids.shape) == (3, 48)
    import pandas as pd

    trace = pd.read_csv(out / TRACE)
    assert trace.groupby("step")["chosen"].sum().tolist() == [1, 1, 1, 1]
    assert set(trace.columns) >= {"step", "candidate", "loss", "delta_vs_all_full", "mean_overlap", "chosen",
                                  "sequences", "gap_vs_chosen", "gap_se", "runner_up", "decided"}
    # Per-step confidence: the runner-up's paired gap and its SE, in the trace and along the path alike.
    assert (trace["sequences"] == 3).all() and trace.loc[trace["chosen"], "gap_vs_chosen"].isna().all()
    for row, step in zip(trace[trace["runner_up"]].itertuples(), lm["path"][1:]):
        assert (row.step, row.candidate) == (step["step"], step["runner_up"])
        assert row.gap_vs_chosen == pytest.approx(step["gap"], rel=1e-8) and row.gap_vs_chosen >= 0
        assert row.gap_se == pytest.approx(step["gap_se"], rel=1e-8)
        assert row.decided == step["decided"] == (step["gap"] >= 2 * step["gap_se"])
    assert lm["search"]["undecided_steps"] == [p["step"] for p in lm["path"][1:] if not p["decided"]]


def test_naive_exact_and_race_agree_on_the_tiny_model(glm_dir, text_data, tmp_path):
    maps, traces = {}, {}
    for search in ("naive", "exact", "race"):
        r = calibrate("--model", str(glm_dir), "--data", str(text_data), "--num-full", "2", "--search", search,
                      "--out", str(tmp_path / search), *BASE)
        assert r.exit_code == 0, r.stderr
        maps[search] = json.loads((tmp_path / search / LAYER_MAP).read_text())
        traces[search] = (tmp_path / search / TRACE).read_text()
    # exact is Algorithm 1 with prefix reuse: every candidate's loss bit for bit, for less work.
    assert traces["exact"] == traces["naive"] and maps["exact"]["path"] == maps["naive"]["path"]
    work = {s: m["environment"]["work"]["layer_forwards"] for s, m in maps.items()}
    assert work["naive"] > work["exact"] > work["race"]


def test_summary_goes_to_stdout_and_progress_to_stderr(glm_dir, text_data, tmp_path):
    from indexcache_calib.deploy import undecided_line

    r = calibrate("--model", str(glm_dir), "--data", str(text_data), "--num-full", "4", "--out", str(tmp_path / "r"), *BASE)
    assert r.exit_code == 0
    assert "pattern" in r.stdout and "layer_map.json" in r.stdout
    assert "step 1:" in r.stderr and "step 1:" not in r.stdout
    # The summary names the steps decided by less than 2 SE (random weights and 3 sequences: some are).
    lm = json.loads((tmp_path / "r" / LAYER_MAP).read_text())
    line = undecided_line(lm["path"])
    assert line and line in r.stdout and "more calibration sequences would separate these layers" in line
    assert all(f"step {s}" in line for s in lm["search"]["undecided_steps"])


def test_race_takes_exacts_decided_steps_and_reports_exact_end_points(glm_dir, text_data, tmp_path):
    import pandas as pd

    args = ["--model", str(glm_dir), "--data", str(text_data), "--num-full", "2", "--seq-len", "48", "--num-samples", "8",
            "--batch-size", "1", "--no-plots"]
    maps, traces = {}, {}
    for search, extra in (("exact", []), ("race", ["--race-first", "2", "--race-alpha", "0.2"])):
        r = calibrate(*args, "--search", search, *extra, "--out", str(tmp_path / search))
        assert r.exit_code == 0, r.stderr
        maps[search] = json.loads((tmp_path / search / LAYER_MAP).read_text())
        traces[search] = pd.read_csv(tmp_path / search / TRACE)
    race, exact = traces["race"], traces["exact"]
    section = maps["race"]["search"]["race"]
    assert (section["alpha"], section["confidence"], section["first_sequences"]) == (0.2, 0.8, 2)
    assert section["tolerance"]["requested"] == "auto" and (race["sequences"] >= 2).all()
    assert race["mean_overlap"].notna().all()  # every candidate raced reports its overlap, whole or not
    assert maps["race"]["search"]["candidate_sequences"] == race["sequences"].sum() <= exact["sequences"].sum()
    for r_step, e_step in zip(maps["race"]["path"][1:], maps["exact"]["path"][1:]):
        if e_step["decided"]:
            assert r_step["chosen"] == e_step["chosen"]
        if r_step["chosen"] != e_step["chosen"]:
            break
    # The end points a user reads are over every sequence: the target, and the ratios uniform is scored at
    # (3 Full layers of 6 is 1/2); the other rows say how many sequences their estimate used, if not all.
    lm = maps["race"]
    for row in lm["path"]:
        assert row["sequences"] is None if row["num_full"] in (6, 3, 2) else row["sequences"] in (None, 2, 3, 4, 5, 6, 7)
    assert lm["path"][-1]["loss"] == lm["loss"]["final"]
    if lm["path"][-1]["pattern"] == maps["exact"]["pattern"]:
        assert lm["loss"]["final"] == maps["exact"]["loss"]["final"]


def test_race_resumes_from_its_checkpoint(glm_dir, text_data, tmp_path):
    import shutil

    from indexcache_calib.artifact import CHECKPOINT

    args = ["--model", str(glm_dir), "--data", str(text_data), "--num-full", "1", "--seq-len", "48", "--num-samples", "8",
            "--batch-size", "1", "--no-plots", "--search", "race", "--race-first", "2"]
    whole = tmp_path / "whole"
    assert calibrate(*args, "--out", str(whole)).exit_code == 0
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    checkpoint = json.loads((part / CHECKPOINT).read_text())
    checkpoint["steps"] = checkpoint["steps"][:2]
    (part / CHECKPOINT).write_text(json.dumps(checkpoint))
    (part / LAYER_MAP).unlink()
    r = calibrate(*args, "--out", str(part), "--resume")
    assert r.exit_code == 0, r.stderr
    a, b = (json.loads((d / LAYER_MAP).read_text()) for d in (whole, part))
    assert b["environment"]["resumed_steps"] == 2
    a.pop("environment"), b.pop("environment")
    assert a == b and (whole / TRACE).read_bytes() == (part / TRACE).read_bytes()


@pytest.mark.parametrize("flag,value,expect", [
    ("--race-alpha", "0.7", "--race-alpha 0.7 is not between 0 and 0.5"),
    ("--race-first", "1", "--race-first must be at least 2"),
    ("--search", "quick", "unknown --search 'quick'"),
])
def test_bad_search_settings_are_refused(flag, value, expect, glm_dir, text_data, tmp_path):
    r = calibrate("--model", str(glm_dir), "--data", str(text_data), "--out", str(tmp_path / "r"), *BASE, flag, value)
    assert r.exit_code == 2 and expect in one_error_line(r)


def _non_dsa(tmp_path):
    from transformers import AutoModelForCausalLM, Glm4MoeLiteConfig

    cfg = Glm4MoeLiteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                            n_routed_experts=4, num_experts_per_tok=2)
    path = tmp_path / "flash"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "not found"),
    ("non_dsa", "glm4_moe_lite"),
    ("missing_data", "does not exist"),
    ("empty_data", "no text"),
    ("malformed", ":2: malformed JSON"),
    ("missing_field", ":1: record has neither 'text' nor 'messages'"),
    ("too_short", "fewer than one sequence"),
    ("seq_len_topk", "not above the model's index_topk 8"),
    ("zero_full", "impossible"),
    ("too_many_full", "impossible"),
    ("bad_target", "must be a share"),
    ("bad_search", "unknown --search"),
    ("start_with_s", "layer 0 must be 'F'"),
    ("start_wrong_length", "pattern has 4 layers, the model has 6"),
])
def test_bad_input_gets_one_error_line_and_no_artifact(case, expect, glm_dir, text_data, tmp_path):
    out = tmp_path / "out"
    model, data, extra = str(glm_dir), str(text_data), ["--num-full", "2"]
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "non_dsa":
        model = str(_non_dsa(tmp_path))
    elif case == "missing_data":
        data = str(tmp_path / "nope.jsonl")
    elif case == "empty_data":
        data = str(_write(tmp_path, "empty.jsonl", "\n"))
    elif case == "malformed":
        data = str(_write(tmp_path, "bad.jsonl", '{"text": "fine"}\n{"text": \n'))
    elif case == "missing_field":
        data = str(_write(tmp_path, "field.jsonl", '{"content": "x"}\n'))
    elif case == "too_short":
        data = str(_write(tmp_path, "short.jsonl", '{"text": "tiny"}\n'))
    args = ["--model", model, "--data", data, "--out", str(out), *BASE]
    if case == "seq_len_topk":
        args += ["--seq-len", "8"]
    extra = {"zero_full": ["--num-full", "0"], "too_many_full": ["--num-full", "7"], "bad_target": ["--target", "3/2"],
             "bad_search": ["--num-full", "2", "--search", "magic"],
             "start_with_s": ["--num-full", "2", "--start-pattern", "SFFFFF"],
             "start_wrong_length": ["--num-full", "2", "--start-pattern", "FFFF"]}.get(case, extra)
    r = calibrate(*args, *extra)
    assert r.exit_code != 0
    assert expect in one_error_line(r)
    assert not out.exists()


def test_existing_run_is_not_overwritten_silently(glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(glm_dir), "--data", str(text_data), "--num-full", "5", "--out", str(out), *BASE]
    assert calibrate(*args).exit_code == 0
    before = (out / LAYER_MAP).read_bytes()
    r = calibrate(*args)
    assert r.exit_code == 2 and "already holds" in one_error_line(r)
    assert (out / LAYER_MAP).read_bytes() == before
    assert calibrate(*args, "--overwrite").exit_code == 0


def test_unwritable_output_directory(glm_dir, text_data, tmp_path):
    blocker = _write(tmp_path, "file", "x")
    r = calibrate("--model", str(glm_dir), "--data", str(text_data), "--num-full", "2", "--out", str(blocker / "sub"), *BASE)
    assert r.exit_code == 2 and "cannot write" in one_error_line(r)


def test_python_dash_m_entry_point_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "INDEXCACHE_DEBUG": ""}
    p = subprocess.run([sys.executable, "-m", "indexcache_calib", "calibrate", "--model", str(tmp_path / "missing"),
                        "--data", "x.jsonl"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.startswith("Error: model") and "Traceback" not in p.stderr

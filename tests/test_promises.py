"""Every promise the command line makes: apply -> evaluate -> recalibrate round trips, what an interrupted
run says, a dry run that refuses what the real run refuses, one exit-code table for every command, resume
that keeps later steps, and layer maps checked against the model they are applied to."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib.artifact import CHECKPOINT, LAYER_MAP, TOKENS, TRACE
from indexcache_calib.cli import app
from indexcache_calib.testing import save_tiny

runner = CliRunner()
SMALL = ["--seq-len", "48", "--num-samples", "3", "--batch-size", "3", "--no-plots"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("promises") / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "2", "--out", out, *SMALL)
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def applied(run, glm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("applied") / "model"
    r = invoke("apply", run, "--model", glm_dir, "--out", out)
    assert r.exit_code == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert "shared" in config["indexer_types"]
    return out


# -- 1. a directory written by apply is read as the model it is ---------------------------------------


def _rows(result):
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_evaluate_on_the_applied_directory_gives_the_original_numbers(run, applied, glm_dir):
    args = ["evaluate", "--tokens", run / TOKENS, "--layer-map", run, "--uniform", "2", "--json"]
    original, again = invoke(*args, "--model", glm_dir), invoke(*args, "--model", applied)
    assert original.exit_code == 0 and again.exit_code == 0, again.stderr
    a, b = _rows(original), _rows(again)
    assert {k: (v["loss"], v["pattern"]) for k, v in a.items()} == {k: (v["loss"], v["pattern"]) for k, v in b.items()}
    lm = json.loads((run / LAYER_MAP).read_text())
    assert b["all-F"]["loss"] == pytest.approx(lm["loss"]["all_full"], abs=1e-9)  # the true all-Full
    assert b["uniform 1/2"]["num_full"] == 3
    assert "carries a pattern" in again.stderr


def test_calibrate_and_overlap_on_the_applied_directory_match_the_original(run, applied, glm_dir, text_data, tmp_path):
    again = invoke("calibrate", "--model", applied, "--data", text_data, "--num-full", "2", "--out", tmp_path / "again", *SMALL)
    assert again.exit_code == 0, again.stderr
    a, b = (json.loads((d / LAYER_MAP).read_text()) for d in (run, tmp_path / "again"))
    assert (a["pattern"], a["loss"], a["path"], a["fixed_shared_layers"]) == (b["pattern"], b["loss"], b["path"], b["fixed_shared_layers"])
    ov = [invoke("overlap", "--model", m, "--tokens", run / TOKENS, "--out", tmp_path / f"ov{i}", "--json") for i, m in enumerate((glm_dir, applied))]
    assert all(r.exit_code == 0 for r in ov), ov[1].stderr
    first, second = (json.loads(r.stdout) for r in ov)
    assert first["matrix"] == second["matrix"] and all(row[i] is not None for i, row in enumerate(second["matrix"]))


def test_another_layer_map_validates_and_evaluates_on_the_applied_directory(run, applied, glm_dir, text_data, tmp_path):
    other = tmp_path / "other"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "4", "--out", other, *SMALL)
    assert r.exit_code == 0
    assert invoke("validate", other, "--model", applied).exit_code == 0
    r = invoke("evaluate", "--model", applied, "--tokens", run / TOKENS, "--layer-map", other, "--uniform", "none", "--json")
    assert r.exit_code == 0, r.stderr


# -- 2. what an interrupted run says ------------------------------------------------------------------


def test_interrupt_before_the_first_step_says_nothing_was_saved(tmp_path, text_data):
    model = save_tiny(tmp_path / "deep", "glm", layers=10, seed=1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "indexcache_calib", "calibrate", "--model", str(model), "--data", str(text_data), "--out", str(out),
           "--search", "naive", "--seq-len", "48", "--num-samples", "64", "--num-full", "1", "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # the first sweep over 64 sequences takes far longer than this
        if line.startswith("loading"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert "nothing was saved" in rest and "rerun without --resume" in rest and "resume with" not in rest
    assert not out.exists()


# -- 3. the dry run refuses what the real run refuses, before anything loads --------------------------


@pytest.mark.parametrize("extra,expect", [
    (["--dtype", "fp8"], "unknown --dtype"),
    (["--device-map", "bogus"], "unknown --device-map"),
    (["--cache-budget", "lots"], "cannot read --cache-budget"),
    (["--start-pattern", "FFFF"], "pattern has 4 layers, the model has 6"),
    (["--max-memory", "0=,x"], "cannot read --max-memory"),
])
def test_the_dry_run_applies_every_check_of_the_real_run(extra, expect, glm_dir, text_data, tmp_path):
    base = ["calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "2", "--out", tmp_path / "r", *SMALL, *extra]
    for args in (base + ["--dry-run"], base):
        r = invoke(*args)
        assert r.exit_code == 2 and expect in one_error_line(r)  # one_error_line: nothing printed before (no "loading")
    assert not (tmp_path / "r").exists()


def test_a_target_with_nothing_to_share_is_refused_by_the_dry_run_too(glm_dir, text_data, tmp_path):
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "6", "--dry-run", *SMALL)
    assert r.exit_code == 2 and "nothing to share" in one_error_line(r) and "layer-forwards" not in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_gpu_placement_on_a_cpu_only_torch_is_bad_input(glm_dir, text_data, tmp_path):
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "2", "--device-map", "cuda:0", *SMALL)
    assert r.exit_code == 2 and "sees none" in one_error_line(r)
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "5", "--cache-device", "gpu",
               "--out", tmp_path / "r", *SMALL)
    assert r.exit_code == 0 and "--cache-device gpu on a host without a GPU" in r.stderr
    assert json.loads((tmp_path / "r" / LAYER_MAP).read_text())["environment"]["cache_device"] == "cpu"


# -- 5. one exit-code table: 0 ok, 1 internal, 2 bad input, 3 resume mismatch, 4 out of memory --------


def test_a_wrong_length_pattern_is_bad_input_for_every_command(run, glm_dir, tmp_path):
    lm = json.loads((run / LAYER_MAP).read_text())
    short = dict(lm, pattern=lm["pattern"][:-1], num_layers=5, positions=list(range(5)), indexer_types=lm["indexer_types"][:-1],
                 full_layers=[i for i in lm["full_layers"] if i < 5], num_full=lm["pattern"][:-1].count("F"), engines={})
    bad = tmp_path / "short.json"
    bad.write_text(json.dumps(short))
    results = {
        "validate": invoke("validate", bad, "--model", glm_dir),
        "apply": invoke("apply", bad, "--model", glm_dir, "--out", tmp_path / "applied"),
        "evaluate": invoke("evaluate", "--model", glm_dir, "--tokens", run / TOKENS, "--layer-map", bad),
        "export": invoke("export", bad, "--engine", "vllm", "--model", glm_dir),
    }
    for name, r in results.items():
        assert r.exit_code == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "applied").exists()


@pytest.mark.parametrize("args", [
    ["calibrate", "--bogus"],
    ["export"],
    ["show", "/nonexistent/layer_map.json"],
    ["overlap", "--model", "/nonexistent", "--data", "x.jsonl"],
    ["evaluate", "--model", "/nonexistent", "--data", "x.jsonl"],
    ["validate", "FSX"],
])
def test_bad_command_lines_are_one_error_line_and_exit_2(args):
    r = invoke(*args)
    assert r.exit_code == 2
    assert one_error_line(r)


def test_parser_errors_and_help_are_plain_lines():
    r = invoke("calibrate", "--bogus")
    assert r.stderr.splitlines()[0].startswith("Error: No such option: --bogus")
    assert r.stderr.splitlines()[-1].startswith("Hint: see ") and "─" not in r.stderr
    help_text = invoke("calibrate", "--help").stdout
    assert "--json" in help_text and "<bool>" not in help_text and "╭" not in help_text
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("indexcache ")


def test_a_reader_that_closes_stdout_early_is_not_an_error(glm_dir, text_data, tmp_path):
    cmd = [sys.executable, "-m", "indexcache_calib", "calibrate", "--model", str(glm_dir), "--data", str(text_data),
           "--num-full", "5", "--out", str(tmp_path / "r"), *SMALL, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert "Error" not in stderr and (tmp_path / "r" / LAYER_MAP).exists()


# -- 6. resuming at a larger target keeps the later steps ---------------------------------------------


def test_resume_at_a_larger_target_keeps_the_later_steps(glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    base = ["calibrate", "--model", glm_dir, "--data", text_data, "--out", out, *SMALL]
    assert invoke(*base, "--num-full", "1").exit_code == 0
    steps, trace = json.loads((out / CHECKPOINT).read_text())["steps"], (out / TRACE).read_bytes()
    r = invoke(*base, "--num-full", "3", "--resume")
    assert r.exit_code == 0, r.stderr
    lm = json.loads((out / LAYER_MAP).read_text())
    # Read off the path: base, committed and uniform patterns are scored again, no candidate is.
    assert lm["num_full"] == 3 and lm["environment"]["resumed_steps"] == 3 and lm["environment"]["work"]["patterns_scored"] <= 4
    assert json.loads((out / CHECKPOINT).read_text())["steps"] == steps and (out / TRACE).read_bytes() == trace
    r = invoke(*base, "--num-full", "1", "--resume")
    assert r.exit_code == 0
    lm = json.loads((out / LAYER_MAP).read_text())
    assert lm["num_full"] == 1 and lm["environment"]["resumed_steps"] == len(steps)


def test_a_resume_with_other_settings_is_refused_before_loading_with_old_and_new_values(run, glm_dir, text_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "2", "--out", out,
               "--seq-len", "64", "--num-samples", "3", "--batch-size", "3", "--no-plots", "--resume")
    assert r.exit_code == 3 and "settings.seq_len (48 -> 64)" in one_error_line(r)


# -- 7. layer maps are checked against the model they go to -------------------------------------------


def test_a_layer_map_from_another_model_is_refused_with_the_differences(run, glm_dir, tmp_path):
    other = save_tiny(tmp_path / "topk4", "glm", layers=6, index_topk=4)
    r = invoke("validate", run, "--model", other)
    assert r.exit_code == 2 and "index_topk 8" in r.stderr and "has 4" in r.stderr
    assert invoke("apply", run, "--model", other, "--out", tmp_path / "applied").exit_code == 2
    longer = save_tiny(tmp_path / "eight", "glm", layers=8)
    r = invoke("export", run, "--engine", "vllm", "--model", longer)
    assert r.exit_code == 2 and "decoder layers 6" in one_error_line(r)
    r = invoke("export", run, "--engine", "vllm", "--model", "some-org/not-cached")
    assert r.exit_code == 0 and "Note: not checked against some-org/not-cached" in r.stderr


def test_a_bare_pattern_without_a_model_says_what_was_not_checked():
    r = invoke("validate", "FSFS")
    assert r.exit_code == 0 and "not checked" in r.stderr and "--model" in r.stderr


def test_default_run_directories_are_named_by_the_resolved_number_of_full_layers(glm_dir, text_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = set()
    for spec in (["--target", "1/3"], ["--target", "0.3333"], ["--num-full", "2"]):
        r = invoke("calibrate", "--model", glm_dir, "--data", text_data, *spec, *SMALL, "--overwrite")
        assert r.exit_code == 0, r.stderr
        names |= {p.name for p in (tmp_path / "outputs").iterdir()}
    assert len(names) == 1 and names.pop().endswith("_2F")

"""Long runs survive: checkpoints, resume, signals, determinism, and what the tool refuses to run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from indexcache_calib.artifact import CHECKPOINT, LAYER_MAP, TRACE
from indexcache_calib.cli import app
from indexcache_calib.testing import save_tiny

runner = CliRunner()
ARGS = ["--seq-len", "48", "--num-samples", "4", "--batch-size", "4", "--num-full", "1", "--no-plots"]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("deep"), "glm", layers=10, seed=1)


def body(layer_map_path):
    """The layer map without its environment section (wall time, platform, work done)."""
    data = json.loads(open(layer_map_path).read())
    data.pop("environment")
    return data


def run_cli(*args):
    return runner.invoke(app, ["calibrate", *args])


def start_process(model, data, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "indexcache_calib", "calibrate", "--model", str(model), "--data", str(data),
           "--out", str(out), "--search", "naive", *ARGS, *extra]
    # A suite started as a background job inherits SIGINT ignored, and Python then installs no Ctrl-C
    # handler in the child; give the child the disposition a terminal user's process has.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_steps(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            steps = json.loads((out / CHECKPOINT).read_text())["steps"]
            if len(steps) >= n:
                return steps
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(deep_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), "--search", "naive", *ARGS)
    assert r.exit_code == 0, r.stderr
    return out


def test_sigkill_then_resume_gives_the_uninterrupted_artifact(deep_dir, text_data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start_process(deep_dir, text_data, out)
    wait_for_steps(proc, out, 2)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / LAYER_MAP).exists()
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), "--search", "naive", *ARGS, "--resume")
    assert r.exit_code == 0, r.stderr
    resumed = json.loads((out / LAYER_MAP).read_text())
    assert resumed["environment"]["resumed_steps"] >= 2
    assert body(out / LAYER_MAP) == body(uninterrupted / LAYER_MAP)
    assert (out / TRACE).read_bytes() == (uninterrupted / TRACE).read_bytes()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_keep_the_checkpoint_and_say_how_to_resume(sig, code, deep_dir, text_data, tmp_path):
    out = tmp_path / "run"
    proc = start_process(deep_dir, text_data, out)
    wait_for_steps(proc, out, 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "saved in" in stderr and "--resume" in stderr and "Traceback" not in stderr
    steps = json.loads((out / CHECKPOINT).read_text())["steps"]
    assert len(steps) >= 1
    assert not (out / LAYER_MAP).exists()
    assert not list(out.glob(".*.tmp"))


def test_two_identical_runs_are_byte_identical_apart_from_environment(deep_dir, text_data, tmp_path, uninterrupted):
    out = tmp_path / "again"
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), "--search", "naive", *ARGS)
    assert r.exit_code == 0
    a, b = (uninterrupted / LAYER_MAP).read_text(), (out / LAYER_MAP).read_text()
    strip = lambda text: text[: text.index('  "environment"')] + text[text.index('  "fixed_shared_layers"'):]
    assert strip(a).replace(str(out), "") == strip(b).replace(str(out), "")
    assert (out / TRACE).read_bytes() == (uninterrupted / TRACE).read_bytes()


def test_resume_refuses_changed_inputs_with_its_own_exit_code(deep_dir, text_data, tmp_path, uninterrupted):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), "--search", "naive",
                *ARGS[:2], "--num-samples", "3", *ARGS[4:], "--resume")
    assert r.exit_code == 3
    assert "settings.num_samples (4 -> 3)" in r.stderr and "loading" not in r.stderr  # refused before loading


def test_corrupt_checkpoint_is_refused(deep_dir, text_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_text('{"steps": [')
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), *ARGS, "--resume")
    assert r.exit_code == 2 and r.stderr.startswith("Error: checkpoint") and "corrupt" in r.stderr


def test_resume_without_checkpoint(deep_dir, text_data, tmp_path):
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(tmp_path / "none"), *ARGS, "--resume")
    assert r.exit_code == 2 and "nothing to resume" in r.stderr


def test_checkpoint_with_custom_code_needs_trust_remote_code(glm_dir, text_data, tmp_path):
    import shutil

    path = tmp_path / "custom"
    shutil.copytree(glm_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    r = run_cli("--model", str(path), "--data", str(text_data), "--out", str(tmp_path / "o"), *ARGS)
    assert r.exit_code == 2 and "--trust-remote-code" in r.stderr
    assert "custom code ran" not in r.stdout + r.stderr


def test_pickle_weights_are_refused(glm_dir, text_data, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    path = tmp_path / "pickled"
    shutil.copytree(glm_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")
    r = run_cli("--model", str(path), "--data", str(text_data), "--out", str(tmp_path / "o"), *ARGS)
    assert r.exit_code == 2 and "pickle" in r.stderr and "--allow-pickle" in r.stderr


def test_out_of_memory_names_the_knobs_and_keeps_the_checkpoint(deep_dir, text_data, tmp_path, monkeypatch):
    import torch

    from indexcache_calib.runner import PatternRunner

    real, calls = PatternRunner.score, {"n": 0}

    def score_then_run_out(self, pattern):
        calls["n"] += 1
        if calls["n"] > 12:  # after the first step (9 candidates) has been checkpointed
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, pattern)

    monkeypatch.setattr(PatternRunner, "score", score_then_run_out)
    out = tmp_path / "run"
    r = run_cli("--model", str(deep_dir), "--data", str(text_data), "--out", str(out), "--search", "naive", *ARGS)
    assert r.exit_code == 4
    lines = [l for l in r.stderr.splitlines() if l.startswith(("Error:", "Hint:"))]
    assert lines[0] == "Error: out of memory" and "--indexer-chunk" in lines[1] and "--max-memory" in lines[1]
    assert "Traceback" not in r.stderr
    assert len(json.loads((out / CHECKPOINT).read_text())["steps"]) == 1
    assert not (out / LAYER_MAP).exists()


@pytest.mark.parametrize("search", ["race", "exact"])
def test_a_run_stopped_mid_step_resumes_without_scoring_its_finished_candidates_again(search, deep_dir, text_data,
                                                                                      tmp_path, monkeypatch):
    from indexcache_calib.artifact import IN_FLIGHT
    from indexcache_calib.runner import PatternRunner

    args = ["--model", str(deep_dir), "--data", str(text_data), "--search", search, "--seq-len", "48",
            "--num-samples", "8", "--batch-size", "1", "--num-full", "3", "--no-plots"]
    whole = tmp_path / "whole"
    assert run_cli(*args, "--out", str(whole)).exit_code == 0
    asked: list = []
    score = PatternRunner.score

    def stop_in_step_two(self, pattern, batches=None):
        asked.append((pattern, None if batches is None else list(batches)))
        steps = json.loads((out / CHECKPOINT).read_text())["steps"] if (out / CHECKPOINT).exists() else []
        if len(steps) == 1 and (out / IN_FLIGHT).exists() and len(json.loads((out / IN_FLIGHT).read_text())["calls"]) >= 3:
            raise KeyboardInterrupt
        return score(self, pattern, batches)

    out = tmp_path / "run"
    monkeypatch.setattr(PatternRunner, "score", stop_in_step_two)
    r = run_cli(*args, "--out", str(out))
    assert r.exit_code == 130 and "--resume" in r.stderr
    saved = [c["key"] for c in json.loads((out / IN_FLIGHT).read_text())["calls"] if c["key"][0] == "score"]
    assert len(saved) >= 3
    asked.clear()
    monkeypatch.setattr(PatternRunner, "score", lambda self, pattern, batches=None: (
        asked.append((pattern, None if batches is None else list(batches))), score(self, pattern, batches))[1])
    r = run_cli(*args, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.stderr
    assert "saved score" in r.stderr
    for _, patterns, batches in saved:  # not one of the saved scores ran again
        assert all((p, batches) not in asked for p in patterns)
    assert body(out / LAYER_MAP) == body(whole / LAYER_MAP)
    assert (out / TRACE).read_bytes() == (whole / TRACE).read_bytes()
    assert not (out / IN_FLIGHT).exists()

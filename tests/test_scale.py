"""Placement and parallelism change where the work runs, never the answer."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, TRACE
from indexcache_calib.cli import app
from indexcache_calib.search import greedy_search

from test_search import Additive

runner = CliRunner()
ARGS = ["--seq-len", "48", "--num-samples", "4", "--batch-size", "2", "--num-full", "2", "--no-plots"]


def answer(run_dir):
    data = json.loads((run_dir / LAYER_MAP).read_text())
    for key in ("environment", "provenance"):
        data.pop(key)
    return data


@pytest.fixture(scope="module")
def reference(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *ARGS])
    assert r.exit_code == 0, r.stderr
    return out


def test_layers_offloaded_to_disk_give_the_same_pattern_and_losses(glm_dir, text_data, tmp_path, reference):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("disk" if i in (1, 2, 4) else "cpu") for i in range(6)})
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    out = tmp_path / "run"
    r = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *ARGS,
                            "--device-map", str(tmp_path / "map.json"), "--offload-dir", str(tmp_path / "offload")])
    assert r.exit_code == 0, r.stderr
    placed = json.loads((out / LAYER_MAP).read_text())["provenance"]["device_map"]
    assert placed["model.layers.1"] == "disk" and placed["model.layers.0"] == "cpu"
    assert answer(out) == answer(reference)
    assert (out / TRACE).read_bytes() == (reference / TRACE).read_bytes()


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_candidate_parallel_processes_give_the_single_process_answer(glm_dir, text_data, tmp_path, reference):
    out = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:  # a free port: another suite on this host may be running the same test
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", port, "-m", "indexcache_calib", "calibrate",
                        "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *ARGS],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / LAYER_MAP).read_text())["environment"]["processes"] == 2
    assert answer(out) == answer(reference)
    assert (out / TRACE).read_bytes() == (reference / TRACE).read_bytes()


class Grouped(Additive):
    """Scores several patterns per call, like a candidate-parallel evaluator with `parallel` workers."""

    def __init__(self, costs, pair_bonus, parallel):
        super().__init__(costs, pair_bonus, num_sequences=4)
        self.parallel = parallel

    def score_many(self, patterns, batches=None):
        return [self.score(p, batches) for p in patterns]


@pytest.mark.parametrize("parallel", [2, 3, 5])
def test_the_race_takes_the_same_steps_whatever_the_number_of_workers(parallel):
    costs = [0, 0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36, 0.2, 0.25]
    _, one = greedy_search("F" * 10, 2, Additive(costs, pair_bonus=0.2, num_sequences=4), search="race")
    _, many = greedy_search("F" * 10, 2, Grouped(costs, 0.2, parallel), search="race")
    assert [(s.chosen, sorted(s.scores)) for s in many] == [(s.chosen, sorted(s.scores)) for s in one]


def test_dry_run_loads_no_weights_and_counts_the_naive_work(glm_dir, text_data, tmp_path):
    import shutil as sh

    cfg_only = tmp_path / "config-only"
    cfg_only.mkdir()
    sh.copy(glm_dir / "config.json", cfg_only / "config.json")  # no weights: a dry run must not need them
    r = runner.invoke(app, ["calibrate", "--model", str(cfg_only), "--data", str(text_data), "--seq-len", "48",
                            "--num-samples", "4", "--num-full", "2", "--search", "naive", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    # Algorithm 1 from 6 layers to 2: all-Full + 5 + 4 + 3 + 2 candidates, and the uniform baselines at 1/2 and
    # 1/4 (1/8 keeps one Full layer, under the target), each a 6-layer forward of 4 sequences.
    assert plan["work"] == {"patterns": 17, "layer_forwards": 17 * 6 * 4}
    real = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", "48",
                               "--num-samples", "4", "--num-full", "2", "--search", "naive", "--json",
                               "--out", str(tmp_path / "naive"), "--no-plots"])
    assert real.exit_code == 0, real.stderr
    done = json.loads(real.stdout)["environment"]["work"]
    assert (done["patterns_scored"], done["layer_forwards"]) == (17, 17 * 6 * 4)  # what the dry run said
    assert plan["num_full_target"] == 2 and plan["weights_total"] > 0
    exact = runner.invoke(app, ["calibrate", "--model", str(cfg_only), "--data", str(text_data), "--seq-len", "48",
                                "--num-samples", "4", "--num-full", "2", "--search", "exact", "--dry-run", "--json"])
    work = json.loads(exact.stdout)["work"]
    assert work["patterns"] == 17 and work["layer_forwards_typical"] < plan["work"]["layer_forwards"]
    # Every search's work side by side, in tokens through decoder layers.
    by = plan["work_by_search"]
    assert by["naive"] == {"layer_forwards": 17 * 6 * 4, "tokens": 17 * 6 * 4 * 48, "estimate": "exact"}
    # With 4 sequences there is little to race: the race's estimate (its end points included) is no better.
    assert by["race"]["tokens"] >= 0.9 * by["exact"]["tokens"]
    many = runner.invoke(app, ["calibrate", "--model", str(cfg_only), "--data", str(text_data), "--seq-len", "48",
                               "--num-samples", "64", "--num-full", "2", "--dry-run", "--json"])
    by = json.loads(many.stdout)["work_by_search"]
    assert by["race"]["tokens"] < by["exact"]["tokens"] < by["naive"]["tokens"]
    chunked = runner.invoke(app, ["calibrate", "--model", str(cfg_only), "--data", str(text_data), "--seq-len", "48",
                                  "--num-full", "2", "--indexer-chunk", "12", "--dry-run", "--json"])
    assert json.loads(chunked.stdout)["indexer_peak_per_layer"] * 4 == plan["indexer_peak_per_layer"]


def test_cache_budget_moves_the_prefix_cache_to_disk_with_the_same_answer(glm_dir, text_data, tmp_path, reference):
    out = tmp_path / "run"
    r = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--out", str(out), *ARGS,
                            "--cache-budget", "1KB"])
    assert r.exit_code == 0, r.stderr
    assert "keeping it on disk" in r.stderr
    assert json.loads((out / LAYER_MAP).read_text())["environment"]["cache_device"] == "disk"
    assert answer(out) == answer(reference)

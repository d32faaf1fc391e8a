"""What a new user hit: the data they bring, the options they combine, the plan they size a cluster
with, and where the artifacts go."""

import json

import pytest
from conftest import one_error_line, write_docs
from typer.testing import CliRunner

from indexcache_calib.cli import app
from indexcache_calib.data import read_documents
from indexcache_calib.errors import CalibError

runner = CliRunner()


# -- data ------------------------------------------------------------------------------------------

def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    plain = write_docs(tmp_path / "plain.jsonl", n=3)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_documents(bom).texts == read_documents(plain).texts
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfsome text")
    assert read_documents(txt).texts == ["some text"]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_byte_that_is_not_utf8_is_reported_with_its_line(tmp_path, suffix):
    bad = tmp_path / f"latin1{suffix}"
    bad.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CalibError, match=rf"latin1\{suffix}:3: not UTF-8 text \(byte 0xe9\)"):
        read_documents(bad)


def test_calibrate_on_a_non_utf8_file_names_the_line(glm_dir, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    result = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "latin1.jsonl:1: not UTF-8 text" in one_error_line(result)
    assert not (tmp_path / "o").exists()


# -- the prefix cache is placed before any weight loads ---------------------------------------------

def _calibrate(model, data, out, *extra):
    return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data), "--seq-len", "48",
                               "--num-samples", "4", "--num-full", "2", "--out", str(out), *extra])


def test_the_dry_run_sends_a_cache_over_budget_to_disk(glm_dir, text_data, tmp_path):
    over = _calibrate(glm_dir, text_data, tmp_path / "o", "--cache-budget", "1KB", "--dry-run", "--json")
    assert over.exit_code == 0, over.stderr
    plan = json.loads(over.stdout)
    assert plan["activation_cache"] > 1000 and plan["activation_cache_device"] == "disk"
    assert any("over --cache-budget 1KB: keeping it on disk" in w for w in plan["warnings"])
    within = json.loads(_calibrate(glm_dir, text_data, tmp_path / "o", "--cache-budget", "1GB", "--dry-run", "--json").stdout)
    assert within["activation_cache_device"] == "cpu"


@pytest.mark.parametrize("dry", [True, False])
def test_a_disk_cache_larger_than_the_free_space_is_refused_before_loading(dry, glm_dir, text_data, tmp_path, monkeypatch):
    import shutil

    from indexcache_calib import calibrate as cal

    monkeypatch.setattr(cal.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    loaded = []
    monkeypatch.setattr(cal, "prepare", lambda *a, **k: loaded.append(1))
    r = _calibrate(glm_dir, text_data, tmp_path / "o", "--cache-device", "disk", *(["--dry-run"] if dry else []))
    assert r.exit_code == 2
    assert "on disk, but" in one_error_line(r) and "100 B free" in r.stderr
    assert not loaded and not (tmp_path / "o").exists()


# -- the GLM-5 plan in docs/scaling-out.md is what the tool prints ---------------------------------

GLM5_ARGS = ["--data", "x.jsonl", "--seq-len", "16384", "--num-samples", "64", "--target", "1/4", "--dtype", "bfloat16",
             "--device-map", "sequential", "--max-memory",
             ",".join(f"{i}=130GiB" for i in range(8)) + ",cpu=400GiB", "--dry-run"]


def _plan_rows(text: str) -> list[str]:
    """The table's rows up to its warnings (those name this host's memory, which differs between hosts)."""
    rows = [line.rstrip() for line in text.splitlines() if line.startswith(("┌", "│", "└"))]
    cut = next(i for i, line in enumerate(rows) if line.startswith("│ warning"))
    return rows[:cut]


def test_the_readme_glm5_dry_run_is_what_the_tool_prints(tmp_path, monkeypatch):
    from pathlib import Path

    from transformers import GlmMoeDsaConfig

    GlmMoeDsaConfig().save_pretrained(tmp_path / "GLM-5")  # GLM-5's configuration, no weights, no tokenizer
    (tmp_path / "x.jsonl").write_text('{"text": "hello world"}\n')
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["calibrate", "--model", str(tmp_path / "GLM-5"), *GLM5_ARGS], env={"COLUMNS": "116"})
    assert r.exit_code == 0, r.stderr
    readme = (Path(__file__).parent.parent / "docs" / "scaling-out.md").read_text()
    start = readme.index("$ indexcache calibrate --model /models/GLM-5")
    block = readme[start: readme.index("```", start)]
    assert _plan_rows(r.stdout + r.stderr) == _plan_rows(block), "rerun the GLM-5 --dry-run in docs/scaling-out.md and paste its output"


# -- options ---------------------------------------------------------------------------------------

def test_a_config_without_a_tokenizer_is_named_plainly_in_the_dry_run(glm_dir, text_data, tmp_path):
    import shutil

    cfg_only = tmp_path / "config-only"
    cfg_only.mkdir()
    shutil.copy(glm_dir / "config.json", cfg_only / "config.json")
    r = _calibrate(cfg_only, text_data, tmp_path / "o", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    warning = next(w for w in json.loads(r.stdout)["warnings"] if "tokenizer" in w)
    assert warning.startswith(f"cannot load the tokenizer of {cfg_only}: it has none of tokenizer.json, ")
    assert ": :" not in warning


def test_max_memory_values_must_be_sizes(glm_dir, text_data, tmp_path):
    r = _calibrate(glm_dir, text_data, tmp_path / "o", "--max-memory", "0=abc", "--dry-run")
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "'abc' is not a size" in line and "out of memory" not in r.stderr


def test_evaluate_refuses_a_uniform_ratio_past_the_layers(glm_dir, text_data, tmp_path):
    r = runner.invoke(app, ["evaluate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", "48",
                            "--num-samples", "2", "--uniform", "2,32"])
    assert r.exit_code == 2
    assert "--uniform 32 asks for one Full layer every 32 of the model's 6 indexer layers" in one_error_line(r)


def test_resume_with_overwrite_is_refused_by_distill_as_by_calibrate(glm_dir, text_data, tmp_path):
    r = runner.invoke(app, ["distill", "--model", str(glm_dir), "--data", str(text_data), "--out", str(tmp_path / "d"),
                            "--uniform", "2", "--seq-len", "48", "--resume", "--overwrite"])
    assert r.exit_code == 2
    assert "--resume and --overwrite contradict each other" in one_error_line(r)


# -- the ETA follows the work left, not the steps left -----------------------------------------------

def test_the_search_eta_weighs_steps_by_their_work():
    from indexcache_calib.cli import SearchEta

    now = [0.0]
    eta = SearchEta(steps=10, clock=lambda: now[0])
    now[0] = 60.0
    eta.step(15)  # step 1, the full sweep: 60 s for 900 of the 1,000 forwards the search typically takes
    eta.work(900, 1000)
    assert eta.search_left() == pytest.approx(60 / 900 * 100)  # not 60 s x 9 steps
    eta.work(1100, 1000)  # past the estimate: nothing left to promise, not a negative time
    assert eta.search_left() == 0.0


def test_calibrate_reports_its_work_before_each_step(glm_dir, text_data, tmp_path):
    from indexcache_calib.calibrate import Hooks, Options, calibrate

    seen = []
    hooks = Hooks(work=lambda done, expected: seen.append((done, expected)), step=lambda s: seen.append(s.step))
    calibrate(Options(model=str(glm_dir), data=str(text_data), seq_len=48, num_samples=8, num_full=2,
                      out=str(tmp_path / "o"), plots=False), hooks)
    works = [x for x in seen if isinstance(x, tuple)]
    assert len(works) == 4 and all(isinstance(seen[i + 1], int) for i, x in enumerate(seen) if isinstance(x, tuple))
    assert [d for d, _ in works] == sorted(d for d, _ in works) and works[0][0] > 0
    assert len({e for _, e in works}) == 1 and works[0][1] > 0


# -- handing the layer map over ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = _calibrate(glm_dir, text_data, out, "--no-plots")
    assert r.exit_code == 0, r.stderr
    return out


def test_validate_names_an_unfinished_run_as_show_does(finished_run, tmp_path):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "layer_map.json").unlink()
    for command in ("validate", "show"):
        line = one_error_line(runner.invoke(app, [command, str(unfinished)]))
        assert "holds an unfinished calibration run" in line and "does not exist" not in line


def test_export_refuses_a_local_model_path_that_does_not_exist(finished_run, tmp_path):
    r = runner.invoke(app, ["export", str(finished_run), "--engine", "vllm", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in one_error_line(r) and not r.stdout
    hub = runner.invoke(app, ["export", str(finished_run), "--engine", "vllm", "--model", "org/name"])
    assert hub.exit_code == 0 and "org/name" in hub.stdout  # a hub id is the engine's to fetch


def test_export_trtllm_says_where_its_keys_go(finished_run):
    r = runner.invoke(app, ["export", str(finished_run), "--engine", "trtllm", "--model", "org/name"])
    assert r.exit_code == 0 and json.loads(r.stdout)["index_topk_pattern"]
    assert "config.json" in r.stderr and "indexcache apply" in r.stderr


def test_show_prints_the_search_and_its_tolerance(finished_run):
    r = runner.invoke(app, ["show", str(finished_run)])
    assert r.exit_code == 0, r.stderr
    assert "search race; tolerance auto" in r.stdout and "nats given away" in r.stdout.replace("\n", " ")
    data = json.loads(runner.invoke(app, ["show", str(finished_run), "--json"]).stdout)
    assert data["search"]["strategy"] == "race" and "per step at 95% confidence" in data["search"]["tolerance"]


def test_validate_against_an_uncached_hub_model_asks_for_its_config_only(finished_run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = runner.invoke(app, ["validate", str(finished_run), "--model", "org/not-cached"])
    assert r.exit_code == 2
    assert "not in the local Hugging Face cache" in one_error_line(r)
    assert "Hint: its config is enough here: hf download org/not-cached config.json" in r.stderr

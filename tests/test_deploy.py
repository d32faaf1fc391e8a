"""export, validate, apply and show on a layer map calibrated once per session."""

import json
import os
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, TOKENS, load_tokens
from indexcache_calib.cli import app
from indexcache_calib.pattern import indexer_types, source_layers
from indexcache_calib.testing import save_tiny

runner = CliRunner()
PAPER_30B = "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(result):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert lines and all(l.startswith(("Error: ", "Hint: ", "Note: ")) for l in lines), lines
    return [l[len("Error: "):] for l in lines if l.startswith("Error: ")]


@pytest.fixture(scope="session")
def run_dir(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--seq-len", "48", "--num-samples", "3",
               "--num-full", "2", "--out", out, "--no-plots")
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture
def layer_map(run_dir):
    return json.loads((run_dir / LAYER_MAP).read_text())


def _write_map(tmp_path, lm, name="map.json"):
    path = tmp_path / name
    path.write_text(json.dumps(lm))
    return path


def _model_copy(src, dst, **config_changes):
    """A checkpoint sharing `src`'s weights, with its config.json edited."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- export ----------------------------------------------------------------------------------------


def test_export_vllm_and_sglang_lines_set_both_keys(run_dir, layer_map, glm_dir):
    pattern = layer_map["pattern"]
    for engine, head, flag in (("vllm", ["vllm", "serve"], "--hf-overrides"),
                               ("sglang", ["python", "-m", "sglang.launch_server", "--model-path"], "--json-model-override-args")):
        r = invoke("export", run_dir / LAYER_MAP, "--engine", engine)
        assert r.exit_code == 0, r.stderr
        argv = shlex.split(r.stdout)
        assert argv[: len(head)] == head and argv[len(head)] == str(glm_dir)  # the calibrated model by default
        assert argv[len(head) + 1] == flag
        assert json.loads(argv[-1]) == {"index_topk_pattern": pattern, "indexer_types": indexer_types(pattern), "use_index_cache": True}
        assert len(argv) == len(head) + 3


def test_export_trtllm_json_and_out_file(run_dir, layer_map, tmp_path):
    r = invoke("export", run_dir, "--engine", "trtllm", "--model", "org/name")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"index_topk_pattern": layer_map["pattern"], "indexer_types": layer_map["indexer_types"]}
    target = tmp_path / "launch.sh"
    r = invoke("export", run_dir, "--engine", "vllm", "--model", "org/my model", "--out", target)
    assert r.exit_code == 0 and str(target) in r.stdout
    assert shlex.split(target.read_text())[2] == "org/my model"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    r = invoke("export", run_dir, "--engine", "sglang", "--json")
    data = json.loads(r.stdout)
    assert data["engine"] == "sglang" and data["overrides"]["index_topk_pattern"] == layer_map["pattern"]
    assert shlex.join(data["argv"]) == data["text"]


def test_export_transformers_snippet_builds_shared_layers(run_dir, layer_map, glm_dir):
    r = invoke("export", run_dir, "--engine", "transformers")
    assert r.exit_code == 0, r.stderr
    assert "index_topk_pattern=" not in r.stdout  # from_pretrained rejects that keyword
    scope = {}
    exec(r.stdout, scope)  # the printed snippet, as a user would paste it
    built = [layer.self_attn.indexer is not None for layer in scope["model"].model.layers]
    assert built == [c == "F" for c in layer_map["pattern"]]


def test_export_refusals(run_dir, layer_map, tmp_path):
    assert "unknown --engine" in error_lines(invoke("export", run_dir, "--engine", "tgi"))[0]
    assert "does not exist" in error_lines(invoke("export", tmp_path / "none.json", "--engine", "vllm"))[0]
    dsv = {**layer_map, "family": "deepseek_v32",
           "provenance": {**layer_map["provenance"], "architecture": "DeepseekV32ForCausalLM", "model_type": "deepseek_v32"}}
    assert "no indexer sharing" in error_lines(invoke("export", _write_map(tmp_path, dsv), "--engine", "transformers"))[0]
    broken = {**layer_map, "indexer_types": ["full"] * layer_map["num_layers"]}
    assert "indexer_types disagree" in error_lines(invoke("export", _write_map(tmp_path, broken, "b.json"), "--engine", "vllm"))[0]
    (tmp_path / "junk.json").write_text("{")
    assert "not valid JSON" in error_lines(invoke("export", tmp_path / "junk.json", "--engine", "vllm"))[0]


# -- validate --------------------------------------------------------------------------------------


def test_validate_accepts_the_layer_map_and_the_paper_pattern(run_dir, glm_dir):
    r = invoke("validate", run_dir / LAYER_MAP, "--model", glm_dir)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("OK: ") and len(r.stdout.strip().splitlines()) == 1
    r = invoke("validate", PAPER_30B)
    assert r.exit_code == 0 and "12 of 47" in r.stdout and "not checked" in r.stderr
    r = invoke("validate", PAPER_30B, "--model", glm_dir, "--json")
    assert r.exit_code == 2
    report = json.loads(r.stdout)
    assert report["valid"] is False and report["problems"] == ["pattern has 47 layers, the model has 6"]


def test_validate_lists_every_problem(glm_dir):
    r = invoke("validate", "SFXF", "--model", glm_dir)
    problems = error_lines(r)
    assert r.exit_code == 2
    assert len(problems) == 3
    assert "'X'" in problems[0] and "layer 0 must be 'F'" in problems[1] and "4 layers, the model has 6" in problems[2]


def test_validate_mtp_layers_are_not_in_the_pattern(glm_dir, tmp_path):
    model = _model_copy(glm_dir, tmp_path / "mtp", num_nextn_predict_layers=1)
    problems = error_lines(invoke("validate", "FSSFSSF", "--model", model))
    assert len(problems) == 1 and "MTP/NextN" in problems[0] and "drop its last 1" in problems[0]
    assert invoke("validate", "FSSFSS", "--model", model).exit_code == 0


def test_validate_layers_without_indexer_weights_must_be_shared(tmp_path):
    types = ["full", "shared", "full", "shared", "full", "shared"]
    model = save_tiny(tmp_path / "glm52", "glm", layers=6, indexer_types=types)  # ships no indexer weights at 1, 3, 5
    r = invoke("validate", "FFSFSF", "--model", model, "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 2 and not report["valid"]
    assert report["problems"] == [f"layer {i} has no indexer weights in the checkpoint, so it must be 'S'" for i in (1, 3, 5)]
    assert invoke("validate", "FSSSFS", "--model", model).exit_code == 0


def test_validate_architecture_and_layer_map_consistency(run_dir, layer_map, glm_dir, tmp_path):
    model = _model_copy(glm_dir, tmp_path / "lite", model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"])
    assert any("not a DSA model" in p for p in error_lines(invoke("validate", layer_map["pattern"], "--model", model)))
    pattern = layer_map["pattern"]
    tampered = dict(layer_map)
    tampered["indexer_types"] = indexer_types("F" * len(pattern))
    tampered["engines"] = {**layer_map["engines"], "vllm": {**layer_map["engines"]["vllm"], "value": json.dumps({"index_topk_pattern": pattern})}}
    problems = error_lines(invoke("validate", _write_map(tmp_path, tampered)))
    assert len(problems) == 2
    assert "indexer_types disagree with its pattern at layers" in problems[0] and "vllm overrides disagree" in problems[1]
    assert "does not exist" in error_lines(invoke("validate", tmp_path / "missing.json"))[0]
    assert "not a model directory" in error_lines(invoke("validate", "FS", "--model", tmp_path))[0]


# -- apply -----------------------------------------------------------------------------------------


def test_apply_gives_transformers_native_sharing_with_the_reported_loss(run_dir, layer_map, glm_dir, tmp_path):
    from transformers import GlmMoeDsaForCausalLM

    out = tmp_path / "applied"
    r = invoke("apply", run_dir / LAYER_MAP, "--model", glm_dir, "--out", out)
    assert r.exit_code == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["index_topk_pattern"] == layer_map["pattern"] and config["indexer_types"] == layer_map["indexer_types"]
    others = sorted(p.name for p in glm_dir.iterdir() if p.name != "config.json")
    assert sorted(p.name for p in out.iterdir() if p.name != "config.json") == others
    assert all((out / n).is_symlink() and (out / n).resolve() == (glm_dir / n).resolve() for n in others)
    assert not (glm_dir / "config.json").read_text().count("index_topk_pattern")  # the source is untouched

    model = GlmMoeDsaForCausalLM.from_pretrained(out).eval()
    assert [layer.self_attn.indexer is None for layer in model.model.layers] == [c == "S" for c in layer_map["pattern"]]
    ids = load_tokens(run_dir / TOKENS)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").double()
    assert abs(ce.sum().item() / ce.numel() - layer_map["loss"]["final"]) < 1e-6
    assert source_layers(layer_map["pattern"]) == layer_map["source_layers"]


def test_apply_refuses_to_clobber_and_replaces_with_overwrite(run_dir, glm_dir, tmp_path):
    out = tmp_path / "applied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("apply", run_dir, "--model", glm_dir, "--out", out)
    assert "not empty" in error_lines(r)[0] and (out / "keep.txt").read_text() == "mine"
    r = invoke("apply", run_dir, "--model", glm_dir, "--out", out, "--overwrite")
    assert r.exit_code == 2 and "did not write" in error_lines(r)[0]  # --overwrite replaces only what apply wrote
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    r = invoke("apply", run_dir, "--model", glm_dir, "--out", out)
    assert r.exit_code == 0, r.stderr
    r = invoke("apply", run_dir, "--model", glm_dir, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert (out / "config.json").exists()
    assert (glm_dir / "model.safetensors").exists()  # replacing links never touches their targets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied"]  # no temp dirs left
    assert "would delete the model" in error_lines(invoke("apply", run_dir, "--model", glm_dir, "--out", glm_dir.parent, "--overwrite"))[0]
    assert "inside the model directory" in error_lines(invoke("apply", run_dir, "--model", glm_dir, "--out", glm_dir / "x"))[0]


def test_apply_refuses_an_invalid_pattern_and_leaves_nothing(run_dir, glm_dir, tmp_path):
    types = ["full", "shared", "full", "shared", "full", "shared"]
    model = save_tiny(tmp_path / "glm52", "glm", layers=6, indexer_types=types)
    lm = json.loads((run_dir / LAYER_MAP).read_text())
    lm.update(pattern="FFFFFF", indexer_types=["full"] * 6, num_full=6, full_layers=list(range(6)))
    out = tmp_path / "applied"
    r = invoke("apply", _write_map(tmp_path, lm), "--model", model, "--out", out)
    problems = error_lines(r)
    assert r.exit_code == 2 and len(problems) == 5  # three layers without weights, the engines' args x2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_apply_falls_back_when_symlinks_fail_and_never_half_writes(run_dir, glm_dir, tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    out = tmp_path / "hard"
    r = invoke("apply", run_dir, "--model", glm_dir, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "symlinks are not possible" in r.stderr and "hard link" in r.stderr
    assert not (out / "model.safetensors").is_symlink() and os.path.samefile(out / "model.safetensors", glm_dir / "model.safetensors")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full_disk)
    monkeypatch.setattr(shutil, "copy2", full_disk)
    out = tmp_path / "half"
    assert "No space left" in error_lines(invoke("apply", run_dir, "--model", glm_dir, "--out", out))[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard"]


def test_apply_deepseek_writes_keys_and_says_transformers_ignores_them(dsv32_dir, text_data, tmp_path):
    run = tmp_path / "run"
    r = invoke("calibrate", "--model", dsv32_dir, "--data", text_data, "--seq-len", "48", "--num-samples", "3",
               "--num-full", "2", "--out", run, "--no-plots")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "dsv"
    r = invoke("apply", run, "--model", dsv32_dir, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "transformers has no indexer sharing for DeepseekV32ForCausalLM" in r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["index_topk_pattern"] == json.loads((run / LAYER_MAP).read_text())["pattern"] and config["use_index_cache"] is True


def test_a_layer_map_of_one_family_does_not_apply_to_another(run_dir, dsv32_dir, tmp_path):
    r = invoke("apply", run_dir, "--model", dsv32_dir, "--out", tmp_path / "dsv")
    assert r.exit_code == 2 and "calibrated on a glm_moe_dsa model" in r.stderr
    assert not (tmp_path / "dsv").exists()


# -- show ------------------------------------------------------------------------------------------


def test_show_draws_and_json_carries_the_same_data(run_dir, layer_map, tmp_path):
    r = invoke("show", run_dir)
    assert r.exit_code == 0, r.stderr
    assert layer_map["pattern"] in r.stdout and "uniform 1/4" in r.stdout and "this layer map" in r.stdout
    assert layer_map["provenance"]["tokens_sha256"] in r.stdout.replace("│", "").replace("\n", "").replace(" ", "")
    data = json.loads(invoke("show", run_dir / LAYER_MAP, "--json").stdout)
    assert [row["type"] for row in data["layers"]] == list(layer_map["pattern"])
    assert [row["reads_from"] for row in data["layers"]] == layer_map["source_layers"]
    shared = {str(row["layer"]): row["overlap"] for row in data["layers"] if row["type"] == "S"}
    assert shared == layer_map["layer_overlap"]
    assert data["path"][0]["delta"] == 0 and data["path"][-1]["loss"] == layer_map["loss"]["final"]
    for before, step in zip(data["path"], data["path"][1:]):  # each step flips exactly the layer it names
        assert len(step["flipped"]) == 1 and before["pattern"][step["flipped"][0]] == "F" and step["pattern"][step["flipped"][0]] == "S"
    assert {u["ratio"] for u in data["uniform"]} == set(layer_map["uniform"])
    (tmp_path / "other.json").write_text('{"schema": "other"}')
    assert "not an indexcache layer map" in error_lines(invoke("show", tmp_path / "other.json"))[0]


def test_show_marks_the_steps_decided_by_less_than_two_standard_errors(layer_map, tmp_path):
    lm = json.loads(json.dumps(layer_map))
    for step in lm["path"][1:]:
        step.update({"runner_up": 9, "gap": 0.01, "gap_se": 0.001, "decided": True})
    lm["path"][2].update({"runner_up": 4, "gap": 0.0015, "gap_se": 0.001, "decided": False})
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    data = json.loads(invoke("show", tmp_path / "lm.json", "--json").stdout)
    assert data["undecided_steps"] == [2] and [s["decided"] for s in data["path"]].count(False) == 1
    r = invoke("show", tmp_path / "lm.json")
    assert r.exit_code == 0, r.stderr
    squeezed = "".join(c for c in r.stdout if not c.isspace() and c not in "│┃")
    assert "undecided:1.5SEoverlayer4" in squeezed  # the step's row in the path table
    assert "1 of 4 steps undecided: more calibration sequences would separate these layers" in " ".join(r.stdout.split())

"""`indexcache dsa-convert` and `indexcache distill` on tiny random checkpoints: what is kept bit for bit, what
is trained, resume, the families distill accepts and refuses, and the one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import one_error_line
from indexcache_calib.training import trainloop as tl
from indexcache_calib.cli import app
from indexcache_calib.testing import save_char_tokenizer

runner = CliRunner()
SMALL = ["--seq-len", "48", "--batch-size", "2"]
CONVERT = [*SMALL, "--index-topk", "8", "--index-heads", "2", "--index-head-dim", "16"]


def _randomise(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)


def save_lite(path, layers=4, seed=0):
    """A random glm4_moe_lite (GLM-4.7-Flash's architecture) with one dense and MoE layers after it."""
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    config = Glm4MoeLiteConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = Glm4MoeLiteForCausalLM(config)
    _randomise(model, seed)
    model.save_pretrained(path)
    save_char_tokenizer(path, 96)
    return path


def save_hy(path, layers=6):
    from transformers import HYV4Config, HYV4ForCausalLM

    config = HYV4Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        index_topk=8, index_head_dim=16, index_n_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, hc_mult=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # the default indexer_types: Full at 0, 1, 5 (others ship no indexer)
    model = HYV4ForCausalLM(config)
    _randomise(model)
    model.save_pretrained(path)
    save_char_tokenizer(path, 96)
    return path


def save_mistral(path, layers=6):
    from transformers import (
        MistralLarge4Config, MistralLarge4ForConditionalGeneration, MistralLarge4TextConfig, PixtralVisionConfig,
    )

    text = MistralLarge4TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, head_dim=8, index_topk=8, index_head_dim=16, index_n_heads=2, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=16)
    model = MistralLarge4ForConditionalGeneration(MistralLarge4Config(text_config=text, vision_config=vision))
    _randomise(model)
    model.save_pretrained(path)
    save_char_tokenizer(path, 96)
    return path


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    return save_lite(tmp_path_factory.mktemp("lite"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def weights(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(lite_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "dsa"
    r = invoke("dsa-convert", "--model", lite_dir, "--data", text_data, "--out", out, "--steps", 6,
               "--checkpoint-every", 2, *CONVERT, "--eval-data", text_data, "--eval-samples", 2, "--json")
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


# ----------------------------------------------------------------------------- dsa-convert

def test_conversion_keeps_every_original_weight_bit_for_bit(lite_dir, converted):
    out, result = converted
    src, dst = weights(lite_dir), weights(out)
    for name, t in src.items():
        assert dst[name].dtype == t.dtype and torch.equal(dst[name], t), name
    added = sorted(set(dst) - set(src))
    assert added and all(".self_attn.indexer." in n for n in added)
    assert {n.split(".self_attn.")[0] for n in added} == {f"model.layers.{i}" for i in range(4)}
    assert result["weights"]["added"] == added and result["weights"]["dropped"] == []
    assert not (out / tl.STATE_DIR).exists()
    assert (out / "MODEL_CARD.md").is_file() and (out / "training_log.json").is_file() and (out / "train_log.csv").is_file()


def test_converted_model_loads_as_dsa_and_is_the_source_network(lite_dir, converted, text_data):
    from transformers import AutoModelForCausalLM

    from indexcache_calib.training.warmup import dense

    out, result = converted
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.indexer_types == ["full"] * 4 and model.config.index_topk == 8
    assert model.config.index_n_heads == 2 and model.config.index_head_dim == 16
    source = AutoModelForCausalLM.from_pretrained(lite_dir)
    x = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dense(model):
        mine = model(input_ids=x).logits
    with torch.no_grad():
        theirs = source(input_ids=x).logits
    assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)
    assert result["check_against_source_max_rel_diff"] <= 1e-3
    assert result["training"]["steps_done"] == 6 and result["training"]["steps_skipped"] == 0
    ev = result["evaluation"]
    assert ev["sequences"] == 2 and set(ev["topk_mass"]) == {"0", "1", "2", "3"}


def test_conversion_trains_the_indexers_from_their_initial_weights(lite_dir, converted, text_data, tmp_path):
    out, _ = converted
    once = tmp_path / "one"
    r = invoke("dsa-convert", "--model", lite_dir, "--data", text_data, "--out", once, "--steps", 1, *CONVERT)
    assert r.exit_code == 0, r.stderr
    a, b = weights(once), weights(out)
    idx = [n for n in b if ".indexer." in n]
    assert any(not torch.equal(a[n], b[n]) for n in idx)
    assert all(torch.equal(a[n], b[n]) for n in b if ".indexer." not in n)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(lite_dir, converted, text_data, tmp_path):
    from indexcache_calib.training.convert import ConvertOptions, convert

    reference, _ = converted
    out = tmp_path / "resumed"
    opts = ConvertOptions(model=str(lite_dir), data=str(text_data), out=str(out), steps=6, seq_len=48, batch_size=2,
                          index_topk=8, index_heads=2, index_head_dim=16, checkpoint_every=2,
                          eval_data=str(text_data), eval_samples=2)

    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(tl.Interrupted) as e:
        convert(opts, tl.Hooks(step=stop_at_3))
    assert e.value.saved_step == 3
    assert (out / tl.STATE_DIR / tl.STATE).is_file() and not (out / "config.json").exists()
    r = invoke("dsa-convert", "--model", lite_dir, "--data", text_data, "--out", out, "--steps", 6,
               "--checkpoint-every", 2, *CONVERT, "--eval-data", text_data, "--eval-samples", 2, "--resume", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["training"]["resumed_from"] == 3
    for f in ("model.safetensors",):
        assert (out / f).read_bytes() == (reference / f).read_bytes()
    ref_log = json.loads((reference / "training_log.json").read_text())
    assert result["evaluation"]["loss"] == ref_log["evaluation"]["loss"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_killed_before_its_first_checkpoint_leaves_nothing_in_the_way(tmp_path, overwrite):
    """SIGKILL runs no `finally`: --out keeps only an empty state directory. A rerun (plain or --overwrite)
    takes it, and removes it again if it fails before a checkpoint; --resume says there is nothing to resume."""
    out = tmp_path / "killed"
    (out / tl.STATE_DIR).mkdir(parents=True)
    tl.check_out(out, None, False, overwrite)
    with pytest.raises(ValueError), tl.output_dir(out, False, overwrite):
        raise ValueError("failed before the first checkpoint")
    assert not out.exists()
    (out / tl.STATE_DIR).mkdir(parents=True)
    with pytest.raises(tl.CalibError, match="nothing to resume"):
        tl.check_resume(out, {})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(tl.CalibError, match="did not write"):
        tl.check_out(out, None, False, True)


def test_a_crash_resumes_from_the_last_checkpoint(lite_dir, converted, text_data, tmp_path):
    from indexcache_calib.training.convert import ConvertOptions, convert

    reference, _ = converted
    out = tmp_path / "crashed"
    opts = ConvertOptions(model=str(lite_dir), data=str(text_data), out=str(out), steps=6, seq_len=48, batch_size=2,
                          index_topk=8, index_heads=2, index_head_dim=16, checkpoint_every=2)

    def crash_at_5(row):
        if row["step"] == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        convert(opts, tl.Hooks(step=crash_at_5))
    opts.resume = True
    result = convert(opts)
    assert result["training"]["resumed_from"] == 4
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_resume_refuses_changed_settings(lite_dir, text_data, tmp_path):
    from indexcache_calib.training.convert import ConvertOptions, convert

    out = tmp_path / "run"
    opts = ConvertOptions(model=str(lite_dir), data=str(text_data), out=str(out), steps=4, seq_len=48, batch_size=2,
                          index_topk=8, index_heads=2, index_head_dim=16, checkpoint_every=1)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(tl.Interrupted):
        convert(opts, tl.Hooks(step=stop))
    r = invoke("dsa-convert", "--model", lite_dir, "--data", text_data, "--out", out, "--steps", 4, *CONVERT,
               "--lr", "0.01", "--resume")
    assert r.exit_code == 3
    assert "settings.lr" in one_error_line(r)
    r = invoke("dsa-convert", "--model", lite_dir, "--data", text_data, "--out", out, "--steps", 4, *CONVERT)
    assert r.exit_code == 2 and "unfinished" in one_error_line(r)


def test_dsa_convert_then_calibrate(converted, text_data, tmp_path):
    out, _ = converted
    r = invoke("calibrate", "--model", out, "--data", text_data, "--seq-len", 48, "--num-samples", 2, "--num-full", 2,
               "--out", tmp_path / "run", "--no-plots", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["pattern"].count("F") == 2


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/dir"], "not found"),
    (["--model", "GLM"], "not found"),
    (["--seq-len", "8", "--index-topk", "8", "--index-head-dim", "16"], "not above index_topk"),
    (["--index-topk", "8", "--index-head-dim", "4"], "index-head-dim"),
    (["--index-topk", "8", "--index-head-dim", "16", "--steps", "0"], "--steps"),
])
def test_dsa_convert_bad_input_is_one_error_line_and_leaves_no_directory(lite_dir, text_data, tmp_path, args, needle):
    out = tmp_path / "out"
    base = ["--model", lite_dir] if "--model" not in args else []
    r = invoke("dsa-convert", *base, "--data", text_data, "--out", out, *args)
    assert r.exit_code == 2
    assert needle in one_error_line(r)
    assert not out.exists()


def test_dsa_convert_refuses_a_non_glm4_moe_lite_model(glm_dir, text_data, tmp_path):
    r = invoke("dsa-convert", "--model", glm_dir, "--data", text_data, "--out", tmp_path / "o", *CONVERT)
    assert r.exit_code == 2
    assert "glm4_moe_lite" in one_error_line(r) and "glm_moe_dsa" in r.stderr
    assert not (tmp_path / "o").exists()


def test_dsa_convert_refuses_empty_data(lite_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = invoke("dsa-convert", "--model", lite_dir, "--data", empty, "--out", tmp_path / "o", *CONVERT)
    assert r.exit_code == 2 and "no text" in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_dsa_convert_defaults_come_from_the_published_glm5_config():
    from indexcache_calib.training.convert import published_defaults

    assert published_defaults() == {"index_topk": 2048, "index_n_heads": 32, "index_head_dim": 128}


# ----------------------------------------------------------------------------- distill

@pytest.fixture(scope="module")
def distilled(glm_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "fss"
    r = invoke("distill", "--model", glm_dir, "--data", text_data, "--out", out, "--uniform", 3, "--steps", 4, *SMALL,
               "--eval-data", text_data, "--eval-samples", 2, "--json")
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def _layer(name):
    return int(name.split("layers.")[1].split(".")[0])


def test_distill_changes_only_the_full_layers_indexers(glm_dir, distilled):
    out, result = distilled
    assert result["pattern"] == "FSSFSS" and result["served"] == {"0": [0, 1, 2], "3": [3, 4, 5]}
    src, dst = weights(glm_dir), weights(out)
    for name, t in dst.items():
        if ".indexer." in name:
            assert _layer(name) in (0, 3), name
        else:
            assert torch.equal(t, src[name]) and t.dtype == src[name].dtype, name
    assert {n for n in src if n not in dst} == {n for n in src if ".indexer." in n and _layer(n) not in (0, 3)}
    trained = [n for n in dst if ".indexer." in n]
    assert any(not torch.equal(dst[n], src[n]) for n in trained if n.endswith("wq_b.weight"))
    assert result["evaluation"]["sequences"] == 2


def test_distilled_checkpoint_runs_its_pattern_natively(distilled):
    from transformers import AutoModelForCausalLM

    out, _ = distilled
    config = json.loads((out / "config.json").read_text())
    assert config["indexer_types"] == ["full", "shared", "shared", "full", "shared", "shared"]
    assert config["index_topk_pattern"] == "FSSFSS" and config["use_index_cache"] is True
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert [layer.self_attn.indexer is None for layer in model.model.layers] == [False, True, True, False, True, True]
    x = torch.randint(3, 96, (1, 40))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x, labels=x).loss)


def test_distill_takes_the_pattern_of_a_calibrate_run(glm_dir, text_data, tmp_path):
    run = tmp_path / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--seq-len", 48, "--num-samples", 2,
               "--num-full", 2, "--out", run, "--no-plots", "--json")
    assert r.exit_code == 0, r.stderr
    pattern = json.loads(r.stdout)["pattern"]
    r = invoke("distill", "--model", glm_dir, "--data", text_data, "--out", tmp_path / "d", "--layer-map", run,
               "--steps", 2, *SMALL, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["pattern"] == pattern


def test_distill_resume_matches_an_uninterrupted_run(glm_dir, text_data, tmp_path):
    from indexcache_calib.training.distill import DistillOptions, distill

    outs = []
    for name, stop in (("whole", None), ("cut", 2)):
        out = tmp_path / name
        opts = DistillOptions(model=str(glm_dir), data=str(text_data), out=str(out), pattern="FSFSSS", steps=4,
                              seq_len=48, batch_size=2, checkpoint_every=3)

        def hook(row, stop=stop):
            if row["step"] == stop:
                raise KeyboardInterrupt

        if stop:
            with pytest.raises(tl.Interrupted):
                distill(opts, tl.Hooks(step=hook))
            opts.resume = True
            assert distill(opts)["training"]["resumed_from"] == 2
        else:
            distill(opts)
        outs.append(out)
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("save,full", [(save_hy, [0, 1, 5]), (save_mistral, [0, 3])])
def test_distill_on_other_natively_sharing_families(save, full, text_data, tmp_path):
    import transformers

    src = save(tmp_path / "src")
    pattern = "FFSSSF" if full == [0, 1, 5] else "FSSFSS"
    out = tmp_path / "out"
    r = invoke("distill", "--model", src, "--data", text_data, "--out", out, "--pattern", pattern, "--steps", 2, *SMALL, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["full_layers"] == full
    a, b = weights(src), weights(out)
    for name, t in b.items():
        if ".indexer." in name:
            assert _layer(name) in full
        else:
            assert torch.equal(t, a[name]), name
    assert all(_layer(n) in full for n in b if ".indexer." in n)
    assert any(not torch.equal(b[n], a[n]) for n in b if ".indexer." in n)
    config = json.loads((out / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    _, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_distill_refuses_a_full_layer_without_indexer_weights(text_data, tmp_path):
    src = save_hy(tmp_path / "hy")  # layers 2, 3, 4 ship no indexer
    r = invoke("distill", "--model", src, "--data", text_data, "--out", tmp_path / "o", "--pattern", "FSFSSS", *SMALL)
    assert r.exit_code == 2 and "layer 2 has no indexer weights" in one_error_line(r)


def test_uniform_interleaves_over_the_layers_with_indexer_weights(text_data, tmp_path):
    src = save_hy(tmp_path / "hy")  # indexers at 0, 1, 5 only
    r = invoke("distill", "--model", src, "--data", text_data, "--out", tmp_path / "o", "--uniform", 2, "--steps", 1,
               *SMALL, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["pattern"] == "FSSSSF"


def test_distill_refuses_families_without_native_sharing(dsv32_dir, text_data, tmp_path):
    r = invoke("distill", "--model", dsv32_dir, "--data", text_data, "--out", tmp_path / "o", "--uniform", 2, *SMALL)
    assert r.exit_code == 2
    assert "native indexer sharing" in one_error_line(r) and "deepseek_v32" in r.stderr
    assert not (tmp_path / "o").exists()


def test_distill_refuses_glm5_next_with_the_reason(text_data, tmp_path):
    src = tmp_path / "g5n"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "glm5_next", "architectures": ["Glm5NextForConditionalGeneration"],
                                                  "text_config": {"index_topk": 8, "num_hidden_layers": 4}}))
    r = invoke("distill", "--model", src, "--data", text_data, "--out", tmp_path / "o", "--uniform", 2, *SMALL)
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "glm5_next" in line and "pools" in line and "next layer" in line


def test_distill_refuses_plain_mla_and_names_dsa_convert(lite_dir, text_data, tmp_path):
    r = invoke("distill", "--model", lite_dir, "--data", text_data, "--out", tmp_path / "o", "--uniform", 2, *SMALL)
    assert r.exit_code == 2
    one_error_line(r)
    assert "dsa-convert" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--pattern", "FSS"], "pattern has 3 layers, the model has 6"),
    (["--pattern", "SFFFFF"], "layer 0 must be 'F'"),
    (["--pattern", "FSFSXS"], "may only contain"),
    (["--pattern", "FSFSFS", "--uniform", "2"], "exactly one of"),
    ([], "exactly one of"),
    (["--uniform", "0"], "--uniform"),
    (["--uniform", "2", "--seq-len", "8"], "not above index_topk"),
    (["--layer-map", "/nonexistent/run"], "does not exist"),
])
def test_distill_bad_input_is_one_error_line_and_leaves_no_directory(glm_dir, text_data, tmp_path, args, needle):
    out = tmp_path / "out"
    r = invoke("distill", "--model", glm_dir, "--data", text_data, "--out", out, *([] if "--seq-len" in args else SMALL), *args)
    assert r.exit_code == 2
    assert needle in one_error_line(r)
    assert not out.exists()


def test_out_must_not_be_the_source_or_a_foreign_directory(glm_dir, text_data, tmp_path):
    r = invoke("distill", "--model", glm_dir, "--data", text_data, "--out", glm_dir, "--uniform", 2, *SMALL)
    assert r.exit_code == 2 and "overlaps" in one_error_line(r)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = invoke("distill", "--model", glm_dir, "--data", text_data, "--out", foreign, "--uniform", 2, *SMALL, "--overwrite")
    assert r.exit_code == 2 and "did not write" in one_error_line(r)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_sigterm_keeps_the_training_state_and_resume_finishes(lite_dir, text_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # Steps of 8 x 256 tokens, so the run is still going when the signal lands even on an idle machine.
    def cmd(out, *extra):
        return [sys.executable, "-m", "indexcache_calib", "dsa-convert", "--model", str(lite_dir), "--data", str(text_data),
                "--out", str(out), "--steps", "30", "--checkpoint-every", "1", "--seq-len", "256", "--batch-size", "8",
                "--index-topk", "8", "--index-heads", "2", "--index-head-dim", "16", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / tl.STATE_DIR / tl.STATE).is_file():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"no training state appeared: {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Hint: resume with: indexcache dsa-convert" in stderr and "--resume" in stderr
    assert (out / tl.STATE_DIR / tl.STATE).is_file() and not (out / "config.json").exists()
    assert "state at step" in stderr and "at step 30 " not in stderr
    from indexcache_calib.training.convert import ConvertOptions, convert

    def opts(where, resume=False):
        return ConvertOptions(model=str(lite_dir), data=str(text_data), out=str(where), steps=30, seq_len=256,
                              batch_size=8, index_topk=8, index_heads=2, index_head_dim=16, checkpoint_every=1, resume=resume)

    assert convert(opts(out, resume=True))["training"]["resumed_from"] >= 1
    convert(opts(tmp_path / "whole"))
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_bf16_source_stays_bf16_and_trains_through_fp32_masters(text_data, tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_lite(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16)
    model.save_pretrained(src)
    out = tmp_path / "out"
    r = invoke("dsa-convert", "--model", src, "--data", text_data, "--out", out, "--steps", 2, *CONVERT, "--json")
    assert r.exit_code == 0, r.stderr
    a, b = weights(src), weights(out)
    assert all(torch.equal(b[k], v) for k, v in a.items())
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.layers[0].self_attn.indexer.wq_b.weight.dtype == torch.bfloat16

"""Every lightning-indexer family in transformers, on a tiny random checkpoint built from its own config
class and saved to disk: the tool's all-Full loss is the model's own, prefix reuse is bit-identical
to full forwards, the library reproduces the tool's loss for the chosen pattern where it shares natively,
and calibrate, export and validate run end to end."""

import json

import pandas as pd
import pytest
import torch
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, TOKENS, load_tokens
from indexcache_calib.cli import app
from indexcache_calib.errors import CalibError
from indexcache_calib.families import BY_MODEL_TYPE, FAMILIES, FULL, family_of
from indexcache_calib.model import load_with_layout
from indexcache_calib.runner import PatternRunner, self_check
from indexcache_calib.testing import TINY, save_tiny, tiny_config

runner = CliRunner()
SEQ = 48
# Settings some tests add to a family's tiny config (`testing.TINY`). Mistral's tiny model shares KV across
# layers, so prefix reuse has to restore what the skipped layers stored for later ones.
EXTRA = {"mistral_large4": {"kv_source_layers": [0, 0, 2, 3, 4, 4]}}
# Family name -> (testing arch, extra config), for every row of the registry.
TEST_CONFIGS = {f.name: (f.name, EXTRA.get(f.name, {})) for f in FAMILIES}


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def family_dir(request, tmp_path_factory):
    arch, extra = TEST_CONFIGS[request.param]
    path = save_tiny(tmp_path_factory.mktemp(request.param), arch, layers=6, **extra)
    return request.param, path


# -- the registry: one row per family, and everything else asks it ---------------------------------------


def test_every_family_has_a_tiny_test_config():
    """An eleventh family is a row in `families.FAMILIES` and a builder in `testing.TINY`: a row without
    one fails here, and so does a builder for a family the registry does not have."""
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    assert [n for n in names if n not in TINY] == []
    assert sorted(set(TINY) - set(names)) == []
    assert set(EXTRA) <= set(names)


def test_the_readme_example_of_a_family_is_the_codes_own():
    """docs/families.md's "Adding a family" shows one row and one test config: each line is in the file it names."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "docs" / "families.md").read_text()
    section = readme[readme.index("## Adding a family"):]
    start = section.index("```python\n") + len("```python\n")
    block = section[start:section.index("\n```", start)]
    squash = lambda text: " ".join(text.split())  # noqa: E731
    shown: dict[str, list[str]] = {}
    for line in block.splitlines():
        if line.startswith("# "):
            source = line[2:].split(",")[0]
            shown[source] = []
        else:
            shown[source].append(line)
    assert set(shown) == {"indexcache_calib/families.py", "indexcache_calib/testing.py"}
    for source, lines in shown.items():
        assert squash("\n".join(lines)) in squash((root / source).read_text()), source


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_each_tiny_config_is_its_own_family_and_the_registry_reads_its_keys(name):
    config = tiny_config(name)
    family = family_of(config)
    assert family.name == name and family is BY_MODEL_TYPE[name]
    text = config.get_text_config()
    assert family.index_heads(text) == 2  # every tiny indexer has two heads, under whatever key its family uses
    assert family.streams(text) == (2 if family.streams_key else 1)
    assert family.usable(text) is None


def test_registry_rows_are_consistent():
    for f in FAMILIES:
        assert not f.native_keyword or f.native_key, f.name  # a keyword needs a key
        assert ("transformers" in f.engines) == (f.native_key is not None), f.name
        assert f.distillable == (f.native_key is not None and f.distill_refusal is None)
    assert [f.name for f in FAMILIES if f.distill_refusal] == ["glm5_next"]


def _ids(n=3, vocab=96, seed=0):
    return torch.randint(3, vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _all_full(layout):
    return "".join("S" if p in layout.fixed_shared else FULL for p in range(layout.num_positions))


def _candidates(layout, base):
    family = layout.family
    out = []
    for p in range(1, layout.num_positions):
        if base[p] == FULL and p not in layout.fixed_shared:
            pattern = base[:p] + "S" + base[p + 1 :]
            if family.runs(pattern, layout.positions) is None:
                out.append(pattern)
    return out


def test_all_full_loss_is_the_models_own(family_dir):
    name, path = family_dir
    model, layout = load_with_layout(str(path))
    assert layout.family.name == name
    ids = _ids()
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    ours = PatternRunner(model, layout, ids, batch_size=3, cache_device="none").score(_all_full(layout))
    assert ours.loss == pytest.approx(own, abs=1e-5)
    assert self_check(model, layout, ids, name)["difference"] < 1e-5


def test_prefix_reuse_is_bit_identical_to_full_forwards(family_dir):
    name, path = family_dir
    model, layout = load_with_layout(str(path))
    ids = _ids(4)
    cached = PatternRunner(model, layout, ids, batch_size=2, cache_device="cpu")
    plain = PatternRunner(model, layout, ids, batch_size=2, cache_device="none")
    base = _all_full(layout)
    for _ in range(2):  # two committed steps, so candidates restart from a base with shared layers
        assert cached.set_base(base).loss == plain.set_base(base).loss
        scores = {}
        for pattern in _candidates(layout, base):
            a, b = cached.score(pattern), plain.score(pattern)
            assert a.seq_losses == b.seq_losses and a.overlap == b.overlap, pattern
            scores[pattern] = a.loss
        if not scores:
            break
        base = min(scores, key=scores.get)
    assert cached.counters.layer_forwards < plain.counters.layer_forwards
    cached.close()


def test_shared_layers_change_the_loss(family_dir):
    name, path = family_dir
    model, layout = load_with_layout(str(path))
    r = PatternRunner(model, layout, _ids(), batch_size=3, cache_device="none")
    base = r.score(_all_full(layout)).loss
    assert any(r.score(p).loss != base for p in _candidates(layout, _all_full(layout)))
    assert r.last_layer_overlap and all(0 <= v <= 1 for v in r.last_layer_overlap.values())


def _calibrate(path, out, *extra):
    r = runner.invoke(app, ["calibrate", "--model", str(path), "--data", str(out.parent / "data.jsonl"), "--seq-len", str(SEQ),
                            "--num-samples", "2", "--target", "1/3", "--out", str(out), "--no-plots", *extra])
    assert r.exit_code == 0, r.stderr
    return json.loads((out / LAYER_MAP).read_text())


def test_calibrate_export_validate_end_to_end(family_dir, tmp_path):
    from conftest import write_docs

    name, path = family_dir
    write_docs(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    lm = _calibrate(path, out)
    family = BY_MODEL_TYPE[name]
    ckpt_positions = family.positions(__import__("transformers").AutoConfig.from_pretrained(path).get_text_config())
    assert lm["family"] == name and lm["positions"] == ckpt_positions and len(lm["pattern"]) == len(ckpt_positions)
    assert family.runs(lm["pattern"], lm["positions"]) is None
    # Targets count pattern positions only: layers without an indexer by architecture are not layers to keep.
    assert lm["target"]["num_full"] == -(-len(ckpt_positions) // 3) == lm["num_full"]
    check = lm["provenance"]["self_check"]
    assert check["difference"] < 1e-5 and check["tokens"] == SEQ
    r = runner.invoke(app, ["validate", str(out), "--model", str(path)])
    assert r.exit_code == 0, r.stdout + r.stderr
    for engine in ("vllm", "sglang", "transformers", "trtllm"):
        r = runner.invoke(app, ["export", str(out), "--engine", engine])
        if engine in family.engines:
            assert r.exit_code == 0, r.stderr
        else:
            assert r.exit_code == 2 and name in one_error_line(r)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES if f.native_key])
def test_the_library_reproduces_the_reported_loss_with_the_exported_keys(name, tmp_path):
    """transformers builds the shared layers itself from the exported `indexer_types` (the family's
    `native_key`), from a keyword or from the config the snippet sets (`native_keyword`)."""
    from conftest import write_docs

    arch, extra = TEST_CONFIGS[name]
    path = save_tiny(tmp_path / "model", arch, layers=6, **extra)
    write_docs(tmp_path / "data.jsonl")
    lm = _calibrate(path, tmp_path / "run")
    assert "S" in lm["pattern"]
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--engine", "transformers"])
    assert r.exit_code == 0, r.stderr
    scope = {}
    exec(r.stdout, scope)  # the printed snippet, as a user would paste it
    model = scope["model"].eval()
    decoder = model.get_decoder()
    built = [decoder.layers[l].self_attn.indexer is not None for l in lm["positions"]]
    assert built == [c == "F" for c in lm["pattern"]]
    ids = load_tokens(tmp_path / "run" / TOKENS)
    with torch.no_grad():
        native = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert native == pytest.approx(lm["loss"]["final"], abs=1e-5)


def test_glm5_next_never_proposes_what_its_library_cannot_run(tmp_path):
    """Its library hands a full layer's top-k only to the very next layer: F S runs, F S S and
    F <linear> S do not, so neither the search nor export may produce them."""
    from conftest import write_docs

    path = save_tiny(tmp_path / "model", "glm5_next", layers=6)  # indexed 0, 1, 3, 4; linear 2, 5
    write_docs(tmp_path / "data.jsonl")
    lm = _calibrate(path, tmp_path / "run", "--search", "exact")
    family = BY_MODEL_TYPE["glm5_next"]
    for step in lm["path"]:
        assert family.runs(step["pattern"], lm["positions"]) is None
    bad = dict(lm, pattern="FFSF")  # layer 3 shared right after linear-attention layer 2
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = runner.invoke(app, ["validate", str(tmp_path / "bad.json"), "--model", str(path)])
    assert r.exit_code == 2 and "cannot run this pattern" in r.stderr
    r = runner.invoke(app, ["calibrate", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--seq-len", str(SEQ),
                            "--num-samples", "2", "--num-full", "1", "--out", str(tmp_path / "r2"), "--no-plots"])
    assert r.exit_code == 2 and "fewer than 2" in one_error_line(r)


def test_self_check_refuses_a_model_whose_numbers_the_tool_would_get_wrong(glm_dir, text_data, tmp_path, monkeypatch):
    """A model whose own forward computes its logits differently from what the tool drives (here: an
    extra soft-cap applied only when the model computes its loss itself) is refused, not reported."""
    from transformers import GlmMoeDsaForCausalLM

    real = GlmMoeDsaForCausalLM.forward

    def forward(self, *args, labels=None, **kwargs):
        out = real(self, *args, labels=labels, **kwargs)
        if labels is not None:
            out.loss = out.loss * 1.001
        return out

    monkeypatch.setattr(GlmMoeDsaForCausalLM, "forward", forward)
    out = tmp_path / "run"
    r = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", str(SEQ),
                            "--num-samples", "2", "--num-full", "2", "--out", str(out), "--no-plots"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("Error: ")]
    assert len(errors) == 1
    line = errors[0]
    assert "self-check failed" in line and "GlmMoeDsaForCausalLM" in line and "difference" in line
    assert not out.exists()


def test_self_check_refuses_an_adapter_that_calls_the_indexer_wrongly(tmp_path, monkeypatch):
    """An adapter that claims the GLM chunked call for glm5_next's k-pool indexer: the tool cannot run
    the model as described, and says so instead of reporting anything."""
    import dataclasses

    from indexcache_calib import families

    path = save_tiny(tmp_path / "model", "glm5_next", layers=6)
    wrong = dataclasses.replace(families.BY_MODEL_TYPE["glm5_next"], chunks=families.GLM_CHUNKS)
    monkeypatch.setitem(families.BY_MODEL_TYPE, "glm5_next", wrong)
    model, layout = load_with_layout(str(path))
    with pytest.raises(CalibError, match="self-check failed for .*glm5_next"):
        self_check(model, layout, _ids(1), "tiny", indexer_chunk=7)


def test_an_unknown_relative_is_refused_not_guessed(glm_dir, tmp_path):
    import shutil

    path = tmp_path / "relative"
    shutil.copytree(glm_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # a config class transformers knows, with no indexer adapter here
    config["index_topk"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CalibError, match="no adapter|not a DSA model"):
        load_with_layout(str(path))


def test_indexer_chunking_is_refused_where_the_indexer_runs_in_one_call(tmp_path):
    from conftest import write_docs

    path = save_tiny(tmp_path / "model", "glm5_next", layers=6)
    write_docs(tmp_path / "data.jsonl")
    args = ["calibrate", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--seq-len", str(SEQ),
            "--num-samples", "2", "--num-full", "3", "--out", str(tmp_path / "run"), "--no-plots"]
    r = runner.invoke(app, [*args, "--indexer-chunk", "8"])
    assert r.exit_code == 2 and "--indexer-chunk 8 is not possible for glm5_next" in one_error_line(r)
    r = runner.invoke(app, [*args, "--indexer-chunk", "8", "--dry-run"])
    assert r.exit_code == 2 and "not possible" in one_error_line(r)


# -- indexers that select compressed entries, blocks or masks --------------------------------------


def test_deepseek_v4_pattern_covers_only_its_compressed_sparse_layers(tmp_path):
    """vLLM reads DeepSeek-V4's pattern over the compressed-sparse (C4) layers only, in order."""
    from conftest import write_docs

    path = save_tiny(tmp_path / "model", "deepseek_v4", layers=6)  # CSA at 1, 3, 5; HCA and sliding elsewhere
    write_docs(tmp_path / "data.jsonl")
    lm = _calibrate(path, tmp_path / "run")
    assert lm["positions"] == [1, 3, 5] and len(lm["pattern"]) == 3 and lm["pattern"][0] == "F"
    # The search's choices are named by decoder layer, in the path and in the trace alike.
    trace = pd.read_csv(tmp_path / "run" / "search_trace.csv")
    assert set(trace["candidate"]) == {3, 5} and lm["path"][1]["chosen"] in (3, 5)
    assert trace.loc[trace["chosen"], "candidate"].tolist() == [s["chosen"] for s in lm["path"][1:]]
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--engine", "vllm", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["overrides"] == {"index_topk_pattern": lm["pattern"], "use_index_cache": True}
    # Sharing changes nothing unless the sequence holds more compressed entries than index_topk.
    r = runner.invoke(app, ["calibrate", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--seq-len", "8",
                            "--num-samples", "2", "--num-full", "1", "--out", str(tmp_path / "short"), "--no-plots"])
    assert r.exit_code == 2 and "index_topk 4 compressed entries of 2 tokens each: 8 tokens" in one_error_line(r)


def test_overlap_of_compressed_block_and_mask_selections():
    from indexcache_calib.families import COMPRESSED, MASK, index_overlap

    # Compressed entries at rate 2, k = 1: rows 3.. can see 2+ entries; -1 and not-yet-visible ids never count.
    dsv4 = tiny_config("deepseek_v4", 4, index_topk=2)
    own = torch.tensor([[[0], [0], [0], [1], [1], [2]]])
    reused = torch.tensor([[[0], [0], [0], [0], [-1], [2]]])
    assert COMPRESSED.overlap(dsv4)(own, reused) == (1.0, 3.0)
    # Per-head blocks [B, H, S, k]: each head is compared with the same head's reused selection.
    own = torch.tensor([[[[0, 1]] * 4, [[1, -1]] * 4]])
    reused = torch.tensor([[[[1, 0]] * 4, [[0, -1]] * 4]])
    assert index_overlap(own, reused, 0, lambda q: q + 2) == (8.0, 12.0)
    # Masks: the share of a row's own selection that the reused one keeps.
    qwen = tiny_config("qwen4_exp", 3, index_topk=2)  # budget 2, ratio 2: rows 3.. see more than they select
    own = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    own[..., 3, :2] = own[..., 4, 1:3] = True
    reused = torch.zeros_like(own)
    reused[..., 3, 0] = reused[..., 4, 1:3] = True
    assert MASK.overlap(qwen)(own, reused) == (3.0, 4.0)


def test_a_qwen4_config_without_its_indexer_is_refused_with_the_reason(tmp_path):
    path = save_tiny(tmp_path / "model", "qwen4_exp", layers=3)
    config = json.loads((path / "config.json").read_text())
    for key in ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio"):
        config[key] = None  # transformers' default: QSA off
    (path / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["calibrate", "--model", str(path), "--data", "unused.jsonl", "--num-full", "1", "--dry-run"])
    assert r.exit_code == 2 and "QSA indexer is off" in one_error_line(r)


def test_minimax_vision_language_checkpoint_calibrates_its_text_decoder(tmp_path):
    """The published MiniMax-M3 is a vision-language checkpoint with no CausalLM class for it."""
    import transformers as tf

    from indexcache_calib.testing import save_char_tokenizer

    text = tiny_config("minimax_m3_vl", 4).to_dict()
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=8, image_size=32)
    config = tf.MiniMaxM3VLConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(tmp_path)
    save_char_tokenizer(tmp_path, 96)
    model, layout = load_with_layout(str(tmp_path))
    assert type(model).__name__ == "MiniMaxM3SparseForConditionalGeneration" and layout.positions == [1, 2, 3]
    ids = _ids(2)
    assert self_check(model, layout, ids, "minimax")["difference"] < 1e-5


def test_query_chunked_indexers_select_exactly_what_one_call_selects(family_dir):
    name, path = family_dir
    model, layout = load_with_layout(str(path))
    if not layout.family.chunks:
        return  # refused up front for this family (test_indexer_chunking_is_refused_...)
    ids = _ids(2)
    pattern = _candidates(layout, _all_full(layout))[0]
    whole = PatternRunner(model, layout, ids, cache_device="none", indexer_chunk=0).score(pattern)
    chunked = PatternRunner(model, layout, ids, cache_device="none", indexer_chunk=7).score(pattern)
    assert chunked.seq_losses == whole.seq_losses and chunked.overlap == whole.overlap


def test_the_layer_map_records_what_each_consumer_reads(tmp_path):
    from conftest import write_docs

    path = save_tiny(tmp_path / "model", "glm5_next", layers=6)
    write_docs(tmp_path / "data.jsonl")
    lm = _calibrate(path, tmp_path / "run")
    assert set(lm["consumers"]) == {"transformers"}
    assert lm["consumers"]["transformers"] == {"config": "text_config", "keys": {"indexer_types": lm["indexer_types"]}}
    assert lm["engines"] == {}

"""The sparse attention path on every family whose attention consumes its selection: the same loss and
top-k as the model's own dense path, prefix reuse bit-identical, and nothing of size seq x seq in a
calibration forward. Families whose attention cannot take it are refused with the reason."""

import json

import pytest
import torch
from conftest import one_error_line, write_docs
from test_families import TEST_CONFIGS
from test_families import _all_full, _candidates, _ids
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from indexcache_calib import attention
from indexcache_calib.artifact import LAYER_MAP
from indexcache_calib.cli import app
from indexcache_calib.families import BY_MODEL_TYPE, FAMILIES
from indexcache_calib.model import load_with_layout
from indexcache_calib.runner import PatternRunner, self_check
from indexcache_calib.testing import save_tiny

runner = CliRunner()
SPARSE = sorted(f.name for f in FAMILIES if f.dense_only is None)
DENSE_ONLY = sorted(f.name for f in FAMILIES if f.dense_only is not None)


def test_every_family_is_placed():
    assert set(SPARSE) | set(DENSE_ONLY) == set(TEST_CONFIGS)
    assert {"glm_moe_dsa", "deepseek_v32", "axk2", "hy_v4", "dots3_note", "mistral_large4", "deepseek_v4",
            "minimax_m3_vl"} <= set(SPARSE)
    # GLM-5.3-Flash's attention folds its top-k into a dense mask and admits no Shared layer after another;
    # Qwen4's indexer returns a [seq, keys] mask itself.
    assert set(DENSE_ONLY) == {"glm5_next", "qwen4_exp"}


@pytest.fixture(scope="module", params=SPARSE)
def sparse_dir(request, tmp_path_factory):
    arch, extra = TEST_CONFIGS[request.param]
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param), arch, layers=6, **extra)


def _selections(model, layout, ids):
    """Each indexer's top-k on `ids`, through the model's own forward."""
    seen = {}
    hooks = [ix.register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out.clone()))
             for p, ix in enumerate(layout.indexers) if ix is not None]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _valid_sets(topk):
    # Entries past a row's own position are masked whatever the path: compare what each row can see.
    rows = topk.shape[-2]
    return [[sorted(i for i in row.tolist() if 0 <= i <= q) for q, row in enumerate(b.unbind(0))] for b in topk.reshape(-1, rows, topk.shape[-1])]


def test_sparse_path_matches_the_dense_path(sparse_dir):
    name, path = sparse_dir
    model, layout = load_with_layout(str(path))
    ids = _ids()
    dense_topk = _selections(model, layout, ids)
    dense = PatternRunner(model, layout, ids, batch_size=3, cache_device="none")
    patterns = [_all_full(layout)] + _candidates(layout, _all_full(layout))
    expected = {p: dense.score(p) for p in patterns}
    attention.set_attention(model, "sparse")
    assert attention.current(model) == attention.SPARSE
    sparse = PatternRunner(model, layout, ids, batch_size=3, cache_device="none")
    for p in patterns:
        got = sparse.score(p)
        assert got.seq_losses == pytest.approx(expected[p].seq_losses, rel=1e-5), p
        assert got.overlap == pytest.approx(expected[p].overlap, abs=1e-6), p
    sparse_topk = _selections(model, layout, ids)
    assert sparse_topk.keys() == dense_topk.keys()
    for p in dense_topk:
        assert _valid_sets(sparse_topk[p]) == _valid_sets(dense_topk[p]), (name, p)
    check = self_check(model, layout, ids, name)
    assert check["attention"] == "sparse" and check["difference"] < 1e-5
    attention.set_attention(model, "dense")
    assert attention.current(model) != attention.SPARSE


def test_prefix_reuse_is_bit_identical_on_the_sparse_path(sparse_dir):
    name, path = sparse_dir
    model, layout = load_with_layout(str(path))
    attention.set_attention(model, "sparse")
    ids = _ids(4)
    cached = PatternRunner(model, layout, ids, batch_size=2, cache_device="cpu", indexer_chunk=16)
    plain = PatternRunner(model, layout, ids, batch_size=2, cache_device="none", indexer_chunk=16)
    base = _all_full(layout)
    assert cached.set_base(base).loss == plain.set_base(base).loss
    for pattern in _candidates(layout, base):
        a, b = cached.score(pattern), plain.score(pattern)
        assert a.seq_losses == b.seq_losses and a.overlap == b.overlap, pattern
    cached.close()


class _SeqBySeq(TorchDispatchMode):
    """The largest storage of any operation's output with an axis of length `seq` and another of a key
    length in `keys` (`seq` itself, or a count of compressed entries): a [seq, keys] tensor in a forward over
    `seq` tokens. A stride-0 view counts as what it really holds."""

    def __init__(self, seq: int, keys=()):
        super().__init__()
        self.seq, self.keys, self.largest, self.compressed = seq, set(keys) - {seq}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.seq in t.shape:
                rest = list(t.shape)
                rest.remove(self.seq)
                if self.seq in rest or any(d in self.keys for d in rest):
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
                if any(d in self.keys for d in rest):  # [seq, compressed entries] alone
                    self.compressed = max(self.compressed, t.untyped_storage().nbytes())
        return out


# Key axes other than the sequence's own: DeepSeek-V4 attends to compressed entries, one per `rate` tokens;
# MiniMax-M3's indexer scores key blocks of `index_block_size` tokens.
COMPRESSED_KEYS = {"deepseek_v4": lambda text, seq: [seq // r for r in text.compress_rates.values()],
                   "minimax_m3_vl": lambda text, seq: [-(-seq // int(text.index_block_size))]}


@pytest.mark.parametrize("name", ["glm_moe_dsa", "dots3_note", "hy_v4", "deepseek_v4", "minimax_m3_vl"])
def test_nothing_of_size_seq_by_seq_on_the_sparse_path(name, tmp_path, monkeypatch):
    """A calibration forward with overlap measured: on the sparse path no operation produces a [seq, keys]
    tensor (the placeholder mask holds one byte), nor, for DeepSeek-V4, a [seq, compressed entries] one, nor,
    for MiniMax-M3, a [seq, key blocks] one; on the dense path the mask is one (and DeepSeek-V4's compressor
    bias, MiniMax-M3's block scores another)."""
    seq = 1000  # no model dimension is this long, nor half or an eighth of it
    arch, extra = TEST_CONFIGS[name]
    model, layout = load_with_layout(str(save_tiny(tmp_path, arch, layers=4, **extra)))
    keys = COMPRESSED_KEYS.get(name, lambda text, seq: [])(layout.text, seq)
    ids = torch.randint(3, 96, (1, seq), generator=torch.Generator().manual_seed(0))
    pattern = _candidates(layout, _all_full(layout))[0]
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1 << 16)  # several attention chunks at this length

    def largest(path):
        attention.set_attention(model, path)
        run = PatternRunner(model, layout, ids, cache_device="none", indexer_chunk=16, logits_chunk=256)
        with _SeqBySeq(seq, keys) as mode:
            score = run.score(pattern)
        return mode.largest, mode.compressed, score.loss

    dense_bytes, dense_compressed, dense_loss = largest("dense")
    sparse_bytes, sparse_compressed, sparse_loss = largest("sparse")
    assert dense_bytes >= seq * seq
    assert sparse_bytes <= 1
    if keys:  # the dense path's [seq, compressed entries] bias or [seq, blocks] scores, and none on the sparse path
        assert dense_compressed >= seq * min(keys) * 4 and sparse_compressed == 0
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-5)


@pytest.mark.parametrize("name", DENSE_ONLY)
def test_sparse_is_refused_where_the_attention_cannot_take_it(name, tmp_path):
    arch, extra = TEST_CONFIGS[name]
    path = save_tiny(tmp_path / "m", arch, layers=4, **extra)
    write_docs(tmp_path / "data.jsonl")
    for extra_args in ([], ["--dry-run"]):
        r = runner.invoke(app, ["calibrate", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--seq-len", "48",
                                "--num-samples", "2", "--attention", "sparse", "--out", str(tmp_path / "run"), *extra_args])
        assert r.exit_code == 2, r.stderr
        line = one_error_line(r)
        assert f"--attention sparse is not possible for {name}" in line and BY_MODEL_TYPE[name].dense_only in line
        assert not (tmp_path / "run").exists()


def test_calibrate_records_the_path_and_resume_refuses_a_change(glm_dir, text_data, tmp_path):
    args = ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", "48", "--num-samples", "2",
            "--target", "1/2", "--out", str(tmp_path / "run"), "--no-plots"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    layer_map = json.loads((tmp_path / "run" / LAYER_MAP).read_text())
    assert layer_map["provenance"]["self_check"]["attention"] == "sparse"
    r = runner.invoke(app, args + ["--resume", "--attention", "dense"])
    assert r.exit_code == 3
    assert "settings.attention (sparse -> dense)" in one_error_line(r)
    r = runner.invoke(app, args + ["--resume", "--attention", "sparse"])  # auto picked sparse: the same run
    assert r.exit_code == 0, r.stderr


def test_running_out_of_memory_in_the_self_check_is_out_of_memory(glm_dir, text_data, tmp_path, monkeypatch):
    from transformers import AttentionInterface

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 17179869184 bytes")

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.SPARSE, no_memory)
    r = runner.invoke(app, ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", "48",
                            "--num-samples", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 4, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == ["Error: out of memory"] and "Traceback" not in r.stderr
    assert "--attention" in r.stderr and "--indexer-chunk" in r.stderr
    assert not (tmp_path / "run").exists()


def test_deepseek_v4_stand_in_compresses_as_its_library_and_is_put_back(tmp_path):
    """The one module the deepseek_v4 row replaces on the sparse path (its compressors, which build the
    [seq, compressed keys] bias): the stand-in's entries are the library's own, bit for bit, on
    compressed-sparse and heavily-compressed layers; it is there only while the sparse path is on, and the
    model's weights never change."""
    from indexcache_calib.compressed import CompactCompressor, compress

    model, layout = load_with_layout(str(save_tiny(tmp_path, "deepseek_v4", layers=4)))
    decoder = model.get_decoder()
    keys = set(model.state_dict())
    h = torch.randn(2, 37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    q = torch.randn(2, 37, model.config.q_lora_rank, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(37).unsqueeze(0)
    kinds = set()
    with torch.no_grad():
        for i in (1, 2):  # CSA, then HCA
            original = decoder.layers[i].self_attn.compressor
            theirs, _ = original(h, q, positions, None, i)
            assert torch.equal(compress(original, h).unsqueeze(1), theirs)
            kinds.add(type(original).__name__)
    assert kinds == {"DeepseekV4CSACompressor", "DeepseekV4HCACompressor"}
    with attention.attention_path(model, "sparse"):
        assert all(isinstance(decoder.layers[i].self_attn.compressor, CompactCompressor) for i in (1, 2, 3))
        with attention.attention_path(model, "dense"):
            assert not any(isinstance(layer.self_attn.compressor, CompactCompressor) for layer in decoder.layers[1:])
        assert isinstance(decoder.layers[1].self_attn.compressor, CompactCompressor)
        with torch.no_grad(), pytest.raises(ValueError, match="without a KV cache"):
            model(input_ids=_ids(1), use_cache=True)  # its cache's bias would meet the boolean mask: refused
    assert not any(isinstance(layer.self_attn.compressor, CompactCompressor) for layer in decoder.layers[1:])
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("name", ["deepseek_v4", "minimax_m3_vl"])
def test_indexer_chunks_of_a_stand_in_key_source_score_row_for_row_as_one_call(name, tmp_path):
    """The families whose indexer reads its keys from a cache of their own (`Family.key_source`): query chunks
    against keys computed once select what one call selects, row for row."""
    from indexcache_calib.sharing import run_indexer

    model, layout = load_with_layout(str(save_tiny(tmp_path, name, layers=4)))
    seen = {}
    handle = layout.indexers[0].register_forward_hook(
        lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_ids(2), use_cache=False)
    handle.remove()
    family = layout.family
    with torch.no_grad():
        whole = run_indexer(layout.indexers[0], seen["args"], seen["kwargs"], family.chunks, 0)
        for chunk in (5, 16):
            part = run_indexer(layout.indexers[0], seen["args"], seen["kwargs"], family.chunks, chunk, family.key_source)
            assert torch.equal(part, whole)
    assert (whole == -1).any() and (whole >= 0).any()  # early rows see no entry yet; later ones select


@pytest.mark.parametrize("name", ["deepseek_v4", "minimax_m3_vl"])
def test_calibrates_on_the_sparse_path_with_indexer_chunks(name, tmp_path):
    path = save_tiny(tmp_path / "m", name, layers=6)
    write_docs(tmp_path / "data.jsonl")
    args = ["calibrate", "--model", str(path), "--data", str(tmp_path / "data.jsonl"), "--seq-len", "48",
            "--num-samples", "2", "--num-full", "2", "--no-plots"]
    r = runner.invoke(app, [*args, "--attention", "sparse", "--indexer-chunk", "8", "--out", str(tmp_path / "sparse")])
    assert r.exit_code == 0, r.stderr
    sparse = json.loads((tmp_path / "sparse" / LAYER_MAP).read_text())
    assert sparse["provenance"]["self_check"]["attention"] == "sparse"
    r = runner.invoke(app, [*args, "--attention", "dense", "--out", str(tmp_path / "dense")])
    assert r.exit_code == 0, r.stderr
    dense = json.loads((tmp_path / "dense" / LAYER_MAP).read_text())
    assert sparse["pattern"] == dense["pattern"]
    assert sparse["loss"]["final"] == pytest.approx(dense["loss"]["final"], rel=1e-5)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_the_automatic_indexer_chunk_reads_the_heads_its_family_row_names(name, tmp_path):
    """`--indexer-chunk` left automatic sizes chunks by the indexer's heads under the config key of the family
    row (DeepSeek-V4's and MiniMax-M3's indexers name them `num_heads`, the others `n_heads`)."""
    from indexcache_calib.sharing import sharing_state

    arch, extra = TEST_CONFIGS[name]
    model, layout = load_with_layout(str(save_tiny(tmp_path, arch, layers=6, **extra)))
    state = sharing_state(layout, "F" * layout.num_positions)
    assert state.heads == layout.family.index_heads(layout.text) == 2

"""Index capture and reuse on the library's own DSA models, loaded from disk."""

import shutil

import pytest
import torch

from indexcache_calib.families import token_overlap
from indexcache_calib.model import load_with_layout
from indexcache_calib.pattern import indexer_types
from indexcache_calib.runner import PatternRunner
from indexcache_calib.sharing import install_sharing, run_indexer, sharing_state

SEQ = 48


def ids_for(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, SEQ), generator=g)


def load(path):
    return load_with_layout(str(path))


@pytest.fixture(params=["glm", "dsv32"])
def loaded(request, glm_dir, dsv32_dir):
    return load(glm_dir if request.param == "glm" else dsv32_dir)


def test_all_full_reproduces_the_unhooked_model(loaded):
    model, layout = loaded
    ids = ids_for(model)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        hidden_ref = model.model(input_ids=ids).last_hidden_state
        per_token = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        reference = per_token.double().mean().item()
    runner = PatternRunner(model, layout, ids, batch_size=3, cache_device="none")
    captured = {}
    handle = layout.decoder.norm.register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    score = runner.set_base("F" * layout.num_layers)
    handle.remove()
    assert torch.equal(captured["h"], hidden_ref)  # layer by layer is bit-identical to model(...)
    assert score.loss == pytest.approx(reference, abs=1e-9)
    assert score.loss == pytest.approx(out.loss.item(), rel=1e-6)  # the model's own fp32 mean


def test_removing_the_hooks_leaves_the_model_as_it_was(loaded):
    model, layout = loaded
    ids = ids_for(model)
    originals = list(layout.indexers)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    runner = PatternRunner(model, layout, ids)
    runner.set_base("F" * layout.num_layers)
    runner.score("FSSFSF")
    assert [p.indexer for p in layout.parents] == originals
    assert model.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_shared_layers_really_change_the_output(loaded):
    model, layout = loaded
    runner = PatternRunner(model, layout, ids_for(model), cache_device="none")
    base = runner.set_base("FFFFFF").loss
    assert runner.score("FSSSSS").loss != base


def test_loss_equals_transformers_native_shared_layers(glm_dir):
    """GlmMoeDsa builds shared layers itself from `indexer_types`; our hooks must give the same loss."""
    from transformers import GlmMoeDsaForCausalLM

    pattern = "FSSFSF"
    model, layout = load(glm_dir)
    ids = ids_for(model)
    ours = PatternRunner(model, layout, ids, batch_size=3, cache_device="none").score(pattern).loss
    native = GlmMoeDsaForCausalLM.from_pretrained(glm_dir, indexer_types=indexer_types(pattern))
    assert [l.self_attn.indexer is None for l in native.model.layers] == [c == "S" for c in pattern]
    with torch.no_grad():
        theirs = native(input_ids=ids, labels=ids).loss.item()
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_a_layer_with_zero_attention_output_changes_nothing_when_shared(glm_dir, tmp_path):
    """Proves the hooks act on the layer we think: layer 3 contributes nothing through attention."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "zeroed"
    shutil.copytree(glm_dir, path)
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        m.model.layers[3].self_attn.o_proj.weight.zero_()
    m.save_pretrained(path)
    model, layout = load(path)
    runner = PatternRunner(model, layout, ids_for(model), cache_device="none")
    base = runner.set_base("FFFFFF").loss
    assert runner.score("FFFSFF").loss == base
    assert runner.score("FFSFFF").loss != base
    assert runner.score("FFFFSF").loss != base


@pytest.mark.parametrize("cache_device", ["cpu", "disk"])
def test_prefix_reuse_gives_the_same_losses_as_full_forwards(glm_dir, cache_device):
    model, layout = load(glm_dir)
    ids = ids_for(model, n=4)
    cached = PatternRunner(model, layout, ids, batch_size=2, cache_device=cache_device)
    plain = PatternRunner(model, layout, ids, batch_size=2, cache_device="none")
    for base in ["FFFFFF", "FFSFFF", "FFSFSF"]:
        assert cached.set_base(base).loss == plain.set_base(base).loss
        for layer in [i for i, c in enumerate(base) if c == "F" and i > 0]:
            pattern = base[:layer] + "S" + base[layer + 1 :]
            a, b = cached.score(pattern), plain.score(pattern)
            assert a.loss == b.loss and a.seq_losses == b.seq_losses and a.overlap == b.overlap
    # A candidate restarting at layer l runs only layers l.. : fewer layer forwards than a full pass.
    assert cached.counters.layer_forwards < plain.counters.layer_forwards
    cached.close()


def test_counters_count_layer_forwards(glm_dir):
    model, layout = load(glm_dir)
    ids = ids_for(model, n=4)
    runner = PatternRunner(model, layout, ids, batch_size=3, cache_device="cpu")
    runner.set_base("FFFFFF")
    assert runner.counters.layer_forwards == 6 * 4
    runner.score("FFFFSF")  # restarts at layer 4: layers 4 and 5
    assert runner.counters.layer_forwards == 6 * 4 + 2 * 4
    assert runner.counters.tokens == runner.counters.layer_forwards * SEQ
    assert runner.counters.patterns_scored == 2


@pytest.mark.parametrize("arch", ["glm", "dsv32"])
def test_chunked_indexer_selects_the_same_keys(arch, glm_dir, dsv32_dir):
    model, layout = load(glm_dir if arch == "glm" else dsv32_dir)
    ids = ids_for(model)
    seen = {}

    def grab(module, args, kwargs, output):
        seen["args"], seen["kwargs"] = args, kwargs
        return None

    handle = layout.indexers[2].register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    chunks = layout.family.chunks
    with torch.no_grad():
        full = run_indexer(layout.indexers[2], seen["args"], seen["kwargs"], chunks, 0)
        for chunk in (5, 16):
            part = run_indexer(layout.indexers[2], seen["args"], seen["kwargs"], chunks, chunk)
            assert torch.equal(part, full)  # row for row the same scores, so the same top-k
    whole = PatternRunner(model, layout, ids, cache_device="none").score("FSFSFS")
    chunked = PatternRunner(model, layout, ids, cache_device="none", indexer_chunk=7).score("FSFSFS")
    assert chunked.loss == pytest.approx(whole.loss, abs=1e-6)
    assert chunked.overlap == pytest.approx(whole.overlap)


def test_topk_overlap_counts_only_valid_positions():
    k, seq = 4, 12
    own = torch.stack([torch.arange(k) + max(0, t - k + 1) for t in range(seq)]).unsqueeze(0)
    assert token_overlap(own, own, k) == (float((seq - k) * k), float((seq - k) * k))
    shifted = (own - 1).clamp(min=0)
    hits, total = token_overlap(own, shifted, k)
    assert hits == (seq - k) * (k - 1) and total == (seq - k) * k
    future = own + 100  # indices past the query never count
    assert token_overlap(own, future, k)[0] == 0
    padded = torch.cat([own, torch.full_like(own[..., :2], -1)], dim=-1)  # -1 padding counts neither way
    assert token_overlap(padded, padded, k) == token_overlap(own, own, k)


def test_overlap_is_measured_for_shared_layers_only(glm_dir):
    model, layout = load(glm_dir)
    runner = PatternRunner(model, layout, ids_for(model), cache_device="none")
    score = runner.score("FSFFSS")
    assert sorted(runner.last_layer_overlap) == [1, 4, 5]
    assert all(0 <= v <= 1 for v in runner.last_layer_overlap.values())
    assert runner.score("FFFFFF").overlap is None
    no_overlap = PatternRunner(model, layout, ids_for(model), cache_device="none", measure_overlap=False)
    assert no_overlap.score("FSFFSS").loss == score.loss
    assert no_overlap.state.indexer_calls < runner.state.indexer_calls


def test_install_sharing_is_removed_by_one_call(glm_dir):
    model, layout = load(glm_dir)
    state = sharing_state(layout, "FSFSFS")
    handle = install_sharing(layout, state)
    assert all(type(p.indexer).__name__ == "IndexerProxy" for p in layout.parents)
    handle.remove()
    assert [p.indexer for p in layout.parents] == layout.indexers


def test_committing_the_best_candidate_reuses_its_layer_inputs(glm_dir):
    model, layout = load(glm_dir)
    ids = ids_for(model, n=4)
    cached = PatternRunner(model, layout, ids, batch_size=2, cache_device="cpu")
    plain = PatternRunner(model, layout, ids, batch_size=2, cache_device="none")
    base = "FFFFFF"
    cached.set_base(base)
    for _ in range(3):
        scores = {p: cached.score(p) for p in [base[:i] + "S" + base[i + 1 :] for i in range(1, 6) if base[i] == "F"]}
        best = min(scores, key=lambda p: (scores[p].loss, p.index("S", 1) if "S" in p[1:] else 0))
        before = cached.counters.layer_forwards
        committed = cached.set_base(best)
        assert cached.counters.layer_forwards == before  # adopted, not recomputed
        assert committed.loss == plain.set_base(best).loss == scores[best].loss
        assert cached.last_layer_overlap == plain.last_layer_overlap
        base = best
        for i in [i for i in range(1, 6) if base[i] == "F"]:
            p = base[:i] + "S" + base[i + 1 :]
            assert cached.score(p).loss == plain.score(p).loss


def test_without_a_cache_committing_the_best_candidate_runs_nothing_again(glm_dir):
    model, layout = load(glm_dir)
    runner = PatternRunner(model, layout, ids_for(model), cache_device="none")
    runner.set_base("FFFFFF")
    scores = {p: runner.score(p) for p in ["FSFFFF", "FFSFFF", "FFFSFF"]}
    best = min(scores, key=lambda p: scores[p].loss)
    before = runner.counters.layer_forwards
    assert runner.set_base(best).loss == scores[best].loss
    assert runner.counters.layer_forwards == before
    assert sorted(runner.last_layer_overlap) == [best.index("S")]
    runner.set_base("FSSFFF")  # not a scored candidate: evaluated
    assert runner.counters.layer_forwards == before + 6 * 3


@pytest.mark.parametrize("cache_device", ["cpu", "none"])
def test_scoring_a_subset_of_batches_gives_those_sequences_losses(glm_dir, cache_device):
    model, layout = load(glm_dir)
    ids = ids_for(model, n=4)
    runner = PatternRunner(model, layout, ids, batch_size=2, cache_device=cache_device)
    assert runner.num_batches == 2
    runner.set_base("FFFFFF")
    whole = runner.score("FFSFFF")
    with pytest.raises(ValueError, match="lazy base"):  # partial scores are the race's, after `rebase`
        runner.score("FFSFFF", batches=[1])
    runner.rebase("FFFFFF")
    part = runner.score("FFSFFF", batches=[1])
    assert part.seq_losses == whole.seq_losses[2:]
    assert part.loss == pytest.approx(sum(whole.seq_losses[2:]) / 2, rel=1e-12)
    before = runner.counters.layer_forwards
    runner.score("FFFFSF", batches=[0])
    assert runner.counters.layer_forwards - before == (2 if cache_device == "cpu" else 6) * 2
    runner.close()

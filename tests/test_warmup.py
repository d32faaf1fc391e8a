"""The indexer-training math shared by dsa-convert, distill and the recipe: scores from the library's own
indexer, the multi-layer KL, dense forwards, and the guarded optimizer."""

import math

import pytest
import torch

from indexcache_calib.training import warmup
from indexcache_calib.errors import CalibError


def _tiny_dsa(attn, layers=2, **over):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(0)
    kw = dict(
        vocab_size=97, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, index_topk=8, index_n_heads=3, index_head_dim=16,
        first_k_dense_replace=layers, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1,
        max_position_embeddings=128, pad_token_id=None, bos_token_id=0, eos_token_id=0,
    )
    kw.update(over)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.set_attn_implementation(attn)
    return model


def _ids(batch=2, seq=40, seed=1):
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_index_scores_come_from_the_library_indexer(attn):
    model = _tiny_dsa(attn)
    calls = {}
    with torch.no_grad(), warmup.dense(model, calls):
        model.model(input_ids=_ids(), use_cache=False)
    assert sorted(calls) == [0, 1]
    for i, ix in warmup.indexers(model).items():
        scores, topk = warmup.index_scores(ix, calls[i])
        assert scores.requires_grad and scores.shape == (2, 40, 40) and scores.dtype == torch.float32
        with torch.no_grad():
            own = ix(*calls[i].args, **calls[i].kwargs)  # the library's call, decorated, unchanged
        assert torch.equal(topk, own)
        plain, plain_topk = warmup.index_scores(ix, calls[i], grad=False, batched=False)
        visible = plain > warmup.MASKED
        assert torch.equal(visible, scores.detach() > warmup.MASKED)
        assert torch.allclose(scores.detach()[visible], plain[visible], rtol=1e-5, atol=1e-6)
        assert torch.equal(plain_topk, own)
        assert warmup.check_batched_scores(ix, calls[i]) <= 1e-4
        # causal: no query sees a later key
        assert not visible.triu(1).any()


def test_dense_means_every_key_is_attended():
    sparse = _tiny_dsa("eager", index_topk=8)
    wide = _tiny_dsa("eager", index_topk=64)  # same weights (same seed), k above the sequence length
    x = _ids()
    with torch.no_grad():
        with warmup.dense(sparse):
            dense_loss = sparse(input_ids=x, labels=x).loss
        wide_loss = wide(input_ids=x, labels=x).loss
        sparse_loss = sparse(input_ids=x, labels=x).loss
    assert torch.allclose(dense_loss, wide_loss, rtol=0, atol=1e-6)
    assert abs(float(sparse_loss - dense_loss)) > 1e-4
    assert "forward" not in warmup.indexers(sparse)[0].__dict__  # the swap was undone


def test_attention_probs_are_normalised_distributions():
    model = _tiny_dsa("eager")
    probs = {}
    with torch.no_grad(), warmup.dense(model, probs=probs):
        model.model(input_ids=_ids(), use_cache=False)
    for p in probs.values():
        assert torch.allclose(p.sum(-1), torch.ones(2, 40), atol=1e-5)
        assert (p.triu(1) == 0).all()


def test_attention_probs_need_eager_attention():
    model = _tiny_dsa("sdpa")
    with pytest.raises(CalibError, match="eager"):
        with torch.no_grad(), warmup.dense(model, probs={}):
            model.model(input_ids=_ids(), use_cache=False)


def _kl(p, q):
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-30))).sum(-1)


def test_multi_layer_kl_value_is_l_multi_and_gradient_is_the_mean_target_kl():
    torch.manual_seed(0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    targets = []
    for _ in range(3):
        p = torch.rand(2, 6, 6).masked_fill(~causal, 0)
        targets.append(p / p.sum(-1, keepdim=True))
    raw = torch.randn(2, 6, 6)
    scores = raw.masked_fill(~causal, torch.finfo(torch.float32).min).requires_grad_(True)
    loss, value = warmup.multi_layer_kl(targets, scores)
    q = torch.softmax(scores.detach(), -1)
    expected = sum(_kl(p, q) for p in targets).mean() / 3  # sum_j 1/(m+1) KL(p_j || q), mean over queries
    assert math.isclose(value, float(expected), rel_tol=1e-5)
    loss.backward()
    mean_target = torch.stack(targets).mean(0)
    ref = scores.detach().clone().requires_grad_(True)
    _kl(mean_target, torch.softmax(ref, -1)).mean().backward()
    assert torch.allclose(scores.grad, ref.grad, atol=1e-6)


def test_target_mass_on_masked_keys_is_refused():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    p = torch.full((1, 4, 4), 0.25)  # puts mass on future keys
    scores = torch.zeros(1, 4, 4).masked_fill(~causal, float("-inf"))
    with pytest.raises(CalibError, match="masks disagree"):
        warmup.multi_layer_kl([p], scores)


def test_full_groups_serve_up_to_the_next_full_layer():
    assert warmup.full_groups("FSSFSF") == {0: [0, 1, 2], 3: [3, 4], 5: [5]}
    assert warmup.full_groups("FFFF") == {0: [0], 1: [1], 2: [2], 3: [3]}


def test_indexer_step_puts_gradients_only_in_the_trained_indexers():
    model = _tiny_dsa("eager", layers=3)
    trained = warmup.indexer_param_names(model, [0, 2])
    warmup.freeze_all_but(model, trained)
    res = warmup.indexer_step(model, _ids(), {0: [0, 1], 2: [2]}, verify=True)
    assert set(res.layers) == {0, 2} and all(v > 0 for v in res.layers.values())
    assert math.isclose(res.loss, sum(res.layers.values()) / 2, rel_tol=1e-9)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trained)
    assert all(".layers.1." not in n for n in with_grad)
    opt = warmup.IndexerOptimizer(trained, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    applied, _ = opt.step(res.loss, 1e-3)
    assert applied
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trained)
    state = opt.state_tensors()
    assert {k.split("/", 1)[1] for k in state} == set(trained)


def test_optimizer_skips_non_finite_steps_and_stops_after_twenty():
    w = torch.nn.Parameter(torch.ones(3))
    opt = warmup.IndexerOptimizer({"w": w}, lr=0.1)
    w.grad = torch.full((3,), float("nan"))
    applied, _ = opt.step(1.0, 0.1)
    assert not applied
    assert torch.equal(w.detach(), torch.ones(3)) and opt.skipped == 1
    w.grad = torch.ones(3)
    applied, _ = opt.step(float("inf"), 0.1)
    assert not applied and opt.skipped == 2
    w.grad = torch.ones(3)
    applied, _ = opt.step(1.0, 0.1)
    assert applied and opt.streak == 0 and not torch.equal(w.detach(), torch.ones(3))
    with pytest.raises(warmup.NonFinite):
        for _ in range(20):
            w.grad = torch.ones(3)
            opt.step(float("nan"), 0.1)


def test_optimizer_state_round_trips_exactly():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = warmup.IndexerOptimizer({"w": w}, lr=0.05)
    for _ in range(3):
        w.grad = torch.randn(4, 3)
        opt.step(1.0, 0.05)
    state = opt.state_tensors()
    w2 = torch.nn.Parameter(torch.zeros(4, 3))
    opt2 = warmup.IndexerOptimizer({"w": w2}, lr=0.05)
    opt2.load_state_tensors(state)
    assert torch.equal(w2.detach(), w.detach())
    g = torch.randn(4, 3)
    w.grad, w2.grad = g.clone(), g.clone()
    opt.step(1.0, 0.05)
    opt2.step(1.0, 0.05)
    assert torch.equal(w2.detach(), w.detach())


def test_bf16_parameters_train_through_fp32_master_copies():
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = warmup.IndexerOptimizer({"w": w}, lr=1e-4, weight_decay=0.0)
    for _ in range(5):
        w.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step(1.0, 1e-4)
    # Each update (1e-4) is below bf16's resolution at 1.0, so only the master copy can hold it.
    assert opt.master["w"].dtype == torch.float32 and float(opt.master["w"].detach()[0]) < 1.0 - 4e-4
    assert w.dtype == torch.bfloat16


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [warmup.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert warmup.lr_at(100, 100, 1.0) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_paired_standard_error():
    mean, se = warmup.paired([1.0, 2.0, 3.0], [0.5, 1.5, 2.0])
    assert mean == pytest.approx(2 / 3)
    assert se == pytest.approx(math.sqrt(((0.5 - 2 / 3) ** 2 * 2 + (1 - 2 / 3) ** 2) / 2 / 3))

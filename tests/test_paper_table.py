"""`python -m indexcache_calib.evidence.paper_table` on a random tiny model and small files: the attention-mass
measure and the tables' structure. The numbers themselves mean nothing on random weights."""

import json
import math

import pytest
import torch
from conftest import SEQ_LEN, TOPK, write_docs

from indexcache_calib.evidence.paper_table import RATIOS, TABLE_JSON, TABLE_MD, attention_mass, main, paired, topk_mass
from indexcache_calib.search import Score


def test_topk_mass_on_known_attention():
    k, s = 3, 8
    visible = torch.ones(s, s).tril()
    uniform = (visible / visible.sum(-1, keepdim=True)).unsqueeze(0)
    any_visible = torch.arange(k).expand(1, s, k)  # keys 0..k-1 are visible to every query t >= k
    indexer, oracle, random = topk_mass(uniform, any_visible, k)
    expected = torch.tensor([k / (t + 1) for t in range(k, s)]).unsqueeze(0)
    # Under uniform attention every choice of k keys holds k/(t+1): indexer, oracle and random agree.
    for share in (indexer, oracle, random):
        torch.testing.assert_close(share, expected)

    peaked = torch.zeros(1, s, s)
    peaked[..., 0] = 1.0  # every query attends only to key 0
    missing = torch.arange(1, k + 1).expand(1, s, k)
    indexer, oracle, _ = topk_mass(peaked, missing, k)
    assert torch.all(indexer == 0) and torch.all(oracle == 1)
    indexer, _, _ = topk_mass(peaked, any_visible, k)
    assert torch.all(indexer == 1)


def test_attention_mass_on_a_model(glm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(glm_dir)
    before = model.config._attn_implementation
    ids = torch.randint(3, model.config.vocab_size, (3, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    result = attention_mass(model, ids, batch_size=2)
    assert model.config._attn_implementation == before
    assert result["queries_per_layer"] == 3 * (SEQ_LEN - TOPK)
    random = math.fsum(TOPK / (t + 1) for t in range(TOPK, SEQ_LEN)) / (SEQ_LEN - TOPK)
    assert len(result["layers"]) == model.config.num_hidden_layers
    for row in result["layers"]:
        assert 0 <= row["indexer"] <= row["oracle"] + 1e-6 <= 1 + 2e-6
        assert row["random"] == pytest.approx(random, rel=1e-5)


def test_paired_standard_error():
    diff, se = paired(Score(2.0, [1.0, 2.0, 3.0]), Score(1.0, [0.0, 1.0, 2.0]))
    assert diff == pytest.approx(1.0) and se == pytest.approx(0.0)
    diff, se = paired(Score(0.0, [1.0, 3.0]), Score(0.0, [0.0, 0.0]))
    assert diff == pytest.approx(2.0) and se == pytest.approx(1.0)  # sd sqrt(2) over sqrt(2) sequences


def test_tables(glm_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, domain in enumerate(("code", "docs")):
        write_docs(data / f"{domain}.jsonl", n=12, seed=i)
        write_docs(data / f"{domain}.heldout.jsonl", n=12, seed=10 + i)
    out = tmp_path / "out"
    rc = main(["--model", str(glm_dir), "--data-dir", str(data), "--seq-len", str(SEQ_LEN), "--num-samples", "2",
               "--heldout-samples", "3", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout == (out / TABLE_MD).read_text()
    for heading in ("### 1.", "### 2.", "### 3."):
        assert heading in stdout
    result = json.loads((out / TABLE_JSON).read_text())
    n = result["settings"]["num_layers"]
    rows = result["rows"]
    assert [(r["heldout"], r["ratio"]) for r in rows] == [(d, f"1/{e}") for d in ("code", "docs") for e in RATIOS]
    for domain in ("code", "docs"):
        mine = [r for r in rows if r["heldout"] == domain]
        fulls = []
        for r, every in zip(mine, RATIOS):
            searched, uniform = r["searched"]["pattern"], r["uniform"]["pattern"]
            assert searched.count("F") == uniform.count("F") == r["num_full"] == math.ceil(n / every)
            assert searched[0] == "F" and len(searched) == n
            assert r["searched_minus_uniform"] == pytest.approx(r["searched"]["loss"] - r["uniform"]["loss"])
            assert r["se"] is not None and r["se"] >= 0
            assert set(r["other_domains"]) == {"code", "docs"} - {domain}
            fulls.append({i for i, c in enumerate(searched) if c == "F"})
        assert fulls[0] >= fulls[1] >= fulls[2]  # one greedy path: nested F-sets
        scores = result["heldout"][domain]["scores"]
        assert len(scores["F" * n]["seq_losses"]) == result["heldout"][domain]["sequences"] == 3
    # The searched patterns are the ones each domain's calibration run committed.
    for domain in ("code", "docs"):
        layer_map = json.loads((out / "calibration" / domain / "layer_map.json").read_text())
        path = {row["num_full"]: row["pattern"] for row in layer_map["path"]}
        for r in [r for r in rows if r["heldout"] == domain]:
            assert path[r["num_full"]] == r["searched"]["pattern"]

"""Recipes: calibration-data builder and the tiny-model trainer (its warm-up math is tested in test_warmup.py)."""

import gzip
import hashlib
import json

import torch

from indexcache_calib.recipes import build_data

GFDL_NOTICE = """This is demo.info, produced by makeinfo version 6.8 from demo.texi.

   Copyright (C) 2024 Free Software Foundation, Inc.

     Permission is granted to copy, distribute and/or modify this
     document under the terms of the GNU Free Documentation License,
     Version 1.3 or any later version published by the Free Software
     Foundation; with no Invariant Sections, with no Front-Cover Texts,
     and with no Back-Cover Texts.
"""


def _node(manual, name, body):
    return f"\x1f\nFile: {manual}.info,  Node: {name},  Next: X,  Up: Top\n\n{body}\n"


def _prose(word, n=12):
    return " ".join(f"The {word} option number {i} changes how the program reads its input." for i in range(n))


def _make_tree(root):
    py = root / "py"
    for rel in ["a.py", "pkg/b.py", "pkg/c.py", "d.py", "e.py", "f.py", "test/test_a.py", "tiny.py"]:
        path = py / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "" if rel == "tiny.py" else "\n".join(f"def f_{i}(x):\n    return x + {i}  # {rel}" for i in range(60))
        path.write_text(f"# {rel}\n{body}\n")
    (py / "dup.py").write_text((py / "a.py").read_text())  # same text twice: kept once
    (py / "LICENSE.txt").write_text("PSF LICENSE AGREEMENT\n")
    info = root / "info"
    info.mkdir()
    nodes = "".join(_node("demo", f"Section {i}", f"{i} Section\n=========\n\n{_prose(i)}\n\n"
                                  "* Menu:\n\n* Sub one::    First.\n* Sub two::    Second.\n\n"
                                  f"   More prose, *note Section {i + 1}::, and *Note Other: Section 2.\n")
                    for i in range(8))
    nodes += _node("demo", "Concept Index", "* Menu:\n\n* entry:  Section 1.   (line 3)\n")
    nodes += _node("demo", "GNU Free Documentation License", "GNU Free Documentation License\n\n" + _prose("licence"))
    (info / "demo.info.gz").write_bytes(gzip.compress((GFDL_NOTICE + nodes).encode(), mtime=0))
    gpl = "This is other.info.\n\n Permission under the GNU General Public License.\n"
    (info / "other.info").write_text(gpl + _node("other", "Intro", _prose("gpl")))
    return py, info


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_data_is_deterministic_and_splits_are_disjoint(tmp_path):
    py, info = _make_tree(tmp_path)
    outs = [tmp_path / "out1", tmp_path / "out2"]
    for out in outs:
        build_data.build(out, py, info, budget_bytes=10**7, heldout_percent=40)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert {"code.jsonl", "code.heldout.jsonl", "docs.jsonl", "docs.heldout.jsonl", "README.md"} <= set(files)
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

    for domain in ("code", "docs"):
        calib, held = _read(outs[0] / f"{domain}.jsonl"), _read(outs[0] / f"{domain}.heldout.jsonl")
        assert calib and held
        assert not {r["id"] for r in calib} & {r["id"] for r in held}
        assert not {r["text"] for r in calib} & {r["text"] for r in held}
        assert [r["id"] for r in calib] == sorted(r["id"] for r in calib)
    code_ids = {r["id"] for f in ("code.jsonl", "code.heldout.jsonl") for r in _read(outs[0] / f)}
    assert not any(i.startswith("test/") or i == "tiny.py" for i in code_ids)
    assert len({"a.py", "dup.py"} & code_ids) == 1
    docs = [r for f in ("docs.jsonl", "docs.heldout.jsonl") for r in _read(outs[0] / f)]
    assert all(r["id"].startswith("demo/Section") for r in docs)  # no GPL manual, index or licence node
    text = "".join(r["text"] for r in docs)
    assert "* Menu:" not in text and "*note" not in text.lower() and "=====" not in text and "File:" not in text
    assert "see Section 2" in text and "See Other." in text
    readme = (outs[0] / "README.md").read_text()
    for name in ("code.jsonl", "docs.heldout.jsonl"):
        assert hashlib.sha256((outs[0] / name).read_bytes()).hexdigest() in readme


def test_committed_calibration_data_is_well_formed():
    root = build_data.DEFAULT_OUT
    for domain in ("code", "docs"):
        calib, held = _read(root / f"{domain}.jsonl"), _read(root / f"{domain}.heldout.jsonl")
        assert not {r["id"] for r in calib} & {r["id"] for r in held}
        size = (root / f"{domain}.jsonl").stat().st_size + (root / f"{domain}.heldout.jsonl").stat().st_size
        assert 500_000 <= size <= 1_500_000
        assert hashlib.sha256((root / f"{domain}.jsonl").read_bytes()).hexdigest() in (
            root / "README.md").read_text()


def test_train_tiny_smoke_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GlmMoeDsaForCausalLM

    from indexcache_calib.recipes import train_tiny

    out = tmp_path / "tiny"
    log = train_tiny.train(train_tiny.parse_args(["--smoke", "--out", str(out), "--seed", "3"]))
    assert [s["stage"] for s in log["training"]["stages"]] == ["dense", "indexer", "sparse"]
    assert all(s["steps_done"] > 0 for s in log["training"]["stages"])
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GlmMoeDsaForCausalLM)
    assert tok.eos_token is not None and len(tok) == model.config.vocab_size
    assert all(t == "full" for t in model.config.indexer_types)
    ids = tok("def f(x):\n    return x  # see the manual", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert (out / "MODEL_CARD.md").is_file()
    saved = json.loads((out / "training_log.json").read_text())
    assert set(saved["held_out_loss"]["final"]["code"]) == {"dense", "sparse"}


def test_train_tiny_glm4_moe_lite_is_a_source_for_dsa_convert(tmp_path):
    from transformers import AutoModelForCausalLM

    from indexcache_calib.training.convert import ConvertOptions, convert
    from indexcache_calib.recipes import train_tiny

    src = tmp_path / "lite"
    log = train_tiny.train(train_tiny.parse_args(["--smoke", "--arch", "glm4_moe_lite", "--out", str(src)]))
    assert [s["stage"] for s in log["training"]["stages"]] == ["dense"]
    model = AutoModelForCausalLM.from_pretrained(src)
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM" and "Glm4MoeLite" in (src / "MODEL_CARD.md").read_text()
    data = train_tiny.REPO_ROOT / "calibration_data" / "code.heldout.jsonl"
    result = convert(ConvertOptions(model=str(src), data=str(data), out=str(tmp_path / "dsa"), steps=1, seq_len=64,
                                    batch_size=1, index_topk=16, index_heads=2, index_head_dim=16))
    assert result["model"]["class"] == "GlmMoeDsaForCausalLM" and result["training"]["steps_done"] == 1


def test_training_loop_skips_non_finite_steps():
    from types import SimpleNamespace

    from indexcache_calib.recipes.train_tiny import Windows, run_stage

    w = torch.nn.Parameter(torch.ones(3))
    args = SimpleNamespace(dense_steps=6, dense_epochs=0, dense_minutes=0, smoke=True, eval_every=0,
                           device="cpu", bf16=False, batch_size=2, seq_len=4)
    calls = []

    def step(x):
        calls.append(x.shape)
        loss = (w * (float("nan") if len(calls) in (2, 3) else 1.0)).sum()
        loss.backward()
        return {"loss": loss.item()}

    data = Windows({"code": torch.arange(50), "docs": torch.arange(50)}, 4, 2, seed=0)
    record = run_stage("dense", args, None, [{"params": [w], "lr": 0.1}], step, data)
    assert record["steps_done"] == 6 and record["steps_skipped"] == 2
    assert torch.isfinite(w).all() and calls == [(2, 4)] * 6

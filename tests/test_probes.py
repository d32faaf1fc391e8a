"""Retrieval probes (`probes.py`) and the objectives' token weights (`objective.py`): the pure parts."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from indexcache_calib import objective as obj
from indexcache_calib.errors import CalibError
from indexcache_calib.probes import COPY_ANSWER, COPY_CUE, KINDS, Builder, haystack_stream, parse_kinds
from indexcache_calib.recipes.train_tiny import REPO_ROOT

MODEL = REPO_ROOT / "indexcache_calib" / "models" / "tiny-dsa"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def builder(tokenizer):
    texts = [json.loads(line)["text"] for line in open(REPO_ROOT / "calibration_data" / "docs.heldout.jsonl")][:40]
    return Builder(tokenizer, haystack_stream(texts, tokenizer))


def find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if list(seq[i : i + len(sub)]) == list(sub)]


def test_kinds_are_read_from_a_comma_list():
    assert parse_kinds("all") == list(KINDS)
    assert parse_kinds("copy, needle,copy") == ["copy", "needle"]
    for bad in ("", "needles", "needle,haystack"):
        with pytest.raises(CalibError):
            parse_kinds(bad)


def test_probes_are_the_same_token_ids_for_a_seed(builder):
    a = builder.build(list(KINDS), [512, 768], 3, seed=7)
    assert a == builder.build(list(KINDS), [512, 768], 3, seed=7)
    b = builder.build(list(KINDS), [512, 768], 3, seed=8)
    assert all(x.ids != y.ids for x, y in zip(a, b))
    # A probe does not depend on which other kinds or lengths were asked for.
    assert builder.build(["copy"], [768], 3, seed=7) == [p for p in a if p.kind == "copy" and p.seq_len == 768]


def test_every_probe_holds_what_it_asks_for_once_at_its_depth(builder, tokenizer):
    probes = builder.build(list(KINDS), [600], 4, seed=0)
    assert [(p.kind, p.seq_len) for p in probes] == [(k, 600) for k in KINDS for _ in range(4)]
    for p in probes:
        assert len(p.ids) == 600 and 0 < p.answer_start < 600
        context = p.ids[: p.answer_start]
        if p.kind == "copy":
            assert len(p.answer) == COPY_ANSWER
            cue = p.ids[p.answer_start - COPY_CUE : p.answer_start]
            spots = find(context[: -COPY_CUE], cue)
            assert len(spots) == 1  # the quoted opening occurs once in the haystack, followed by the answer
            assert tuple(context[spots[0] + COPY_CUE : spots[0] + COPY_CUE + COPY_ANSWER]) == p.answer
        else:
            # The question's last line is the needle's own tokens: a copy is token for token.
            asked = tokenizer.decode(p.answer)
            assert asked.strip().isdigit()
            needle = p.ids[p.answer_start - 8 : p.answer_start] + p.answer
            assert len(find(context, needle)) == 1
            assert context.count(tokenizer.encode("\nThe magic number for", add_special_tokens=False)[1]) >= (4 if p.kind == "multikey" else 1)
    for kind in KINDS:  # depths spread evenly over the haystack
        depths = [p.depth for p in probes if p.kind == kind]
        assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.7


def test_the_needle_sits_at_its_depth(builder):
    for p in builder.build(["needle"], [1024], 4, seed=1):
        value_at = find(p.ids[: p.answer_start], p.answer)[0]
        assert abs(value_at / 1024 - p.depth) < 0.1, (value_at, p.depth)


def test_a_probe_too_short_or_a_haystack_too_small_is_refused(builder, tokenizer):
    with pytest.raises(CalibError, match="leaves .* for its haystack"):
        builder.check(["multikey"], [160], "data.jsonl")
    small = Builder(tokenizer, builder.stream[:700])
    small.check(["needle"], [700], "data.jsonl")
    with pytest.raises(CalibError, match=r"holds 700 tokens of haystack; probes of 4,096 tokens need at least 4,0\d\d"):
        small.check(["needle"], [1024, 4096], "data.jsonl")


def test_a_chat_template_frames_the_question_and_the_answer_follows_it(tokenizer, builder):
    chat = AutoTokenizer.from_pretrained(MODEL)
    chat.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    framed = Builder(chat, builder.stream)
    p = framed.probe("needle", 512, 0, 1, 0)
    before = chat.encode("<|user|>", add_special_tokens=False)
    after = chat.encode("<|assistant|>", add_special_tokens=False)
    assert list(p.ids[: len(before)]) == before
    assert find(p.ids, after) and find(p.ids, after)[-1] < p.answer_start
    assert len(p.ids) == 512 and p.answer == builder.probe("needle", 512, 0, 1, 0).answer


# -- the objectives' token weights ----------------------------------------------------------------------


def test_answer_weights_mark_the_labels_of_the_answer_tokens(builder):
    probes = builder.build(["needle", "copy"], [300], 2, seed=0)
    w = obj.answer_weights(probes, 300)
    assert w.shape == (4, 299)
    for row, p in zip(w, probes):
        assert row.nonzero().flatten().tolist() == list(range(p.answer_start - 1, 299))


def test_short_windows_cover_each_label_once_with_at_least_the_window_before_it():
    for seq_len, window in ((64, 8), (65, 8), (100, 16), (34, 16)):
        seen = []
        for start, first, end in obj.short_windows(seq_len, window):
            assert first - start >= window and start >= 0 and start + 2 * window + 1 <= seq_len and end <= start + 2 * window
            seen += range(first, end)
        assert seen == list(range(2 * window, seq_len - 1))


def test_key_tokens_are_those_the_far_context_lowers_by_the_margin():
    n, seq_len, window = 2, 40, 4
    ids = torch.arange(n * seq_len).view(n, seq_len)
    long = torch.full((n, seq_len - 1), 1.0)
    long[0, 20] = 3.0  # gains, but is not predicted well even with everything: not key

    def short(windows):  # a fake model: every label loses 0.2 nats without far context, but two lose 1.5
        out = torch.full((windows.shape[0], windows.shape[1] - 1), 1.2)
        for target in (ids[0, 13], ids[1, 30]):
            hit = windows[:, 1:] == target
            out[hit] = 2.5
        out[windows[:, 1:] == ids[0, 21]] = 4.0
        return out

    weights, info = obj.key_token_weights(ids, long, obj.KeyRule(window, 0.5), short)
    assert weights.nonzero().tolist() == [[0, 12], [1, 29]]
    assert info["key_tokens"] == 2 and info["tokens"] == n * (seq_len - 1) and info["sequences_with_key_tokens"] == 2
    with pytest.raises(CalibError, match="no token of the calibration data is a key token"):
        obj.key_token_weights(ids, long, obj.KeyRule(window, 2.0), short)


def test_objective_settings_are_checked():
    obj.check_objective("lm", None)
    with pytest.raises(CalibError, match="unknown --objective"):
        obj.check_objective("perplexity", None)
    with pytest.raises(CalibError, match="give their kinds with --retrieval"):
        obj.check_objective("retrieval", None)
    with pytest.raises(CalibError, match="--retrieval sets the probes of --objective retrieval"):
        obj.check_objective("lm", "all")
    assert obj.key_rule(None, 0.5, 64, 1024).window == 128
    with pytest.raises(CalibError, match="leaves no token with more context"):
        obj.key_rule(None, 0.5, 64, 200)
    with pytest.raises(CalibError, match="--key-margin"):
        obj.key_rule(8, 0.0, 64, 1024)

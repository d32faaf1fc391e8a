"""Retrieval probes, RULER-style, built from the user's own documents as the haystack.

A probe is one token sequence of an exact length: haystack tokens from `--data`, something to find placed
at a depth of the haystack, a question, and the answer's tokens last. It is scored teacher-forced
(`runner.PatternRunner` with the answer positions as its token weights): the answer tokens' loss, and
exact match, which holds when every answer token is the argmax given the reference prefix, which is
exactly when greedy decoding would produce the answer.

Kinds (`KINDS`):
- `needle`: one key-value sentence in the haystack; asked for the value of its key.
- `multikey`: four such sentences with distinct keys and values; asked for one (the others distract).
- `copy`: a span of the haystack itself; its opening is quoted after the haystack and the rest is asked.

Pure: everything here is token ids and a tokenizer; nothing loads a model. The same seed gives the
same token ids (each probe draws from its own `random.Random`, seeded by the seed, kind, length and
index, so adding a kind or a length leaves the other probes as they were).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from indexcache_calib.errors import CalibError, plural

KINDS = {
    "needle": "one key-value needle, asked back",
    "multikey": "four key-value needles with distinct keys, one asked",
    "copy": "a span of the haystack, its opening quoted, the rest asked",
}
DISTRACTORS = 3  # the multikey kind's needles besides the one asked
VALUE_DIGITS = 6
COPY_CUE = 12  # tokens of the span quoted after the haystack: long enough to occur once in it
COPY_ANSWER = 8  # tokens of the span asked for
MIN_HAYSTACK = 64  # a probe shorter than this is mostly its own question
# Keys: plain words any tokenizer splits into a few pieces.
KEY_WORDS = (
    "anchor", "badger", "basket", "beacon", "bishop", "blossom", "bramble", "breeze", "bucket", "cactus",
    "candle", "canyon", "carpet", "castle", "cellar", "cherry", "chisel", "cinder", "clover", "cobalt",
    "copper", "cotton", "crater", "dagger", "dolphin", "ember", "falcon", "feather", "fennel", "fiddle",
    "garnet", "ginger", "glacier", "goblet", "granite", "harbor", "hazel", "helmet", "hermit", "island",
    "jasmine", "kettle", "ladder", "lantern", "lemon", "lizard", "magnet", "maple", "meadow", "mirror",
    "mitten", "needle", "nutmeg", "orchid", "otter", "paddle", "parrot", "pebble", "pepper", "pillow",
    "pirate", "plum", "pocket", "puffin", "quartz", "rabbit", "raven", "ribbon", "saddle", "salmon",
    "sapphire", "scarlet", "shadow", "silver", "spindle", "spruce", "squirrel", "thimble", "thistle", "timber",
    "tulip", "turnip", "velvet", "violin", "walnut", "whistle", "willow", "wizard", "yonder", "zephyr",
)


@dataclass(frozen=True)
class Probe:
    kind: str
    seq_len: int
    depth: float  # where what is asked for sits, as a share of the haystack (0: its start)
    ids: tuple[int, ...]  # exactly seq_len tokens
    answer_start: int  # index in `ids` of the first answer token; the answer runs to the end

    @property
    def answer(self) -> tuple[int, ...]:
        return self.ids[self.answer_start:]


def parse_kinds(spec: str) -> list[str]:
    """'needle,copy' -> ['needle', 'copy']; 'all' -> every kind, in `KINDS` order."""
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if not names:
        raise CalibError("--retrieval names no probe kind", hint=f"use 'all' or some of {', '.join(KINDS)}")
    if "all" in names:
        return list(KINDS)
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise CalibError(f"unknown probe kind {unknown[0]!r} in --retrieval {spec!r}", hint=f"use 'all' or some of {', '.join(KINDS)}")
    return list(dict.fromkeys(names))


class Builder:
    """Probes in one tokenizer over one haystack stream (documents joined with EOS, as calibration packs them)."""

    def __init__(self, tokenizer, stream: list[int]):
        self.tok, self.stream = tokenizer, stream
        self.prefix, self.suffix = _chat_frame(tokenizer)
        self._ends_line: dict[int, bool] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def fixed_tokens(self, kind: str) -> int:
        """Tokens of a probe that are not haystack, at their longest (keys differ in length)."""
        longest = max(KEY_WORDS, key=lambda w: len(self.encode(f" {w} is")))
        parts = self._needle_parts(longest, "9" * VALUE_DIGITS)
        needle = len(parts[0]) + len(parts[1]) + len(parts[2])
        asked = len(self.encode(self._question(kind, longest))) + len(parts[0]) + len(parts[1])
        if kind == "copy":
            needle, asked = 0, len(self.encode(self._question(kind, ""))) + COPY_CUE + COPY_ANSWER + 1
        return len(self.prefix) + len(self.suffix) + asked + needle * (1 + DISTRACTORS if kind == "multikey" else 1)

    def check(self, kinds: list[str], lengths: list[int], what: str) -> None:
        """Every probe fits its length, and the haystack holds one probe's haystack of the longest length."""
        for kind in kinds:
            for n in lengths:
                room = n - self.fixed_tokens(kind)
                if room < MIN_HAYSTACK:
                    raise CalibError(f"a {kind} probe of {n:,} tokens leaves {max(room, 0)} for its haystack, "
                                     f"fewer than {MIN_HAYSTACK}", hint="use longer probe lengths")
        need = max(n - min(self.fixed_tokens(k) for k in kinds) for n in lengths)
        if len(self.stream) < need:
            raise CalibError(f"{what} holds {plural(len(self.stream), 'token')} of haystack; probes of {max(lengths):,} tokens "
                             f"need at least {need:,}", hint="pass a larger --data file, or shorter lengths")

    def build(self, kinds: list[str], lengths: list[int], num_samples: int, seed: int) -> list[Probe]:
        """`num_samples` probes of each kind at each length, their depths spread evenly: probe i of n sits at
        (i + 0.5) / n of its haystack. Ordered by length, then kind, then depth."""
        return [self.probe(kind, n, i, num_samples, seed) for n in lengths for kind in kinds for i in range(num_samples)]

    def probe(self, kind: str, seq_len: int, index: int, of: int, seed: int) -> Probe:
        rng = random.Random(f"indexcache-probe:{seed}:{kind}:{seq_len}:{index}")
        depth = (index + 0.5) / of
        if kind == "copy":
            return self._copy(rng, seq_len, depth)
        keys = rng.sample(KEY_WORDS, 1 + (DISTRACTORS if kind == "multikey" else 0))
        values = [str(rng.randrange(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS)) for _ in keys]
        needles = [self._needle_parts(k, v) for k, v in zip(keys, values)]
        lead, value, tail = needles[0]
        ask = self.encode(self._question(kind, keys[0]))
        room = seq_len - len(self.prefix) - len(self.suffix) - len(ask) - len(lead) - len(value) - sum(map(lambda p: sum(map(len, p)), needles))
        hay = self._haystack(rng, room)
        # The asked needle at `depth`; distractors at depths of their own, drawn once per probe.
        spots = [(self._snap(hay, round(depth * len(hay))), needles[0])]
        spots += [(self._snap(hay, rng.randrange(len(hay) + 1)), p) for p in needles[1:]]
        context: list[int] = []
        at = 0
        for spot, parts in sorted(spots, key=lambda s: s[0]):
            context += hay[at:spot] + parts[0] + parts[1] + parts[2]
            at = spot
        context += hay[at:]
        ids = self.prefix + context + ask + self.suffix + lead
        return Probe(kind, seq_len, depth, tuple(ids + value), len(ids))

    def _copy(self, rng: random.Random, seq_len: int, depth: float) -> Probe:
        ask = self.encode(self._question("copy", ""))
        newline = self.encode("\n")
        span = COPY_CUE + COPY_ANSWER
        room = seq_len - len(self.prefix) - len(self.suffix) - len(ask) - len(newline) - span
        hay = self._haystack(rng, room)
        eos = self.tok.eos_token_id
        # The span starts at `depth`, moved to the nearest start whose cue occurs once in the haystack and
        # which holds no document boundary.
        want = round(depth * (len(hay) - span))
        starts = sorted(range(len(hay) - span + 1), key=lambda s: (abs(s - want), s))
        for s in starts[:4096]:
            cue = hay[s : s + COPY_CUE]
            if eos in hay[s : s + span] or _count(hay, cue) != 1:
                continue
            ids = self.prefix + hay + ask + self.suffix + newline + cue
            answer = hay[s + COPY_CUE : s + span]
            # The probe asks at its own depth; `depth` reports where the span really is.
            return Probe("copy", seq_len, s / max(1, len(hay) - span), tuple(ids + answer), len(ids))
        raise CalibError("no span of the haystack occurs once near the asked depth: the data repeats itself too much for a copy probe",
                         hint="use other --data, or leave out the copy kind")

    def _snap(self, hay: list[int], at: int, reach: int = 48) -> int:
        """The nearest position within `reach` of `at` that follows a line break, so a needle starts a line."""
        for pos in sorted(range(max(1, at - reach), min(len(hay), at + reach) + 1), key=lambda p: (abs(p - at), p)):
            t = hay[pos - 1]
            if t not in self._ends_line:
                self._ends_line[t] = self.tok.decode([t]).endswith("\n")
            if self._ends_line[t]:
                return pos
        return at

    def _haystack(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.stream) - n + 1)
        return list(self.stream[start : start + n])

    def _needle_parts(self, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
        # The needle and the answer share one tokenization of the key and value, so a copy is token for token.
        return self.encode(f"\nThe magic number for {key} is"), self.encode(f" {value}"), self.encode(".\n")

    @staticmethod
    def _question(kind: str, key: str) -> str:
        if kind == "copy":
            return "\n\nRepeat the passage of the text above that begins as follows."
        return f"\n\nWhat is the magic number for {key}?"


def _chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens a chat template puts before a user turn and between it and the assistant's answer; none
    for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return [], []
    marker = "\u2063PROBE\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    before, _, after = text.partition(marker)
    encode = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []  # noqa: E731
    return encode(before), encode(after)


def _count(hay: list[int], cue: list[int]) -> int:
    first, n, found = cue[0], len(cue), 0
    for i, t in enumerate(hay):
        if t == first and hay[i : i + n] == cue:
            found += 1
            if found > 1:
                break
    return found


def haystack_stream(texts: list[str], tokenizer) -> list[int]:
    """Documents tokenized and joined with EOS, as `data.pack` joins them."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CalibError("the tokenizer has no EOS token to join documents with")
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    return stream

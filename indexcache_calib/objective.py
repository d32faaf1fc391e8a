"""What a search scores, as token weights over the calibration sequences.

- `lm` (the paper's): the mean loss over every token. No weights.
- `key-tokens`: the loss on the tokens that need far context, found once on the all-Full model: a token is
  key where its loss with the whole sequence before it is lower, by at least a margin, than with only a
  short local window (the LongPPL idea, Fang et al. 2024). Most tokens of natural text are predictable
  from a short window and barely move when sharing costs far context; these few are what long-context
  benchmarks measure.
- `retrieval`: the answer tokens of retrieval probes (`probes.py`) built from the calibration data.

The runner scores every objective the same way (`PatternRunner(weights=...)`), so the race, the
tolerance, resume and the self-check are the same for all three. Pure: the model is a function passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from indexcache_calib.errors import CalibError, plural

OBJECTIVES = {
    "lm": "mean LM loss over every token (the paper's)",
    "key-tokens": "LM loss on the tokens whose loss the far context lowers (found on all-Full)",
    "retrieval": "loss on the answer tokens of retrieval probes built from the data",
}
DEFAULT_OBJECTIVE = "lm"
# A key token gains at least this many nats from the context beyond the short window, and is predicted
# with at most KEY_MAX_LOSS nats given the whole context (LongPPL's two thresholds: a token the model cannot
# predict even with everything is noise, not a use of far context).
DEFAULT_KEY_MARGIN = 0.5
KEY_MAX_LOSS = 2.0
# The short window, in multiples of the indexer's budget: each label then sees 2 to 4 budgets of context, which
# any top-k of at least that budget could cover without the far tokens.
KEY_WINDOW_BUDGETS = 2


@dataclass(frozen=True)
class KeyRule:
    window: int  # each label's short context: between `window` and 2 x `window` tokens before it
    margin: float
    max_loss: float = KEY_MAX_LOSS

    def text(self) -> str:
        return (f"tokens whose loss with the whole context is at least {self.margin:g} nats below their loss with "
                f"{self.window:,}-{2 * self.window:,} tokens of context, and at most {self.max_loss:g} nats")


def check_objective(name: str, kinds: str | None, command: str = "calibrate") -> None:
    if name not in OBJECTIVES:
        raise CalibError(f"unknown --objective {name!r}", hint=f"use one of {', '.join(OBJECTIVES)}")
    if name == "retrieval" and not kinds:
        raise CalibError("--objective retrieval scores the answers of retrieval probes: give their kinds with --retrieval",
                         hint="e.g. --retrieval all, or --retrieval needle,copy")
    if name != "retrieval" and kinds:
        raise CalibError(f"--retrieval sets the probes of --objective retrieval, not --objective {name}",
                         hint=f"add --objective retrieval, or leave --retrieval out (indexcache evaluate --retrieval scores a {command}d pattern's retrieval)")


def key_rule(window: int | None, margin: float, floor: int, seq_len: int) -> KeyRule:
    """The rule as asked, checked against the model's budget (`floor`: tokens below which every key is
    selected) and the calibration length: some label must see more than the short window can."""
    window = KEY_WINDOW_BUDGETS * floor if window is None else window
    if window < 1:
        raise CalibError("--key-window must be at least 1 token")
    if not math.isfinite(margin) or margin <= 0:
        raise CalibError(f"--key-margin {margin} is not a number of nats > 0")
    if seq_len < 2 * window + 2:
        raise CalibError(
            f"--seq-len {seq_len} leaves no token with more context than the key-token window of {window:,}-{2 * window:,} tokens",
            hint=f"use a --seq-len of at least {4 * window:,} (several windows), or a smaller --key-window",
        )
    return KeyRule(window, margin)


def short_windows(seq_len: int, window: int) -> list[tuple[int, int, int]]:
    """(window start, first label, end label) for each stretch of labels scored with short context: labels
    [first, end) (label j predicts token j + 1) from a window of 2 x `window` + 1 tokens starting at `start`,
    so each sees at least `window` tokens. Labels before 2 x `window` see no more than that whole, and are
    not scored short."""
    span = 2 * window + 1
    out = []
    for first in range(2 * window, seq_len - 1, window):
        end = min(first + window, seq_len - 1)
        start = min(first - window, seq_len - span)
        out.append((start, first, end))
    return out


def key_token_weights(ids: torch.Tensor, long_losses: torch.Tensor, rule: KeyRule,
                      token_losses: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Key-token weights [sequences, seq_len - 1] (1.0 where key) and what the layer map records of them.
    `long_losses`: every label's loss with the whole sequence, all-Full; `token_losses(windows)` the same for
    a batch of short windows."""
    n, seq_len = ids.shape
    spans = short_windows(seq_len, rule.window)
    short = torch.full_like(long_losses, math.nan)
    if spans:
        windows = torch.cat([ids[:, s : s + 2 * rule.window + 1] for s, _, _ in spans])
        losses = token_losses(windows).view(len(spans), n, -1)
        for k, (s, first, end) in enumerate(spans):
            short[:, first:end] = losses[k, :, first - s : end - s]
    gain = short - long_losses
    key = (gain >= rule.margin) & (long_losses <= rule.max_loss)  # NaN (no short score) compares False
    weights = key.float()
    count = int(key.sum())
    info = {
        "rule": rule.text(),
        "window": rule.window,
        "margin": rule.margin,
        "max_loss": rule.max_loss,
        "key_tokens": count,
        "tokens": int(long_losses.numel()),
        "share": count / long_losses.numel(),
        "sequences_with_key_tokens": int(key.any(dim=1).sum()),
    }
    if count == 0:
        raise CalibError(f"no token of the calibration data is a key token ({rule.text()})",
                         hint="lower --key-margin, use a smaller --key-window or a longer --seq-len, or use --objective lm")
    return weights, info


def answer_weights(probes, seq_len: int) -> torch.Tensor:
    """Weights [probes, seq_len - 1]: 1.0 on each label position of an answer token."""
    weights = torch.zeros(len(probes), seq_len - 1)
    for i, p in enumerate(probes):
        weights[i, p.answer_start - 1 :] = 1.0
    return weights


def describe(info: dict) -> str:
    """One line for the summary and `show`."""
    name = info["name"]
    if name == "key-tokens":
        return (f"key-tokens: {info['rule']}: {info['share']:.1%} of tokens ({info['key_tokens']:,} of {info['tokens']:,}, "
                f"in {plural(info['sequences_with_key_tokens'], 'sequence')})")
    if name == "retrieval":
        return (f"retrieval: answer tokens of {plural(info['probes'], 'probe')} ({', '.join(info['kinds'])}) of "
                f"{info['seq_len']:,} tokens, seed {info['seed']}, {info['answer_tokens']:,} answer tokens")
    return f"{name}: {OBJECTIVES[name]}"

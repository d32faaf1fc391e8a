"""Calibration data: read documents, tokenize, join with EOS, pack into fixed-length sequences."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from indexcache_calib.errors import CalibError, plural

TABULAR = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Documents:
    texts: list[str]
    skipped: list[str]  # human-readable notes on records left out, by line number
    notes: list[str] = field(default_factory=list)  # warnings on how the records were read, each once


def _render_messages(messages, tokenizer, where: str) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise CalibError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        # No template to render with: plain role-prefixed turns keep the text, which is what is calibrated.
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _record_text(record, tokenizer, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise CalibError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field in record:
        value = record[field]
        if not isinstance(value, str):
            raise CalibError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        return value
    if "messages" in record:
        return _render_messages(record["messages"], tokenizer, where)
    raise CalibError(
        f"{where}: record has neither {field!r} nor 'messages' (keys: {', '.join(sorted(record)) or 'none'})",
        hint=f"each line must be an object with a {field!r} string or a chat 'messages' list; --text-field picks another field",
    )


PLAIN_TURNS = ("chat 'messages' rendered as plain 'role: content' turns: the tokenizer has no chat template, "
               "so the calibration text is not what the model sees when served")


def read_documents(path: str | Path, tokenizer=None, field: str = "text") -> Documents:
    path = Path(path)
    if not path.exists():
        raise CalibError(f"data file {path} does not exist")
    texts, skipped, notes = [], [], []
    if path.is_dir():
        texts = _read_saved_dataset(path, field)
    elif path.suffix in (".jsonl", ".json"):
        lines = _utf8_text(path).splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CalibError(f"{path}:{n}: malformed JSON ({e.msg})", hint="each line must be one JSON object")
            text = _record_text(record, tokenizer, field, f"{path}:{n}")
            if (isinstance(record, dict) and field not in record and "messages" in record and PLAIN_TURNS not in notes
                    and not getattr(tokenizer, "chat_template", None)):
                notes.append(PLAIN_TURNS)
            if text.strip():
                texts.append(text)
            else:
                skipped.append(f"line {n}: empty text")
    elif path.suffix in TABULAR:
        texts = _read_tabular(path, field)
    else:
        text = _utf8_text(path)
        texts = [text] if text.strip() else []
    if not texts:
        raise CalibError(f"{path} holds no text to calibrate on")
    return Documents(texts, skipped, notes)


def _utf8_text(path: Path) -> str:
    """The file as UTF-8 text, a leading byte-order mark dropped (editors on Windows write one); a byte
    that is not UTF-8 is reported with its line number."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibError(f"cannot read {path}: {e.strerror or e}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CalibError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})", hint="save the file as UTF-8")


def _column(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise CalibError(f"{where} has no {field!r} column (columns: {', '.join(ds.column_names)})", hint="--text-field picks another column")
    values = ds[field]
    for row, t in enumerate(values, 1):
        if t is not None and not isinstance(t, str):  # what a JSONL record with this value is told
            raise CalibError(f"{where}: row {row}: field {field!r} must be a string, got {type(t).__name__}",
                             hint="--text-field picks another column")
    return [t for t in values if isinstance(t, str) and t.strip()]


def _read_tabular(path: Path, field: str) -> list[str]:
    from datasets import load_dataset  # deferred: datasets takes ~0.5 s to import and only tabular files need it

    try:
        ds = load_dataset(TABULAR[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise CalibError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return _column(ds, field, str(path))


def _read_saved_dataset(path: Path, field: str) -> list[str]:
    from datasets import DatasetDict, load_from_disk  # deferred: slow import, only saved datasets need it

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise CalibError(f"{path} is a directory but not a saved datasets dataset: {str(e).splitlines()[0]}")
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    return _column(ds, field, str(path))


def pack(docs: list[str], tokenizer, seq_len: int, num_samples: int, seed: int) -> tuple[torch.Tensor, int]:
    """Tokenize, join with EOS, cut into `seq_len` windows, pick `num_samples` of them by `seed`.
    Returns (token ids [n, seq_len], number of windows available)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CalibError("the tokenizer has no EOS token to join documents with")
    stream: list[int] = []
    for text in docs:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    available = len(stream) // seq_len
    if available == 0:
        raise CalibError(
            f"the data has {plural(len(stream), 'token')}, fewer than one sequence of --seq-len {seq_len}",
            hint="add data or lower --seq-len (it must stay above the model's index_topk)",
        )
    picks = sorted(random.Random(seed).sample(range(available), min(num_samples, available)))
    ids = torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in picks], dtype=torch.long)
    return ids, available


def tokens_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""What every benchmark shares: where results go, reading calibration tokens, loading a model, and the
settings each benchmark process makes first."""

from __future__ import annotations

import json
import os
from pathlib import Path

OUT = Path("outputs/bench")


def _save(name: str, data) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tokens(model_spec: str, data: str, seq_len: int, samples: int, seed: int = 0):
    from transformers import AutoTokenizer

    from indexcache_calib.data import pack, read_documents
    from indexcache_calib.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model_spec).location, local_files_only=True)
    return pack(read_documents(data, tok).texts, tok, seq_len, samples, seed)[0]


def _load(model_spec: str, device_map: str = "cpu"):
    from indexcache_calib.model import load_with_layout

    return load_with_layout(model_spec, device_map=device_map)


def quiet(threads: int) -> None:
    """What every benchmark process sets first: offline, `threads` torch threads, no library chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

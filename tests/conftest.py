"""Fixtures: tiny random DSA checkpoints saved to disk (so the real `from_pretrained` path runs) and
small calibration files."""

import json
import random

import pytest
import torch

from indexcache_calib.testing import save_tiny

SEQ_LEN = 48
TOPK = 8

# Tiny matrices: one thread avoids OpenMP spin-waiting, which dominates at this size.
torch.set_num_threads(1)


def one_error_line(result):
    """The CLI's contract for bad input: `Error:` first, only `Error:`/`Hint:` lines, no traceback."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert all(l.startswith(("Error: ", "Hint: ")) for l in lines), lines
    return lines[0]


@pytest.fixture(scope="session")
def glm_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("glm"), "glm", layers=6)


@pytest.fixture(scope="session")
def dsv32_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("dsv32"), "dsv32", layers=6)


def write_docs(path, n=40, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 8))) for _ in range(30)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("data") / "docs.jsonl")

"""Small fixes from the newcomer list: the license as an SPDX expression, and counts of one read in the
singular ("1 step", not "1 steps") in the messages and reports of distill, dsa-convert, paper_table and
training_evidence."""

import re
import tomllib
import warnings
from pathlib import Path

import pytest
from test_commands import MODEL, SOURCE, models, workspace  # noqa: F401 - fixtures
from typer.testing import CliRunner

from indexcache_calib.errors import plural

ROOT = Path(__file__).resolve().parents[1]
# A count of one with a plural noun: "1 steps", "1 Full layers", "(1 sequences".
ONE_PLURAL = re.compile(r"(?<![\d.,/x])\b1 (?:Full |held-out )?(steps|sequences|layers|heads|patterns|keys|weights)\b")


def test_license_is_an_spdx_expression():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"
    # A string license is PEP 639, which setuptools reads from 77 on: older ones refuse the build.
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = next(Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.99") and setuptools.specifier.contains("77.0")


def test_plural():
    assert plural(1, "step") == "1 step"
    assert plural(0, "step") == "0 steps"
    assert plural(3, "Full layer") == "3 Full layers"
    assert plural(1, "query", "queries") == "1 query" and plural(2, "query", "queries") == "2 queries"


def _singular(text: str) -> None:
    found = [text[max(0, m.start() - 60):m.end() + 20] for m in ONE_PLURAL.finditer(text)]
    assert not found, found


def test_training_evidence_says_1_head_1_step_1_sequence(workspace, capsys):
    from indexcache_calib import training_evidence

    rc = training_evidence.main(["--source", SOURCE, "--model", MODEL, "--seq-len", "32", "--batch-size", "1",
                                 "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8", "--convert-steps", "1",
                                 "--distill-steps", "1", "--calibration-samples", "2", "--heldout-samples", "1",
                                 "--no-distill-mixed", "--no-distill-searched"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "1 head of 8; held-out: 1 sequence of 32 tokens" in out.out
    assert "Warm-up: 1 step of 1 x 32 tokens" in out.out and ", 1 step of 1 x 32 tokens" in out.out
    assert "[calibrate] greedy search down to 1 Full layer on code.jsonl" in out.err  # 4 layers, --every 4
    _singular(out.out)
    _singular("\n".join(l for l in out.err.splitlines() if l.startswith("[calibrate] greedy")))


def test_paper_table_says_1_sequence(workspace, capsys):
    from indexcache_calib import paper_table

    for d in ("code", "docs"):  # one held-out document of 40 characters: one sequence of 32 tokens
        (workspace / "calibration_data" / f"{d}.heldout.jsonl").write_text('{"text": "' + "abcd efgh " * 4 + '"}\n')
    rc = paper_table.main(["--model", MODEL, "--seq-len", "32", "--num-samples", "2", "--heldout-samples", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "warning: code.heldout.jsonl fills only 1 sequence of 32 tokens" in out.err
    assert re.search(r"scoring \d+ patterns on code held-out", out.err)
    # calibrate's own "the data fills only 1 sequences" (calibrate.py) is not paper_table's message.
    _singular(out.out + "\n".join(l for l in out.err.splitlines() if re.match(r"(warning: \S+\.heldout\.jsonl|scoring )", l)))


def test_distill_and_dsa_convert_say_1_step(workspace):
    from indexcache_calib.cli import app

    data = str(workspace / "calibration_data" / "code.jsonl")
    r = CliRunner().invoke(app, ["distill", "--model", MODEL, "--data", data, "--out", "distilled", "--uniform", "2",
                                 "--steps", "1", "--seq-len", "32", "--eval-data", data, "--eval-samples", "1"])
    assert r.exit_code == 0, r.stderr
    assert "training: 1 step, mean L_multi" in r.stdout
    card = (workspace / "distilled" / "MODEL_CARD.md").read_text()
    assert "- 1 step of 1 x 32 tokens" in card and "(1 sequence of 32 tokens" in card
    _singular(r.stdout + card)

    r = CliRunner().invoke(app, ["dsa-convert", "--model", SOURCE, "--data", data, "--out", "converted", "--steps", "1",
                                 "--seq-len", "32", "--index-topk", "8", "--index-heads", "1", "--index-head-dim", "8"])
    assert r.exit_code == 0, r.stderr
    assert "indexer warm-up: 1 step, mean KL" in r.stdout and "2 layers, every layer Full" in r.stdout
    _singular(r.stdout)


@pytest.mark.parametrize("n,expected", [(1, "1 layer with indexer weights"), (3, "3 layers with indexer weights")])
def test_distill_uniform_origin_counts_layers(n, expected):
    from indexcache_calib.distill import DistillOptions, read_pattern

    # The last layer ships no indexer: --uniform interleaves over the other n.
    opts = DistillOptions(model="m", data="d", out="o", uniform=1)
    pattern, origin = read_pattern(opts, n + 1, frozenset({n}))
    assert pattern == "F" * n + "S"
    assert origin.endswith(expected)

"""`indexcache overlap`, `indexcache evaluate` and the calibration plots, on tiny models."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import one_error_line
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP, SCHEMA, TOKENS
from indexcache_calib.cli import app
from indexcache_calib.plots import LOSS_PLOT, PATTERN_PLOT, calibration_plots

runner = CliRunner()
SMALL = ["--seq-len", "48", "--num-samples", "3", "--batch-size", "3"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_overlap_matrix_is_symmetric_with_ones_on_the_diagonal(glm_dir, text_data, tmp_path):
    out = tmp_path / "ov"
    r = invoke("overlap", "--model", glm_dir, "--data", text_data, "--out", out, *SMALL, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    m = np.array(result["matrix"], dtype=float)
    assert m.shape == (6, 6) and result["layers"] == list(range(6))
    assert np.array_equal(m, m.T)
    assert np.allclose(np.diag(m), 1.0)
    assert ((m >= 0) & (m <= 1)).all()
    assert result["mean_adjacent"] == pytest.approx(np.mean([m[i, i + 1] for i in range(5)]))
    assert result["min"] == m.min()
    csv = pd.read_csv(out / "overlap.csv", index_col="layer")
    assert np.allclose(csv.to_numpy(), m, atol=1e-6) and list(csv.columns) == [str(i) for i in range(6)]
    assert_png(out / "overlap.png")


def test_layers_without_an_indexer_get_nan_rows_and_chunking_changes_nothing(tmp_path):
    from indexcache_calib.diagnostics import overlap_matrix
    from indexcache_calib.model import load_with_layout
    from indexcache_calib.testing import save_tiny

    torch.manual_seed(0)
    save_tiny(tmp_path, "glm", 5, indexer_types=["full", "shared", "full", "full", "shared"])
    model, layout = load_with_layout(str(tmp_path))
    assert layout.fixed_shared == frozenset({1, 4})
    ids = torch.randint(3, model.config.vocab_size, (3, 40))
    m = overlap_matrix(model, layout, ids, batch_size=2)
    assert np.isnan(m[[1, 4]]).all() and np.isnan(m[:, [1, 4]]).all()
    kept = m[np.ix_([0, 2, 3], [0, 2, 3])]
    assert np.isfinite(kept).all() and np.allclose(np.diag(kept), 1.0)
    chunked = overlap_matrix(model, layout, ids, batch_size=1, chunk=7)
    assert np.array_equal(np.nan_to_num(m, nan=-1), np.nan_to_num(chunked, nan=-1))


def test_evaluate_reproduces_the_calibration_losses_and_plots_are_written(glm_dir, text_data, tmp_path):
    run = tmp_path / "run"
    r = invoke("calibrate", "--model", glm_dir, "--data", text_data, "--num-full", "2", "--out", run, *SMALL)
    assert r.exit_code == 0, r.stderr
    lm = json.loads((run / LAYER_MAP).read_text())
    for name in (LOSS_PLOT, PATTERN_PLOT):
        assert_png(run / name)

    csv = tmp_path / "rows.csv"
    r = invoke("evaluate", "--model", glm_dir, "--tokens", run / TOKENS, "--layer-map", run, "--pattern", "FSFSSS",
               "--batch-size", "3", "--out", csv, "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert list(rows) == ["all-F", "uniform 1/2", "uniform 1/4", "uniform 1/8", "run", "pattern 1"]
    assert abs(rows["all-F"]["loss"] - lm["loss"]["all_full"]) < 1e-9
    assert abs(rows["run"]["loss"] - lm["loss"]["final"]) < 1e-9 and rows["run"]["pattern"] == lm["pattern"]
    for ratio, u in lm["uniform"].items():
        assert abs(rows[f"uniform {ratio}"]["loss"] - u["loss"]) < 1e-9
    assert rows["all-F"]["delta"] == 0 and rows["all-F"]["mean_overlap"] is None
    assert rows["pattern 1"]["num_full"] == 2 and 0 <= rows["pattern 1"]["mean_overlap"] <= 1
    assert rows["uniform 1/4"]["delta"] == pytest.approx(rows["uniform 1/4"]["loss"] - rows["all-F"]["loss"])
    table = pd.read_csv(csv)
    assert table["name"].tolist() == list(rows) and np.allclose(table["loss"], [x["loss"] for x in rows.values()])


def test_evaluate_prints_a_table_on_held_out_data(glm_dir, text_data, tmp_path):
    held_out = tmp_path / "held.jsonl"
    from conftest import write_docs

    write_docs(held_out, seed=1)
    r = invoke("evaluate", "--model", glm_dir, "--data", held_out, "--uniform", "2", "--pattern", "FFSSSS", *SMALL, "--no-overlap")
    assert r.exit_code == 0, r.stderr
    assert "all-F" in r.stdout and "uniform 1/2" in r.stdout and "pattern 1: FFSSSS" in r.stdout
    assert "uniform 1/4" not in r.stdout


@pytest.mark.parametrize("args,expect", [
    (["--pattern", "FSS"], "--pattern 'FSS' is invalid: pattern has 3 layers, the model has 6"),
    (["--pattern", "SFFFFF"], "layer 0 must be 'F'"),
    (["--pattern", "FSXSSS"], "may only contain 'F' and 'S'"),
    (["--uniform", "2,x"], "cannot read --uniform"),
    (["--uniform", "1"], "cannot read --uniform"),
    (["--layer-map", "missing.json"], "cannot read layer map"),
    (["--layer-map", "short.json"], "does not fit this model: pattern has 4 layers, the model has 6"),
    (["--out", "nowhere/rows.csv"], "its directory does not exist"),
    (["--tokens", "bad.safetensors"], "give exactly one of --data and --tokens"),
    (["--no-data", "--tokens", "missing.safetensors"], "does not exist"),
    (["--no-data", "--tokens", "bad.safetensors"], "cannot read token file"),
    (["--no-data", "--tokens", "wide.safetensors"], "outside the model's vocabulary of 96"),
    (["--no-data"], "give exactly one of --data and --tokens"),
])
def test_evaluate_bad_input_gets_one_error_line(args, expect, glm_dir, text_data, tmp_path, monkeypatch):
    from indexcache_calib.artifact import save_tokens

    monkeypatch.chdir(tmp_path)
    short = {"schema": SCHEMA, "pattern": "FSFS", "num_layers": 4, "num_full": 2, "full_layers": [0, 2],
             "indexer_types": [], "target": {}, "loss": {}, "path": [], "engines": {}, "provenance": {}, "environment": {}}
    (tmp_path / "short.json").write_text(json.dumps(short))
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    save_tokens(tmp_path / "wide.safetensors", torch.full((2, 48), 500), {})
    data = [] if "--no-data" in args else ["--data", text_data]
    r = invoke("evaluate", "--model", glm_dir, *data, *[a for a in args if a != "--no-data"], *SMALL)
    assert r.exit_code != 0
    assert expect in one_error_line(r)


def test_overlap_bad_input_gets_one_error_line(glm_dir, text_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("overlap", "--model", glm_dir, "--data", text_data, "--out", blocker / "sub", *SMALL)
    assert r.exit_code == 2 and "cannot write to output directory" in one_error_line(r)
    r = invoke("overlap", "--model", glm_dir, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o", *SMALL)
    assert r.exit_code == 2 and "does not exist" in one_error_line(r)
    assert not (tmp_path / "o").exists()
    r = invoke("overlap", "--model", glm_dir, "--data", text_data, "--seq-len", "8", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not above the model's index_topk" in one_error_line(r)


def _layer_map(pattern="FSSFSF", uniform=True):
    n = len(pattern)
    path = [{"num_full": n - s, "pattern": "F" * (n - s) + "S" * s, "loss": 3.0 + 0.01 * s * s, "step": s} for s in range(n - 2)]
    return {
        "pattern": pattern, "num_layers": n, "num_full": pattern.count("F"), "fixed_shared_layers": [],
        "loss": {"all_full": 3.0, "final": path[-1]["loss"]}, "path": path,
        "uniform": {"1/2": {"pattern": "FSFSFS", "num_full": 3, "loss": 3.2}} if uniform else {},
        "provenance": {"model": "/some/where/tiny-dsa"},
    }


def test_plots_are_byte_stable_and_leave_no_temp_files(tmp_path):
    first = calibration_plots(_layer_map(), tmp_path)
    assert [p.name for p in first] == [LOSS_PLOT, PATTERN_PLOT]
    before = [p.read_bytes() for p in first]
    second = calibration_plots(_layer_map(), tmp_path)
    assert [p.read_bytes() for p in second] == before
    for p in first:
        assert_png(p)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOSS_PLOT, PATTERN_PLOT])
    # Old layer maps without uniform baselines still plot.
    old = tmp_path / "old"
    old.mkdir()
    assert [p.name for p in calibration_plots(_layer_map(uniform=False), old)] == [LOSS_PLOT, PATTERN_PLOT]


def test_loss_plot_marks_undecided_steps(tmp_path):
    from indexcache_calib.plots import loss_plot

    decided, undecided = _layer_map(), _layer_map()
    undecided["path"][2]["decided"] = False
    a, b = loss_plot(decided, tmp_path / "a.png"), loss_plot(undecided, tmp_path / "b.png")
    assert_png(b)
    assert a.read_bytes() != b.read_bytes()
    assert loss_plot(undecided, tmp_path / "c.png").read_bytes() == b.read_bytes()

"""What a long calibration needs, as `--dry-run` predicts it and as a run records it."""

import json

import pytest
from typer.testing import CliRunner

from indexcache_calib.artifact import LAYER_MAP
from indexcache_calib.attention import CHUNK_BYTES
from indexcache_calib.cli import app

runner = CliRunner()


@pytest.mark.parametrize("samples,seq", [(2, 48), (3, 64)])
def test_dry_run_cache_estimate_bounds_what_the_run_records(glm_dir, text_data, tmp_path, samples, seq):
    args = ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", str(seq), "--num-samples",
            str(samples), "--target", "1/3", "--out", str(tmp_path / "run"), "--no-plots"]
    r = runner.invoke(app, args + ["--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["attention"] == "sparse"
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    recorded = json.loads((tmp_path / "run" / LAYER_MAP).read_text())["environment"]["work"]["peak_cache_bytes"]
    # The same three parts counted the same way: an upper bound the run comes close to.
    assert recorded <= plan["activation_cache"] <= 1.35 * recorded


def test_dry_run_names_the_attention_path_and_its_mask(glm_dir, text_data):
    base = ["calibrate", "--model", str(glm_dir), "--data", str(text_data), "--seq-len", "2048", "--dry-run", "--json"]
    sparse = json.loads(runner.invoke(app, base).stdout)
    dense = json.loads(runner.invoke(app, base + ["--attention", "dense"]).stdout)
    assert (sparse["attention"], dense["attention"]) == ("sparse", "dense")
    assert dense["attention_mask_per_batch"] == 2048 * 2048 * 4  # fp32 tiny model: the [1, 1, S, T] mask
    assert sparse["attention_mask_per_batch"] <= CHUNK_BYTES
    text = runner.invoke(app, base[:-1]).stdout
    assert "top-k gathered per query chunk" in text.replace("\n", " ")


def test_dry_run_builds_no_weights_on_the_host(tmp_path):
    """A config whose one layer's stacked experts (34 GB in fp32) would not fit this host: `--dry-run` plans it
    from the config alone, all on the meta device (DeepSeek-V4-Pro's are as large in bf16)."""
    from indexcache_calib.testing import tiny_config

    tiny_config("deepseek_v4", layers=4, n_routed_experts=2**23).save_pretrained(tmp_path / "m")
    (tmp_path / "data.txt").write_text("x\n")
    r = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt"),
                            "--seq-len", "64", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["weights_total"] > 3 * 2**35


@pytest.mark.parametrize("name,layers,positions,topk", [("deepseek_v4_flash", 43, 21, 512), ("deepseek_v4_pro", 61, 30, 1024)])
def test_the_plans_deepseek_v4_configs_have_their_published_layers(name, layers, positions, topk):
    """`bench_long plan --config`: 43 and 61 layers, of which the compressed-sparse ones (the pattern positions)
    are every other layer from layer 2."""
    from indexcache_calib.evidence.bench_long import PLAN_CONFIGS
    from indexcache_calib.families import family_of

    config = PLAN_CONFIGS[name][1]()
    family = family_of(config)
    assert family.name == "deepseek_v4" and config.num_hidden_layers == layers and config.index_topk == topk
    assert family.positions(config) == list(range(2, layers, 2))
    assert len(family.positions(config)) == positions

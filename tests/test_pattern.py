from fractions import Fraction

import pytest

from indexcache_calib.errors import CalibError
from indexcache_calib.families import BY_MODEL_TYPE, min_full_shared_follows_full, shared_follows_full_layer
from indexcache_calib.pattern import (
    check_pattern, full_layers, indexer_types, parse_ratio, resolve_num_full, source_layers, uniform_pattern,
)

PAPER_30B_QUARTER = "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"


def test_sources_point_at_nearest_preceding_full_layer():
    assert source_layers("FSSFSF") == [0, 0, 0, 3, 3, 5]


def test_uniform_interleaving():
    assert uniform_pattern(8, 2) == "FSFSFSFS"
    assert uniform_pattern(8, 4) == "FSSSFSSS"
    assert uniform_pattern(5, 4, fixed_shared=frozenset({4})) == "FSSSS"


@pytest.mark.parametrize("spec,value", [("1/4", Fraction(1, 4)), ("0.25", Fraction(1, 4)), ("25%", Fraction(1, 4)), ("1", 1)])
def test_parse_ratio(spec, value):
    assert parse_ratio(spec) == value


@pytest.mark.parametrize("spec", ["0", "-1/4", "5/4", "abc", "1/0"])
def test_parse_ratio_refuses(spec):
    with pytest.raises(CalibError):
        parse_ratio(spec)


def test_num_full_rounds_up_like_the_paper():
    assert resolve_num_full(47, "1/4", None) == PAPER_30B_QUARTER.count("F") == 12
    assert resolve_num_full(16, None, 4) == 4


@pytest.mark.parametrize("target,num_full", [(None, 0), (None, 17), ("1/4", 3), (None, None)])
def test_impossible_targets(target, num_full):
    with pytest.raises(CalibError):
        resolve_num_full(16, target, num_full)


def test_target_counts_fixed_shared_layers():
    with pytest.raises(CalibError, match="without indexer weights"):
        resolve_num_full(8, None, 8, fixed_shared=frozenset({3}))


def test_check_pattern_lists_every_problem():
    problems = check_pattern("SFX", num_layers=4, fixed_shared=frozenset({1}))
    assert len(problems) == 4
    assert check_pattern(PAPER_30B_QUARTER, 47) == []


def test_engine_overrides_carry_indexer_types_and_use_index_cache():
    from indexcache_calib.deploy import engine_args, engine_keys

    glm = BY_MODEL_TYPE["glm_moe_dsa"]
    assert engine_keys(glm, "FSF", [0, 1, 2], 3, "vllm") == {
        "index_topk_pattern": "FSF", "indexer_types": ["full", "shared", "full"], "use_index_cache": True}
    assert "use_index_cache" not in engine_keys(glm, "FSF", [0, 1, 2], 3, "trtllm")
    assert engine_args(glm, "FSF", [0, 1, 2], 3)["vllm"]["args"].startswith("--hf-overrides '{")
    assert engine_args(BY_MODEL_TYPE["dots3_note"], "FSF", [0, 1, 5], 6) == {}  # no engine reads dots3 patterns


def test_positions_map_pattern_characters_to_decoder_layers():
    positions = [0, 1, 5, 9]
    assert full_layers("FSFS", positions) == [0, 5]
    assert source_layers("FSSF", positions) == [0, 0, 0, 9]
    # Layers with no indexer by architecture read "full" (the library's default) and never share.
    assert indexer_types("FSSF", positions, 10) == ["full", "shared", "full", "full", "full", "shared", "full", "full", "full", "full"]


def test_shared_must_follow_a_full_layer_directly_where_the_library_says_so():
    positions = [0, 1, 3, 4, 5]  # layer 2 has no indexer
    assert shared_follows_full_layer("FSFSF", positions) is None
    assert "S after S" in shared_follows_full_layer("FSSFF", [0, 1, 2, 3, 4])
    assert "layer 2 before it has no indexer" in shared_follows_full_layer("FFSFF", positions)
    # Runs of adjacent indexed layers: [0, 1] and [3, 4, 5] need 1 + 2 Full.
    assert min_full_shared_follows_full(positions, frozenset()) == 3
    assert min_full_shared_follows_full([3, 7, 11], frozenset()) == 3  # GLM-5.3-Flash's layout: nothing can share
    with pytest.raises(CalibError, match="fewer than 3"):
        resolve_num_full(5, None, 2, fewest=3)

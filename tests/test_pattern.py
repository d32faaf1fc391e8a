from fractions import Fraction

import pytest

from indexcache_calib.errors import CalibError
from indexcache_calib.pattern import (
    check_pattern, engine_args, engine_overrides, parse_ratio, resolve_num_full, source_layers, uniform_pattern,
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


def test_engine_overrides_carry_indexer_types_too():
    o = engine_overrides("FSF")
    assert o == {"index_topk_pattern": "FSF", "indexer_types": ["full", "shared", "full"]}
    assert engine_args("FSF")["vllm"]["args"].startswith("--hf-overrides '{")

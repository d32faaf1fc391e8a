"""The embedded default model: it loads through the CLI's own path, is a DSA model, and is trained."""

import math

import pytest

from indexcache_calib.calibrate import Hooks, Options, prepare
from indexcache_calib.runner import PatternRunner


@pytest.fixture(scope="module")
def prepared():
    opts = Options(model="tiny-dsa", data="calibration_data/code.heldout.jsonl", seq_len=256, num_samples=2, target="1/4")
    return prepare(opts, Hooks())


def test_alias_loads_the_shipped_checkpoint_as_a_dsa_model(prepared):
    assert type(prepared.model).__name__ == "GlmMoeDsaForCausalLM"
    assert prepared.source.is_local and prepared.source.location.endswith("models/tiny-dsa")
    layout = prepared.layout
    assert layout.num_layers == 16 and layout.budget == 64
    assert all(ix is not None for ix in layout.indexers) and not layout.fixed_shared
    assert tuple(prepared.ids.shape) == (2, 256)


def test_the_model_is_trained_and_its_indexers_matter(prepared):
    runner = PatternRunner(prepared.model, prepared.layout, prepared.ids, batch_size=2, cache_device="none")
    all_full = runner.score("F" * 16).loss
    # Far below the loss of a uniform guess over the vocabulary: the model has learned the data.
    assert all_full < 0.6 * math.log(prepared.model.config.vocab_size)
    # Sharing every layer's top-k from layer 0 costs loss: the indexers are not interchangeable.
    assert runner.score("F" + "S" * 15).loss > all_full + 0.05


def test_shipped_data_is_long_enough_for_the_demo():
    from transformers import AutoTokenizer

    from indexcache_calib.data import pack, read_documents
    from indexcache_calib.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve("tiny-dsa").location)
    for domain in ("code", "docs"):
        _, available = pack(read_documents(f"calibration_data/{domain}.jsonl", tok).texts, tok, 512, 8, 0)
        assert available >= 8

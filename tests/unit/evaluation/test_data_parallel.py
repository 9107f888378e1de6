"""The DP split of the evaluators, in one process: the block split, and ``reduce`` over any
number of simulated ranks' partial states equals the whole-set call exactly. The real DP=2
collective: tests/multirank/test_evaluation_parallel.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from convert_testlib import tiny_hf_model

from genlip_megatron.evaluation.data_parallel import block_indices, evaluate_spread
from genlip_megatron.evaluation.suite import build_suite

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("n,block,world", [(10, 3, 2), (10, 3, 3), (7, 4, 5), (16, 16, 2),
                                           (0, 2, 2)])
def test_blocks_partition_the_items_in_single_process_batches(n, block, world):
    shares = [block_indices(n, block, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))       # each item once
    for r, share in enumerate(shares):
        for start in range(0, len(share), block):                      # whole DP=1 batches
            chunk = share[start:start + block]
            assert chunk[0] % block == 0 and (chunk[0] // block) % world == r
            assert chunk == list(range(chunk[0], min(chunk[0] + block, n)))


def test_block_split_refuses_bad_arguments():
    with pytest.raises(ValueError, match="block"):
        block_indices(4, 0, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        block_indices(4, 2, 2, 2)


@pytest.fixture(scope="module")
def suite_and_model(tmp_path_factory):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from training_helpers import TINY_CONFIG, make_tiny_data, tiny_overrides

    from genlip_megatron.config import load_config
    from genlip_megatron.data.tokenizer import load_tokenizer

    root = make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    data = load_config(TINY_CONFIG, tiny_overrides(root)).data
    suite = build_suite(data, load_tokenizer(data.text.tokenizer_path), max_samples=10,
                        max_new_tokens=4, batch_size=3, demo_tasks=True,
                        probe_train_samples=40, sink_samples=7)
    model = tiny_hf_model()
    return suite, model, [ev(model) for ev in suite.evaluators]


@pytest.mark.parametrize("world", [2, 5])
def test_reduce_of_simulated_ranks_equals_the_whole_call(suite_and_model, world):
    suite, model, wholes = suite_and_model
    assert [ev.name for ev in suite.evaluators] == ["caption", "zeroshot", "probe", "seg",
                                                     "sink"]
    for ev, whole in zip(suite.evaluators, wholes):
        states = [ev.partial(model, block_indices(ev.num_items, ev.batch_size, r, world))
                  for r in range(world)]
        assert ev.reduce(states[::-1]) == whole, ev.name     # rank order does not matter
        with pytest.raises(ValueError):
            ev.reduce(states[:1])                            # a missing rank is an error


def test_plain_callable_evaluator_runs_whole_without_a_group(suite_and_model):
    _, model, _ = suite_and_model
    seen = []

    def plain(m):
        seen.append(m)
        return {"plain/x": 1.0}

    assert evaluate_spread(plain, model) == {"plain/x": 1.0} and seen == [model]


def test_probe_blocks_are_whole_encoder_batches_of_one_split(suite_and_model):
    """Train images at 0..39, test images from 64 (the next multiple of the batch, 32): each
    block a rank encodes is exactly one batch a single process encodes."""
    suite, model, _ = suite_and_model
    features = suite.evaluators[2].features
    assert suite.evaluators[3].features is features
    assert (len(features.train), features.test_start, features.num_items) == (40, 64, 74)
    share = block_indices(features.num_items, features.batch_size, 1, 2)
    assert share == list(range(32, 64))                 # rank 1 of 2: train images 32..39
    state = features.partial(model, share)
    assert [(first, len(feats)) for first, feats in state["blocks"]] == [(32, 8)]
    assert features.partial(model, share) is state      # the second probe reuses it

"""Held-out micro-batches: fixed, file-ordered, and the same global set for any DP size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training_helpers import make_tiny_data


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    from genlip_megatron.config import load_config
    from training_helpers import TINY_CONFIG, tiny_overrides

    root = make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
    return load_config(TINY_CONFIG, tiny_overrides(Path(root))).data


def _sample(length: int, key: str):
    import numpy as np

    from genlip_megatron.data.sample import ProcessedSample

    ids = np.zeros(length - 1, np.int32)
    return ProcessedSample(0, key, "u", 0, ids, ids, (1, 1), (8, 8))


def test_next_fit_keeps_file_order_and_never_overflows():
    from genlip_megatron.data.heldout import pack_next_fit

    samples = [_sample(n, str(i)) for i, n in enumerate([5, 4, 3, 9, 1, 10, 2])]
    rows = pack_next_fit(samples, capacity=10)
    assert [[s.key for s in row] for row in rows] == [["0", "1"], ["2"], ["3", "4"], ["5"], ["6"]]
    assert all(sum(s.length for s in row) <= 10 for row in rows)


def test_dp_shares_concatenate_to_the_single_rank_batches(data_cfg):
    from genlip_megatron.data.heldout import build_held_out_batches

    one = build_held_out_batches(data_cfg, micro_batch_size=1, microbatches_per_rank=2,
                                 iters=2, dp_rank=0, dp_size=1)
    shares = [build_held_out_batches(data_cfg, micro_batch_size=1, microbatches_per_rank=1,
                                     iters=2, dp_rank=d, dp_size=2) for d in range(2)]
    assert len(one.iterations) == 2 and one.rows_total == 4 == shares[0].rows_total
    for it in range(2):
        single = [b.tokens for b in one.iterations[it]]
        split = [shares[d].iterations[it][0].tokens for d in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(single, split))
        for a, b in zip(one.iterations[it], [s.iterations[it][0] for s in shares]):
            assert torch.equal(a.pixel_values, b.pixel_values)
            assert torch.equal(a.labels, b.labels)
    # labels are real captions, not padding only
    assert all(int((b.labels >= 0).sum()) > 0 for b in one.iterations[0])


def test_rebuilding_gives_identical_batches(data_cfg):
    from genlip_megatron.data.heldout import build_held_out_batches

    a, b = (build_held_out_batches(data_cfg, micro_batch_size=2, microbatches_per_rank=1,
                                   iters=1, dp_rank=0, dp_size=1) for _ in range(2))
    assert torch.equal(a.iterations[0][0].tokens, b.iterations[0][0].tokens)
    assert torch.equal(a.iterations[0][0].pixel_values, b.iterations[0][0].pixel_values)


def test_a_small_held_out_set_gives_fewer_iterations(data_cfg):
    from genlip_megatron.data.heldout import build_held_out_batches

    held = build_held_out_batches(data_cfg, micro_batch_size=2, microbatches_per_rank=1,
                                  iters=1000, dp_rank=0, dp_size=1)
    assert 1 <= len(held.iterations) < 1000
    rows = sum(b.tokens.shape[0] for it in held.iterations for b in it)
    assert rows == held.rows_total


def test_empty_eval_sources_is_a_clear_error(data_cfg):
    import dataclasses

    from genlip_megatron.data.heldout import build_held_out_batches

    with pytest.raises(ValueError, match="data.eval_sources is empty"):
        build_held_out_batches(dataclasses.replace(data_cfg, eval_sources=[]),
                               micro_batch_size=1, microbatches_per_rank=1, iters=1,
                               dp_rank=0, dp_size=1)

"""Generative zero-shot: KV-cache scores equal the recomputed-prefix scores and a naive
full-sequence log-likelihood; batching does not change them; classes are template means."""

from __future__ import annotations

import pytest
import torch
from convert_testlib import random_patch_images, tiny_hf_model

from genlip_megatron.evaluation.zeroshot import ZeroShotTask, classify, score_candidates, \
    zero_shot_accuracy

PROMPT = [5, 9, 11]
CANDIDATES = [[7], [3, 8, 2], [4, 4, 12, 6, 1], [30, 2]]


@pytest.fixture(scope="module")
def images():
    return random_patch_images([(2, 3), (4, 4), (1, 5)])


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model()


def _naive_score(model, px, grid, cand) -> float:
    """Mean log P(cand_t | ...) from one unpadded full sequence, positions built by the model."""
    gh, gw = grid
    n = gh * gw
    x = torch.zeros(1, n + len(PROMPT) + len(cand), dtype=torch.long)
    x[0, n:] = torch.tensor(PROMPT + cand)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, :n] = True
    logits = model(input_ids=x, pixel_values=px, image_mask=mask,
                   image_grid_thw=torch.tensor([[1, gh, gw]])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    start = n + len(PROMPT) - 1
    return sum(float(logp[start + t, c]) for t, c in enumerate(cand)) / len(cand)


def test_cached_scores_equal_recomputed_and_naive(model, images):
    cached = score_candidates(model, images, PROMPT, CANDIDATES, use_cache=True)
    recomputed = score_candidates(model, images, PROMPT, CANDIDATES, use_cache=False)
    assert cached.shape == (3, 4)
    assert torch.allclose(cached, recomputed, atol=1e-5), (cached - recomputed).abs().max()
    for i, (px, grid) in enumerate(images):
        for k, cand in enumerate(CANDIDATES):
            assert cached[i, k].item() == pytest.approx(_naive_score(model, px, grid, cand),
                                                        abs=1e-5)
    # scores differ between candidates (the test would pass on a constant otherwise)
    assert cached.std() > 0.05


def test_batching_does_not_change_scores(model, images):
    ref = score_candidates(model, images, PROMPT, CANDIDATES)
    for kw in ({"image_batch": 1}, {"rows_per_pass": 3}, {"image_batch": 2, "rows_per_pass": 1}):
        for cache in (True, False):
            got = score_candidates(model, images, PROMPT, CANDIDATES, use_cache=cache, **kw)
            assert torch.allclose(got, ref, atol=1e-5), kw


def test_classify_averages_templates_per_class():
    task = ZeroShotTask(["a", "b"], ["{}", "the {}"], [[1], [2], [3], [4]])
    # image 0: class b wins on the mean (0.5 > 0.45) though class a has the best single template
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5], [0.1, 0.1, 0.0, 0.0]])
    assert classify(scores, task).tolist() == [1, 0]


def test_accuracy_and_errors(model, images):
    task = ZeroShotTask(["x", "y"], ["{}"], [[7], [3, 8, 2]])
    scores = score_candidates(model, images, PROMPT, task.candidates)
    labels = scores.argmax(1).tolist()
    acc, pred = zero_shot_accuracy(model, images, labels, PROMPT, task)
    assert acc == 1.0 and pred.tolist() == labels
    acc, _ = zero_shot_accuracy(model, images, [1 - v for v in labels], PROMPT, task)
    assert acc == 0.0
    with pytest.raises(ValueError, match="one label per image"):
        zero_shot_accuracy(model, images, labels[:1], PROMPT, task)
    with pytest.raises(ValueError, match="non-empty"):
        score_candidates(model, images, PROMPT, [[1], []])


def test_packed_continuations_layout():
    from genlip_megatron.evaluation.zeroshot import packed_continuations, padded_ids

    ids, valid = padded_ids(CANDIDATES, "cpu")
    feed, target, segment, offset = packed_continuations(ids, valid)
    # [7] feeds nothing; [3, 8, 2] feeds 3, 8; [4, 4, 12, 6, 1] feeds 4 tokens; [30, 2] one
    assert feed.tolist() == [3, 8, 4, 4, 12, 6, 30]
    assert target.tolist() == [8, 2, 4, 12, 6, 1, 2]
    assert segment.tolist() == [1, 1, 2, 2, 2, 2, 3]
    assert offset.tolist() == [0, 1, 0, 1, 2, 3, 0]


def test_packed_decoding_needs_positions_and_branches_leave_the_prefix(model, images):
    from genlip_megatron.probes.generation import prefix_batch

    ids, img, attn, pos, pixels, _ = prefix_batch(images[:1], PROMPT, torch.float32, "cpu")
    cache = model(input_ids=ids, pixel_values=pixels, image_mask=img, position_ids=pos,
                  attention_mask=attn, use_cache=True).past_key_values
    before = cache.get_seq_length()
    feed = torch.tensor([[3, 8, 4]])
    with pytest.raises(ValueError, match="position_ids are required with segment_ids"):
        model(input_ids=feed, past_key_values=cache.branch(), segment_ids=torch.tensor([[0, 0, 1]]),
              attention_mask=torch.ones(1, before + 3, dtype=torch.long))
    branch = cache.branch()
    model(input_ids=feed, past_key_values=branch, segment_ids=torch.tensor([[0, 0, 1]]),
          position_ids=torch.tensor([[10, 11, 10]])[:, None].expand(-1, 3, -1),
          attention_mask=torch.ones(1, before + 3, dtype=torch.long), use_cache=True)
    assert branch.get_seq_length() == before + 3
    assert cache.get_seq_length() == before   # a branch leaves the prefix cache as it was

"""Attention-sink mass of the suite (evaluation/attention_sink.py): exact on a model whose
attention is uniform, independent of batching/padding, gated or not."""

from __future__ import annotations

import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict

from genlip_megatron.evaluation.attention_sink import AttentionSinkEvaluator, \
    attention_sink_mass
from genlip_megatron.probes.loading import build_hf_model


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from test_suite import load_tiny_set

    return load_tiny_set(tmp_path_factory)


def _uniform(model):
    """Zero keys: every allowed key gets the same score, so softmax is uniform."""
    for layer in model.visual.layers:
        layer.self_attn.k_proj.weight.data.zero_()
        layer.self_attn.k_proj.bias.data.zero_()
    return model


def test_uniform_attention_gives_one_over_the_allowed_keys(tiny_set):
    samples, tok = tiny_set
    model = _uniform(build_hf_model(TINY, random_hf_state_dict(TINY, seed=1)))
    per_layer = attention_sink_mass(model, samples[:3], tok, batch_size=2)
    # by hand: an image query sees the N image tokens (bidirectional), text query t (0-based
    # after the image) sees N + t + 1 keys (prefix-LM); the sink is one of them
    want_sum = want_n = 0.0
    for s in samples[:3]:
        n = s.grid[0] * s.grid[1]
        text = len(s.prompt_ids) + len(tok.encode(s.caption.strip())) + len(tok.end_ids)
        want_sum += n * (1 / n) + sum(1 / (n + t + 1) for t in range(text))
        want_n += n + text
    assert per_layer == pytest.approx([want_sum / want_n] * len(per_layer), rel=1e-5)


def test_batching_and_padding_do_not_change_the_mass(tiny_set):
    samples, tok = tiny_set
    model = build_hf_model(TINY, random_hf_state_dict(TINY, seed=2, scale=0.5))
    one = AttentionSinkEvaluator(samples[:5], tok, batch_size=1)(model)
    five = AttentionSinkEvaluator(samples[:5], tok, batch_size=5)(model)
    assert one.keys() == five.keys() and len(one) == TINY.num_layers + 1
    assert all(one[k] == pytest.approx(five[k], abs=1e-6) for k in one)
    assert 0.0 < one["sink/mass_mean"] < 1.0

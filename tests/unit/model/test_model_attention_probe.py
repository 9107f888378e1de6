"""Attention-sink probe: sink positions and the mass computation, against direct math."""

from __future__ import annotations

import math

import torch

from genlip_megatron.model.attention import prefix_lm_allowed
from genlip_megatron.model.attention_probe import first_image_token_index, sink_mass


def test_first_image_token_index_per_sample():
    # row: [img img txt txt | img txt | pad pad], second row: [txt-only sample | img img txt]
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, -1, -1], [0, 0, 1, 1, 1, -1, -1, -1]])
    img = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert first_image_token_index(seg, img).tolist() == [
        [0, 0, 0, 0, 4, 4, -1, -1], [-1, -1, 2, 2, 2, -1, -1, -1]]


def test_sink_mass_matches_a_direct_softmax():
    torch.manual_seed(0)
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    img = torch.tensor([[1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    S, B, H, D = 6, 1, 2, 4
    q, k = torch.randn(S, B, H, D), torch.randn(S, B, H, D)
    allowed = prefix_lm_allowed(seg, img)
    sink = first_image_token_index(seg, img)
    total, count = sink_mass(q, k, allowed, sink)
    expected, n = 0.0, 0
    for h in range(H):
        for i in range(S):
            if sink[0, i] < 0:
                continue
            keys = [j for j in range(S) if allowed[0, i, j]]
            scores = [float(q[i, 0, h] @ k[j, 0, h]) / math.sqrt(D) for j in keys]
            z = sum(math.exp(s) for s in scores)
            expected += math.exp(scores[keys.index(int(sink[0, i]))]) / z
            n += 1
    assert count == n == 2 * 5
    assert abs(total - expected) < 1e-5

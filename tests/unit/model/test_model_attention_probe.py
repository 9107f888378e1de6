"""Attention-sink probe: sink positions and the mass computation, against direct math."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    total, count = sink_mass(q, k, seg, img, sink, chunk=4)  # 2 chunks: 4 + 2 queries
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


def test_allowed_rows_equal_the_full_mask_rows():
    from genlip_megatron.model.attention_probe import _allowed_rows

    seg = torch.tensor([[0, 0, 0, 1, 1, -1, 2, 2]])
    img = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    full = prefix_lm_allowed(seg, img)
    for start, stop in ((0, 3), (3, 8), (5, 6)):
        assert torch.equal(_allowed_rows(seg, img, start, stop), full[:, start:stop])


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (a proxy for peak working memory)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sink_mass_memory_is_linear_in_the_row_length():
    # A full 16384-token row used to materialise fp32 [1, 16, S, S] scores (17 GiB); now
    # every intermediate is at most [B, heads, chunk, S].
    torch.manual_seed(0)
    S, B, H, D, chunk = 512, 1, 2, 8, 64
    seg = torch.zeros(1, S, dtype=torch.long)
    seg[0, 300:] = 1
    img = torch.zeros(1, S, dtype=torch.bool)
    img[0, :200] = True
    img[0, 300:400] = True
    q, k = torch.randn(S, B, H, D), torch.randn(S, B, H, D)
    sink = first_image_token_index(seg, img)
    with _LargestTensor() as probe:
        total, count = sink_mass(q, k, seg, img, sink, chunk=chunk)
    assert probe.largest <= B * H * chunk * S
    # Same value as one chunk covering every query (the old dense computation, whose
    # [B, heads, S, S] scores the bound above rules out).
    with _LargestTensor() as dense_probe:
        dense_total, dense_count = sink_mass(q, k, seg, img, sink, chunk=S)
    assert dense_probe.largest >= B * H * S * S > B * H * chunk * S
    assert count == dense_count and abs(total - dense_total) < 1e-6 * max(1.0, dense_total)

"""The analytic FLOP count against a brute-force mask count and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch

from genlip_megatron.training.flops import FlopDims, attention_pairs, forward_flops, \
    peak_flops_per_device, training_flops


def brute_force_pairs(n_img: int, n_txt: int) -> int:
    allowed = 0
    for q in range(n_img + n_txt):
        for k in range(n_img + n_txt):
            if q < n_img:
                allowed += k < n_img             # image sees its image only
            else:
                allowed += k <= q                # text: causal over the whole sample
    return allowed


def test_attention_pairs_equal_the_prefix_mask():
    for n_img, n_txt in [(0, 5), (4, 0), (196, 37), (16, 1), (7, 9)]:
        assert attention_pairs(n_img, n_txt) == brute_force_pairs(n_img, n_txt)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "no_gate"])
def test_linear_flops_match_torch_flop_counter(gated):
    """One block's linears and the head, counted by torch on real matmuls (the fused qkv has
    4H rows with the attention gate, 3H without: model.gated_attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    dims = FlopDims(hidden=32, ffn=48, layers=1, text_dim=24, vocab=50, patch_dim=12,
                    gated_attention=gated)
    n_img, n_txt = 6, 5
    n = n_img + n_txt
    h, f, t, v = dims.hidden, dims.ffn, dims.text_dim, dims.vocab
    weights = [torch.randn((4 if gated else 3) * h, h), torch.randn(h, h), torch.randn(2 * f, h),
               torch.randn(h, f)]
    with FlopCounterMode(display=False) as counter:
        for w in weights:
            torch.randn(n, w.shape[1]) @ w.T
        torch.randn(n_img, dims.patch_dim) @ torch.randn(h, dims.patch_dim).T   # patch embed
        torch.randn(n_txt, t) @ torch.randn(h, t).T                             # in_proj
        torch.randn(n_txt, h) @ torch.randn(t, h).T                             # proj
        torch.randn(n_txt, t) @ torch.randn(v, t).T                             # lm head
    counted = counter.get_total_flops()
    attention = 4 * h * attention_pairs(n_img, n_txt)
    assert forward_flops(dims, [n_img], [n_txt]) == counted + attention
    assert training_flops(dims, [n_img], [n_txt]) == 3 * (counted + attention)


def test_head_tokens_and_text_width():
    dims = FlopDims(hidden=16, ffn=32, layers=2, text_dim=16, vocab=10, patch_dim=4)
    full = forward_flops(dims, [4], [6])
    fewer = forward_flops(dims, [4], [6], head_tokens=2)
    assert full - fewer == 2 * 4 * 16 * 10       # 4 fewer positions through the LM head
    # T == H: no in_proj/proj FLOPs
    assert forward_flops(dims, [0], [1], head_tokens=0) == 2 * 2 * (5 * 256 + 3 * 16 * 32) + \
        2 * 4 * 16 * 1


def test_peak_flops():
    assert peak_flops_per_device(312.0) == 312e12
    if not torch.cuda.is_available():
        assert peak_flops_per_device() is None

"""Interleaved MRoPE: channel assignment, angles against hand-computed values, application."""

from __future__ import annotations

import math

import pytest
import torch

from genlip_megatron.model import rope

T, H, W = 0, 1, 2


def test_channel_map_hand_cases():
    # tiny preset: head 16 → 8 channels, sections (2, 3, 3): H at 1,4,7; W at 2,5; T at 0,3,6.
    assert rope.mrope_channel_map(16, (2, 3, 3)).tolist() == [T, H, W, T, H, W, T, H]
    # caps: H only below 3·2 = 6 (1, 4), W only below 3·1 = 3 (2); the rest is T.
    assert rope.mrope_channel_map(24, (4, 2, 1)).tolist() == [T, H, W, T, H] + [T] * 7


@pytest.mark.parametrize("head_dim, sections, counts", [
    (72, (8, 12, 12), (12, 12, 12)),    # L/16: section[0] is never used
    (72, (12, 12, 12), (12, 12, 12)),   # So/16
    (96, (16, 16, 16), (16, 16, 16)),   # g/16
])
def test_channel_counts_of_presets(head_dim, sections, counts):
    axis = rope.mrope_channel_map(head_dim, sections)
    assert tuple(int((axis == a).sum()) for a in (T, H, W)) == counts


def test_angles_and_cos_sin_hand_computed():
    # one token at (t, h, w) = (5, 2, 3); head_dim 8, theta 100, sections (1, 1, 1):
    # channel 0 → T, 1 → H, 2 → W, 3 → T (both caps are 3).
    pos = torch.tensor([[[5], [2], [3]]])
    inv = [100 ** (-2 * i / 8) for i in range(4)]
    angles = [5 * inv[0], 2 * inv[1], 3 * inv[2], 5 * inv[3]]
    freqs = rope.mrope_freqs(pos, 8, (1, 1, 1), 100.0)
    assert freqs.shape == (1, 1, 1, 8) and freqs.dtype == torch.float32
    torch.testing.assert_close(freqs[0, 0, 0], torch.tensor(angles * 2), rtol=1e-6, atol=0)
    cos, sin = rope.mrope_cos_sin(pos, 8, (1, 1, 1), 100.0)
    torch.testing.assert_close(cos[0, 0], torch.tensor([math.cos(a) for a in angles] * 2))
    torch.testing.assert_close(sin[0, 0], torch.tensor([math.sin(a) for a in angles] * 2))


def test_text_positions_reduce_to_1d_rope():
    """Text tokens have t = h = w, so every channel sees the same position (plain 1D RoPE)."""
    p = torch.arange(14, 30)
    pos = p.view(1, 1, -1).expand(1, 3, -1)
    freqs = rope.mrope_freqs(pos, 72, (8, 12, 12), 1e4)[:, 0, 0]        # [S, 72]
    inv = 1.0 / (1e4 ** (torch.arange(0, 72, 2).float() / 72))
    expected = torch.outer(p.float(), inv)
    torch.testing.assert_close(freqs, torch.cat([expected, expected], -1))


def test_image_positions_are_2d():
    """Image patches (0, r, c): T channels rotate by 0, H by the row, W by the column."""
    pos = torch.tensor([[[0, 0], [4, 4], [1, 6]]])                        # two patches
    freqs = rope.mrope_freqs(pos, 16, (2, 3, 3), 1e4)[:, 0, 0, :8]
    axis = rope.mrope_channel_map(16, (2, 3, 3))
    assert torch.all(freqs[:, axis == T] == 0)
    assert torch.equal(freqs[0, axis == H], freqs[1, axis == H])           # same row
    assert not torch.equal(freqs[0, axis == W], freqs[1, axis == W])       # other column


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_application_equals_neox_formula(dtype):
    """megatron's unfused rotary on our angles = x·cos + rotate_half(x)·sin, cos/sin from fp32."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 40, (2, 3, 10), generator=gen)
    freqs = rope.mrope_freqs(pos, 16, (2, 3, 3), 1e4)                     # [S, B, 1, 16]
    x = torch.randn(10, 2, 4, 16, generator=gen).to(dtype)
    ours = _apply_rotary_pos_emb_bshd(x, freqs, rotary_interleaved=False)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    x1, x2 = x[..., :8], x[..., 8:]
    expected = x * cos + torch.cat([-x2, x1], -1) * sin
    assert torch.equal(ours, expected)
    assert torch.equal(rope.apply_rope(x, freqs), expected)


def test_bad_position_ids_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, S\]"):
        rope.mrope_freqs(torch.zeros(3, 5, dtype=torch.long), 16, (2, 3, 3), 1e4)

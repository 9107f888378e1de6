"""The ``multi_tensor`` group: megatron's Apex-less multi_tensor_scale without temporaries."""

from __future__ import annotations

import torch

from genlip_megatron.compat import cpu_compat_disabled
from genlip_megatron.compat.multi_tensor import foreach_multi_tensor_scale


def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    total = float(torch.stack([g.norm() for g in grads]).norm())
    clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=total)


def test_clipping_scales_in_place_and_equals_upstream():
    """Same values as megatron's fallback; the gradient storage is written in place (the
    upstream fallback writes there too, but through a temporary of each gradient's size)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 32, generator=gen), torch.randn(17, generator=gen)]
    ours, upstream = [g.clone() for g in grads], [g.clone() for g in grads]
    pointers = [g.data_ptr() for g in ours]
    _clip(ours, max_norm=0.5)
    with cpu_compat_disabled("multi_tensor"):
        from megatron.core.optimizer import clip_grads
        from megatron.core.utils import local_multi_tensor_scale

        assert clip_grads.multi_tensor_scale_impl is local_multi_tensor_scale
        _clip(upstream, max_norm=0.5)
    for a, b, g in zip(ours, upstream, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.norm() < g.norm()          # clipping happened
    assert [g.data_ptr() for g in ours] == pointers


def test_separate_destinations_and_mixed_dtypes():
    src = [torch.arange(6.0), torch.arange(4.0).bfloat16()]
    dst = [torch.zeros(6), torch.zeros(4)]
    foreach_multi_tensor_scale(2048, None, [src, dst], 2.0)
    torch.testing.assert_close(dst[0], torch.arange(6.0) * 2)
    torch.testing.assert_close(dst[1], torch.arange(4.0) * 2)
    assert dst[1].dtype == torch.float32
    foreach_multi_tensor_scale(2048, None, [[], []], 2.0)   # nothing to scale: no error

"""Chunked vocab-parallel linear + CE (model/lm_loss.py) over TP = world size equals TP = 1.

Every rank holds its ``[V/tp, T]`` row shard of the head; loss, input gradient and its weight
shard's gradient must equal the single-rank full-logits computation every rank also runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from genlip_megatron.model.lm_loss import chunked_linear_cross_entropy


@pytest.mark.parametrize("block_rows", [3, 52])     # several blocks per shard; one
def test_tp_sharded_vocab_equals_single_rank(block_rows):
    tp, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(7)
    n, t, v = 29, 16, 52 * tp
    hidden = (torch.randn(n, t, generator=gen) * 0.3).requires_grad_()
    weight = torch.randn(v, t, generator=gen)
    target = torch.randint(0, v, (n,), generator=gen)
    grad_out = torch.rand(n, generator=gen)

    full_w = weight.clone().requires_grad_()
    want = F.cross_entropy(hidden @ full_w.t(), target, reduction="none")
    (want * grad_out).sum().backward()
    want_dh, want_dw = hidden.grad.clone(), full_w.grad.chunk(tp)[rank]
    hidden.grad = None

    shard = weight.chunk(tp)[rank].clone().requires_grad_()
    got = chunked_linear_cross_entropy(hidden, shard, target, dist.group.WORLD,
                                       chunk_logits=block_rows * n)
    (got * grad_out).sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want_dh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shard.grad, want_dw, rtol=1e-6, atol=1e-6)
    # The same loss on every rank (the all-reduced softmax, not a rank-local one).
    gathered = [torch.empty_like(got) for _ in range(tp)]
    dist.all_gather(gathered, got.detach())
    assert all(torch.equal(g, gathered[0]) for g in gathered)

"""Chunked linear + cross-entropy (model/lm_loss.py) against the full-logits oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genlip_megatron.model.lm_loss import chunked_linear_cross_entropy, vocab_block_size


def _inputs(n=37, t=24, v=301, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, t, generator=gen) * 0.3).to(dtype).requires_grad_()
    weight = torch.randn(v, t, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, target


def _full(hidden, weight, target, grad_out):
    """Oracle: every logit at once, torch's own cross-entropy."""
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits, target, reduction="none")
    (loss * grad_out).sum().backward()
    return loss.detach()


def _megatron_full(hidden, weight, target, grad_out):
    """Oracle of the model's "full" head: all logits, megatron's vocab-parallel CE."""
    from megatron.core import tensor_parallel

    logits = (hidden @ weight.t())[:, None]                     # [N, 1, V]
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, target[:, None])[:, 0]
    (loss * grad_out).sum().backward()
    return loss.detach()


# chunk_logits / N = vocabulary rows per block: 1, 7, 300 (one short of V), all of V
@pytest.mark.parametrize("chunk_logits", [37, 7 * 37, 300 * 37, 10 ** 6])
def test_loss_and_grads_equal_full_logits_fp32(chunk_logits, mp_state):
    hidden, weight, target = _inputs()
    grad_out = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    want = _megatron_full(hidden, weight, target, grad_out)
    want_dh, want_dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=chunk_logits)
    (got * grad_out).sum().backward()
    assert got.dtype == torch.float32 and got.shape == target.shape
    assert (got - want).abs().max() <= 1e-6
    assert (hidden.grad - want_dh).abs().max() <= 1e-6
    assert (weight.grad - want_dw).abs().max() <= 1e-6
    if chunk_logits >= 301 * 37:   # one block: megatron's weight gradient to the bit
        assert torch.equal(weight.grad, want_dw)
    # and torch's own cross-entropy agrees
    hidden.grad = weight.grad = None
    torch.testing.assert_close(got.detach(), _full(hidden, weight, target, grad_out),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, want_dw, rtol=1e-5, atol=1e-6)


def test_block_size_follows_the_logits_budget():
    assert vocab_block_size(4096, 151936, 2 ** 24) == 4096         # 64 MiB of fp32 logits
    assert vocab_block_size(4096, 151936 // 2, 2 ** 24) == 4096    # TP = 2: same block
    assert vocab_block_size(10, 256, 2 ** 24) == 256               # small: one block
    assert vocab_block_size(10 ** 9, 256, 2 ** 24) == 1
    assert vocab_block_size(0, 256, 2 ** 24) == 256


def test_bf16_weights_give_bf16_grads_close_to_fp32():
    hidden, weight, target = _inputs(dtype=torch.bfloat16)
    got = chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=37 * 50)
    got.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    want = _full(h32, w32, target, torch.ones(target.shape))
    assert (got - want).abs().max() < 0.05     # bf16 logits: rounding only
    torch.testing.assert_close(weight.grad.float(), w32.grad, atol=0.02, rtol=0.02)


def test_extreme_logits_stay_finite_and_exact():
    hidden, weight, target = _inputs(n=6, v=50)
    with torch.no_grad():
        hidden.mul_(1e3)                       # logits ~ 1e3: exp would overflow without the max
    got = chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=6 * 4)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(weight.grad).all()
    logits = (hidden @ weight.t()).detach()
    torch.testing.assert_close(got.detach(), F.cross_entropy(logits, target, reduction="none"),
                               rtol=1e-5, atol=0)           # losses ~ 1e3


def test_no_label_positions_give_empty_loss_and_zero_grads():
    hidden, weight, target = _inputs(n=0)
    got = chunked_linear_cross_entropy(hidden, weight, target)
    got.sum().backward()
    assert got.shape == (0,) and torch.count_nonzero(weight.grad) == 0


def test_bad_arguments_are_refused():
    hidden, weight, target = _inputs(n=4)
    with pytest.raises(ValueError, match="loss_chunk_logits"):
        chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=0)
    with pytest.raises(ValueError, match="expects hidden"):
        chunked_linear_cross_entropy(hidden[None], weight, target)


def test_fused_wgrad_goes_into_main_grad_like_megatron():
    """With gradient_accumulation_fusion the weight gradient lands in DDP's main_grad."""
    from genlip_megatron.compat.wgrad import cpu_wgrad_accumulation_ready

    if not cpu_wgrad_accumulation_ready():
        pytest.skip("CPU wgrad stand-in not installed (apply_cpu_compat)")
    hidden, weight, target = _inputs()
    chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=37 * 20).sum().backward()
    want = weight.grad.clone()
    weight.grad = None
    weight.main_grad = torch.full(weight.shape, 0.5)            # earlier micro-batches
    weight.grad_added_to_main_grad = False
    chunked_linear_cross_entropy(hidden, weight, target, chunk_logits=37 * 20,
                                 fuse_wgrad=True).sum().backward()
    assert weight.grad_added_to_main_grad
    torch.testing.assert_close(weight.main_grad, want + 0.5, rtol=1e-6, atol=1e-6)


def test_model_chunked_loss_equals_full_logits_loss(mp_state, make_config):
    """The model's default head (chunked) equals its full-logits oracle, loss and grads."""
    from reference_genlip import make_packed_batch

    from genlip_megatron.model.genlip import GenLIPMegatronModel

    batch = make_packed_batch([[(2, 3, 7), (3, 3, 5)], [(4, 2, 9), (2, 2, 12)]], 48, 256, seed=0)
    args = (batch["tokens"], batch["position_ids"], batch["image_mask"],
            batch["segment_ids"], batch["pixel_values"])
    count = (batch["labels"] != -100).sum()
    out = {}
    for impl in ("chunked", "full"):   # blocks of 7 vocabulary rows: 37 blocks
        model = GenLIPMegatronModel(make_config(loss_impl=impl, loss_chunk_logits=7 * int(count)))
        per_token = model(*args, labels=batch["labels"])
        (per_token.sum() / count).backward()                  # as the trainer normalises
        out[impl] = per_token.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert model.config.loss_impl == "full"
    assert (out["chunked"][0] - out["full"][0]).abs().max() <= 1e-6
    assert torch.count_nonzero(out["chunked"][0][batch["labels"] == -100]) == 0
    for name, grad in out["full"][1].items():
        assert (out["chunked"][1][name] - grad).abs().max() <= 1e-6, name


def test_config_refuses_bad_loss_settings():
    from genlip_megatron.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="model.loss_chunk_logits"):
        config_from_dict({"model": {"loss_chunk_logits": 0}}).validate(has_cuda=False,
                                                                       has_te=False)
    with pytest.raises(ConfigError, match="loss_impl"):
        config_from_dict({"model": {"loss_impl": "fused"}})


def test_planner_block_matches_the_loss():
    from genlip_megatron.model.lm_loss import CHUNK_LOGITS
    from genlip_megatron.training import planner

    assert planner.CHUNK_LOGITS == CHUNK_LOGITS

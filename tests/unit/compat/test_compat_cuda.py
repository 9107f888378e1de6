"""Each CUDA stand-in group: megatron-core fails without it on CPU and works with it."""

from __future__ import annotations

import pytest
import torch

from genlip_megatron.compat import GROUPS, _STATE, apply_cpu_compat, apply_torch_adam_fixes, \
    cpu_compat_applied, cpu_compat_disabled

# On a CPU-only torch build these raise AssertionError("Torch not compiled with CUDA enabled")
# or RuntimeError, depending on the call.
CUDA_ERRORS = (AssertionError, RuntimeError, TypeError)


def test_apply_is_idempotent_and_reports_cpu(gloo_world):
    before = {name: len(_STATE[name]._saved) for name in GROUPS}
    assert apply_cpu_compat() is True
    assert {name: len(_STATE[name]._saved) for name in GROUPS} == before
    assert torch.cuda.is_available() is False       # code that asks still sees a CPU machine
    assert cpu_compat_applied()
    apply_torch_adam_fixes()                        # the GPU-without-TE entry point: idempotent
    assert {name: len(_STATE[name]._saved) for name in GROUPS} == before


def test_apply_is_a_noop_when_cuda_is_available(gloo_world, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = {name: list(_STATE[name]._saved) for name in GROUPS}
    assert apply_cpu_compat() is False
    assert {name: list(_STATE[name]._saved) for name in GROUPS} == before


def test_unknown_group_name_is_refused(gloo_world):
    with pytest.raises(ValueError, match="unknown compat group"):
        with cpu_compat_disabled("no_such_group"):
            pass


def test_device_group(mp_state):
    from megatron.core import parallel_state

    with cpu_compat_disabled("device"):
        with pytest.raises(CUDA_ERRORS):
            torch.cuda.current_device()
    buf = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (2, 3)


def test_rng_group_tracker_forks_cpu_generator(gloo_world):
    from megatron.core import tensor_parallel

    with cpu_compat_disabled("rng"):
        with pytest.raises(CUDA_ERRORS):
            tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_state = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_state)   # fork restored the default state
    with tracker.fork():
        inside_again = torch.rand(4)
    assert not torch.equal(inside, inside_again)               # the tracker state advanced
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    with tracker.fork():
        assert torch.equal(torch.rand(4), inside)              # reseeding reproduces it
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=1, ep_rank=0, etp_rank=0)
    with tracker.fork():
        assert not torch.equal(torch.rand(4), inside)          # per-TP-rank streams differ


def test_rng_group_silences_the_cpu_fork_false_alarm_only(gloo_world, caplog, monkeypatch):
    """On CPU the forked state is the CPU generator: a draw inside fork() is not a bug, but
    megatron's CudaRNGStatesTracker.fork() warns about it on every call."""
    import logging

    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    log = logging.getLogger("megatron.core.tensor_parallel.random")
    with caplog.at_level(logging.WARNING, logger=log.name):
        with tracker.fork():
            torch.rand(4)
        assert "CPU RNG state changed" not in caplog.text
        log.warning("another warning")                             # other warnings still pass
        assert "another warning" in caplog.text
        monkeypatch.setattr(log, "filters", [])                    # without the compat filter
        with tracker.fork():
            torch.rand(4)
        assert "CPU RNG state changed within GPU RNG context" in caplog.text


def test_rng_group_recompute_replays_dropout(gloo_world):
    """megatron's CheckpointFunction saves/restores the (CPU) RNG: same masks on recompute."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0)
    x = torch.randn(64, 8, requires_grad=True)

    def block(t):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(t * 2, p=0.5, training=True)

    state = torch.get_rng_state()
    out = tensor_parallel.checkpoint(block, False, x)
    out.sum().backward()
    grad_recompute = x.grad.clone()
    x.grad = None
    torch.set_rng_state(state)
    tensor_parallel.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0)
    ref = block(x)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(grad_recompute, x.grad)


def test_sync_group(gloo_world):
    with cpu_compat_disabled("sync"):
        with pytest.raises(CUDA_ERRORS):
            torch.cuda.synchronize()
    assert torch.cuda.synchronize() is None


def test_streams_group(gloo_world):
    with cpu_compat_disabled("streams"):
        with pytest.raises(CUDA_ERRORS):
            torch.cuda.current_stream()
        with pytest.raises(CUDA_ERRORS):
            torch.cuda.Stream()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        event = torch.cuda.current_stream().record_event()
    event.wait()
    assert event.query() and stream.query()
    torch.cuda.default_stream().wait_stream(stream)


def test_literals_group(gloo_world):
    from megatron.core.transformer import utils

    with cpu_compat_disabled("literals"):
        with pytest.raises(CUDA_ERRORS):
            utils.get_default_causal_mask(3)
        with pytest.raises(CUDA_ERRORS):
            torch.ones(2).cuda()
    mask = utils.get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    t = torch.ones(2)
    assert t.cuda() is t
    assert utils.torch.ones(2).device.type == "cpu"       # proxy forwards everything else
    assert utils.torch.Tensor is torch.Tensor


def test_type_strings_group_is_scoped(gloo_world):
    from megatron.core.optimizer import clip_grads

    def params_with_grads():
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 3.0)
        return [p]

    with cpu_compat_disabled("type_strings"):
        with pytest.raises(AssertionError):   # assert param.grad.type() == 'torch.cuda...'
            clip_grads.clip_grad_by_total_norm_fp32(params_with_grads(), 1.0, 6.0)
    params = params_with_grads()
    clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, 6.0)      # clips by 1/6
    torch.testing.assert_close(params[0].grad, torch.full((4,), 0.5), rtol=1e-5, atol=1e-6)
    assert torch.ones(1).type() == "torch.FloatTensor"              # no lie outside
    # The optimizer module imported the function by name: it is wrapped there too.
    from megatron.core.optimizer import optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32

"""DistributedOptimizer with torch Adam (no Apex/TE): the three resume bugs of ``adam_step``.

1. a never-stepped optimizer cannot build its sharded state dict for loading;
2. loading a ``fully_reshardable`` checkpoint fails on the missing per-param ``step``;
3. after a load all params share ONE ``step`` tensor, which then advances once per param.
With the group, a resumed run continues bit-exactly like the uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch

from genlip_megatron.compat import cpu_compat_disabled

METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_and_optimizer():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config=config)
            self.a = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.ones_)
            self.b = ColumnParallelLinear(8, 4, config=config, init_method=torch.nn.init.ones_)

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), Tiny())
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model])
    return model, opt


def _step(model, opt):
    model.zero_grad_buffer()
    opt.zero_grad()
    model(torch.ones(3, 2, 8)).square().sum().backward()
    model.finish_grad_sync()
    opt.step()


def _adam_states(opt):
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    return inner.optimizer.state.values()


def _save(tmp_path, model, opt):
    from megatron.core import dist_checkpointing

    model_sd = model.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd,
                             "optimizer": opt.sharded_state_dict(model_sd, metadata=METADATA)},
                            str(tmp_path))


def _load(tmp_path, model, opt):
    from megatron.core import dist_checkpointing

    model_sd = model.module.sharded_state_dict()
    sharded = {"model": model_sd, "optimizer": opt.sharded_state_dict(
        model_sd, is_loading=True, metadata=METADATA)}
    state = dist_checkpointing.load(sharded, str(tmp_path))
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def _steps(opt):
    return [s["step"] for s in _adam_states(opt)]


def test_fresh_optimizer_can_build_its_loading_state_dict(mp_state):
    model, opt = _model_and_optimizer()
    with cpu_compat_disabled("adam_step"):
        with pytest.raises((AssertionError, KeyError)):
            opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                   metadata=METADATA)
    opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=METADATA)
    _step(model, opt)                         # the pre-allocated state is Adam's own init
    assert all(float(s) == 1.0 for s in _steps(opt))


def test_load_state_dict_gives_each_param_its_own_step(mp_state):
    model, opt = _model_and_optimizer()
    _step(model, opt)
    _step(model, opt)
    with cpu_compat_disabled("adam_step"):
        opt.load_state_dict(opt.state_dict())
        assert len({id(s) for s in _steps(opt)}) == 1          # upstream: one shared tensor
        _step(model, opt)
        n_params = len(_steps(opt))
        assert float(_steps(opt)[0]) == 2.0 + n_params         # advanced once per param
    model, opt = _model_and_optimizer()
    _step(model, opt)
    _step(model, opt)
    opt.load_state_dict(opt.state_dict())
    steps = _steps(opt)
    assert len(steps) >= 2 and len({id(s) for s in steps}) == len(steps)
    _step(model, opt)
    assert all(float(s) == 3.0 for s in _steps(opt))


def test_resume_from_fully_reshardable_checkpoint(mp_state, tmp_path):
    model, opt = _model_and_optimizer()
    _step(model, opt)
    _step(model, opt)
    _save(tmp_path, model, opt)

    model2, opt2 = _model_and_optimizer()
    _step(model2, opt2)                        # has step states, so upstream gets past bug 1
    with cpu_compat_disabled("adam_step"):
        with pytest.raises((KeyError, TypeError)):
            _load(tmp_path, model2, opt2)

    model3, opt3 = _model_and_optimizer()
    _load(tmp_path, model3, opt3)
    steps = _steps(opt3)
    assert len({id(s) for s in steps}) == len(steps) and all(float(s) == 2.0 for s in steps)
    _step(model3, opt3)
    assert all(float(s) == 3.0 for s in _steps(opt3))
    _step(model, opt)                          # the uninterrupted run
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


def test_build_optimizer_applies_the_fixes_when_cpu_compat_is_off(mp_state):
    # A GPU run never applies the CPU compat, yet megatron still falls back to torch AdamW when
    # neither TE nor Apex provides FusedAdam: build_optimizer must apply adam_step itself.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from genlip_megatron.compat.optimizer import megatron_uses_torch_adam
    from genlip_megatron.config import ParallelConfig, PrecisionConfig
    from genlip_megatron.config.training import OptimizerConfig
    from genlip_megatron.training.parallel import build_optimizer

    assert megatron_uses_torch_adam()  # no TE/Apex in this environment
    model, _ = _model_and_optimizer()
    with cpu_compat_disabled("adam_step"):
        assert not getattr(DistributedOptimizer.load_state_dict, "__genlip_compat__", False)
        opt = build_optimizer([model], OptimizerConfig(), PrecisionConfig(params_dtype="fp32"),
                              ParallelConfig(use_distributed_optimizer=True))
        assert getattr(DistributedOptimizer.load_state_dict, "__genlip_compat__", False)
        # bug 1 of the group is gone: a fresh optimizer builds its loading state dict
        opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=METADATA)

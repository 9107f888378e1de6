"""``Linear``, ``LayerNormLinear``, ``LayerNorm``, ``RMSNorm`` (TE v2.11 ``pytorch/module``).

Tensor parallelism as TE does it: column mode gathers the sequence-parallel input (else copies
it, all-reducing its gradient), row mode all-reduces (or reduce-scatters under sequence
parallelism) the output and adds the bias after the reduction. ``fuse_wgrad_accumulation``
accumulates the weight gradient into ``weight.main_grad`` and hands autograd a dummy gradient
with ``weight.grad_added_to_main_grad = True`` (megatron DDP then skips its own accumulation).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from transformer_engine.common.recipe import MXFP8BlockScaling
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule, \
    assert_dim_for_fp8_exec, get_dummy_wgrad
from transformer_engine.pytorch.quantization import FP8GlobalStateManager


def _tp_attrs(param: torch.Tensor, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _group_size(group: Any, tp_size: int) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1 if group is None else tp_size
    return torch.distributed.get_world_size(group)


class _LinearFn(torch.autograd.Function):
    """y = x Wᵀ, with TE's fused weight-gradient accumulation into ``main_grad``."""

    @staticmethod
    def forward(ctx, inp, weight, fuse_wgrad):
        ctx.save_for_backward(inp, weight)
        ctx.fuse_wgrad = fuse_wgrad
        return F.linear(inp, weight)

    @staticmethod
    def backward(ctx, grad_out):
        inp, weight = ctx.saved_tensors
        dgrad = grad_out @ weight
        wgrad = grad_out.reshape(-1, grad_out.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])
        if ctx.fuse_wgrad and hasattr(weight, "main_grad"):
            weight.main_grad.add_(wgrad.to(weight.main_grad.dtype))
            weight.grad_added_to_main_grad = True
            wgrad = get_dummy_wgrad(list(weight.shape), weight.dtype, zero=True)
        return dgrad, wgrad, None


class _ParallelLinearBase(TransformerEngineBaseModule):
    """Shared weight/bias creation and TP communication of Linear and LayerNormLinear."""

    def _init_linear(self, in_features: int, out_features: int, sequence_parallel: bool,
                     fuse_wgrad_accumulation: bool, tp_group: Any, tp_size: int,
                     get_rng_state_tracker: Optional[Callable], init_method: Optional[Callable],
                     bias: bool, return_bias: bool, params_dtype: Optional[torch.dtype],
                     parallel_mode: Optional[str], device: Union[torch.device, str]) -> None:
        if parallel_mode not in (None, "column", "row"):
            raise AssertionError(f"parallel_mode {parallel_mode} not supported")
        params_dtype = params_dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.parallel_mode = parallel_mode
        self.tp_group = tp_group
        self.tp_size = tp_size if tp_group is None else _group_size(tp_group, tp_size)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        out_local, in_local = out_features, in_features
        if parallel_mode == "column":
            out_local = out_features // self.tp_size
        elif parallel_mode == "row":
            in_local = in_features // self.tp_size
        self.out_features, self.in_features = out_local, in_local
        weight = torch.empty(out_local, in_local, dtype=params_dtype, device=device)
        if init_method is not None:
            if get_rng_state_tracker is not None:
                with get_rng_state_tracker().fork():
                    init_method(weight)
            else:
                init_method(weight)
        self.weight = torch.nn.Parameter(weight)
        if parallel_mode is not None:
            _tp_attrs(self.weight, 0 if parallel_mode == "column" else 1)
        if bias:
            size = out_local
            self.bias = torch.nn.Parameter(torch.zeros(size, dtype=params_dtype, device=device))
            if parallel_mode == "column":
                _tp_attrs(self.bias, 0)
            elif parallel_mode == "row" and self.sequence_parallel:
                self.bias.sequence_parallel = True
        else:
            self.register_parameter("bias", None)

    def _fp8_check(self, x: torch.Tensor) -> None:
        self.init_fp8_metadata()
        if self.fp8:
            recipe = FP8GlobalStateManager.get_fp8_recipe()
            assert_dim_for_fp8_exec(x, self.weight, mxfp8=isinstance(recipe, MXFP8BlockScaling))

    def _input_comm(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings  # same collectives TE issues

        if self.parallel_mode == "column" and self.tp_size > 1:
            if self.sequence_parallel:
                return mappings.gather_from_sequence_parallel_region(x, group=self.tp_group)
            return mappings.copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return x

    def _gemm(self, x: torch.Tensor):
        self._fp8_check(x)
        out = _LinearFn.apply(x, self.weight, self.fuse_wgrad_accumulation)
        if self.parallel_mode == "row" and self.tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            out = (mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
                   if self.sequence_parallel else
                   mappings.reduce_from_tensor_model_parallel_region(out, group=self.tp_group))
        if self.apply_bias:
            out = out + self.bias
        if self.return_bias:
            return out, self.bias
        return out


class Linear(_ParallelLinearBase):
    """y = xAᵀ + b (TE v2.11 signature)."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group: Any = None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None,
                 rng_tracker_name: Optional[str] = None, init_method: Optional[Callable] = None,
                 bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 parameters_split: Any = None, device: Union[torch.device, str] = "cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False,
                 ub_bulk_wgrad: bool = False, ub_name: Optional[str] = None,
                 delay_wgrad_compute: bool = False, symmetric_ar_type: Optional[str] = None,
                 save_original_input: bool = False, name: Optional[str] = None) -> None:
        super().__init__(name)
        if parameters_split is not None:
            raise NotImplementedError("the TE stand-in does not implement parameters_split.")
        self.ub_name = ub_name
        self.save_original_input = save_original_input
        self._init_linear(in_features, out_features, sequence_parallel, fuse_wgrad_accumulation,
                          tp_group, tp_size, get_rng_state_tracker, init_method, bias,
                          return_bias, params_dtype, parallel_mode, device)

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None,
                fp8_output: Optional[bool] = False, fp8_grad: Optional[bool] = False):
        return self._gemm(self._input_comm(inp))


class LayerNormLinear(_ParallelLinearBase):
    """LayerNorm (or RMSNorm) followed by a Linear (TE v2.11 signature)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5,
                 sequence_parallel: bool = False, fuse_wgrad_accumulation: bool = False,
                 tp_group: Any = None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None,
                 init_method: Optional[Callable] = None, bias: bool = True,
                 normalization: str = "LayerNorm", return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 return_layernorm_output: bool = False,
                 return_layernorm_output_gathered: bool = False, parameters_split: Any = None,
                 zero_centered_gamma: bool = False, device: Union[torch.device, str] = "cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_bulk_dgrad: bool = False, ub_name: Optional[str] = None,
                 delay_wgrad_compute: bool = False, symmetric_ar_type: Optional[str] = None,
                 name: str = None) -> None:
        super().__init__(name)
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise AssertionError(f"normalization {normalization} not supported")
        if return_layernorm_output or parameters_split is not None:
            raise NotImplementedError("the TE stand-in does not implement "
                                      "return_layernorm_output / parameters_split.")
        self.eps, self.normalization = eps, normalization
        self.zero_centered_gamma = zero_centered_gamma
        self.ub_name = ub_name
        self._init_linear(in_features, out_features, sequence_parallel, fuse_wgrad_accumulation,
                          tp_group, tp_size, get_rng_state_tracker, init_method, bias,
                          return_bias, params_dtype, parallel_mode, device)
        dtype = params_dtype or torch.get_default_dtype()
        init = 0.0 if zero_centered_gamma else 1.0
        self.layer_norm_weight = torch.nn.Parameter(
            torch.full((in_features,), init, dtype=dtype, device=device))
        self.layer_norm_weight.sequence_parallel = self.sequence_parallel
        if normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(
                torch.zeros(in_features, dtype=dtype, device=device))
            self.layer_norm_bias.sequence_parallel = self.sequence_parallel
        else:
            self.layer_norm_bias = None

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None,
                fp8_output: Optional[bool] = False, fp8_grad: Optional[bool] = False):
        w = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        if self.normalization == "LayerNorm":
            ln = F.layer_norm(inp, (inp.shape[-1],), w, self.layer_norm_bias, self.eps)
        else:
            ln = F.rms_norm(inp, (inp.shape[-1],), w, self.eps)
        return self._gemm(self._input_comm(ln))


class _Norm(torch.nn.Module):
    """TE's ops-based LayerNorm/RMSNorm modules: ``weight`` (+ ``bias``) and ``_extra_state``."""

    kind = "LayerNorm"

    def __init__(self, normalized_shape: Any = None, eps: float = 1e-5,
                 sequence_parallel: Optional[bool] = None,
                 params_dtype: Optional[torch.dtype] = None, zero_centered_gamma: bool = False,
                 hidden_size: Optional[int] = None, device: Any = "cuda", **kwargs: Any) -> None:
        super().__init__()
        size = hidden_size if normalized_shape is None else normalized_shape
        size = (size,) if isinstance(size, int) else tuple(size)
        dtype = params_dtype or torch.get_default_dtype()
        self.normalized_shape, self.eps = size, eps
        self.zero_centered_gamma = zero_centered_gamma
        init = 0.0 if zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full(size, init, dtype=dtype, device=device))
        self.weight.sequence_parallel = bool(sequence_parallel)
        if self.kind == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
            self.bias.sequence_parallel = bool(sequence_parallel)

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        return None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.kind == "LayerNorm":
            return F.layer_norm(inp, self.normalized_shape, w, self.bias, self.eps)
        return F.rms_norm(inp, self.normalized_shape, w, self.eps)


class LayerNorm(_Norm):
    """TE LayerNorm."""

    kind = "LayerNorm"


class RMSNorm(_Norm):
    """TE RMSNorm."""

    kind = "RMSNorm"


class GroupedLinear(TransformerEngineBaseModule):
    """Grouped GEMM for MoE experts: named (megatron subclasses it at import), not implemented."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the TE stand-in does not implement GroupedLinear (MoE).")

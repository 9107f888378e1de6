"""``TransformerEngineBaseModule`` (TE v2.11 ``pytorch/module/base.py``): FP8 metadata and its
``_extra_state`` serialisation, TP group handling, the FP8 GEMM shape assertion."""

from __future__ import annotations

import math
import pickle
from typing import Any, Optional

import torch

from transformer_engine.pytorch.quantization import FP8GlobalStateManager

_DUMMY_WGRADS: dict = {}


def get_dummy_wgrad(shape: list, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """One reusable dummy weight-gradient buffer per (shape, dtype), as in TE."""
    key = (tuple(shape), dtype)
    if key not in _DUMMY_WGRADS:
        _DUMMY_WGRADS[key] = torch.empty(shape, dtype=dtype, requires_grad=False)
    if zero:
        _DUMMY_WGRADS[key].zero_()
    return _DUMMY_WGRADS[key].detach()


def assert_dim_for_fp8_exec(*tensors: torch.Tensor, mxfp8: bool = False) -> None:
    """TE's FP8 GEMM alignment rule (``pytorch/utils.py``): product of leading dims % 8 and
    last dim % 16; MXFP8 (``MXFP8Quantizer.is_quantizable``) needs % 32 for both."""
    lead_mult, last_mult = (32, 32) if mxfp8 else (8, 16)
    for t in tensors:
        lead = math.prod(t.shape[:-1])
        if lead % lead_mult or t.shape[-1] % last_mult:
            raise AssertionError(
                "FP8 execution requires the product of all dimensions except the last to be "
                f"divisible by {lead_mult} and the last dimension to be divisible by {last_mult}, "
                f"but got tensor with dims={list(t.size())}")


class TransformerEngineBaseModule(torch.nn.Module):
    """FP8 metadata, ``get_extra_state``/``set_extra_state``, TP group."""

    def __init__(self, name: Optional[str] = None) -> None:
        super().__init__()
        self.name = name
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_initialized = False
        self.fp8_meta: dict[str, Any] = {"fp8_checkpoint": False, "recipe": None}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False

    # ---- FP8 bookkeeping (TE: init_fp8_metadata in prepare_forward)
    def init_fp8_metadata(self) -> None:
        self.fp8 = FP8GlobalStateManager.is_fp8_enabled()
        self.fp8_calibration = FP8GlobalStateManager.is_fp8_calibration()
        if self.fp8 or self.fp8_calibration:
            self.fp8_meta["fp8_checkpoint"] = True
            self.fp8_meta["recipe"] = FP8GlobalStateManager.get_fp8_recipe()
            self.fp8_initialized = True

    def get_extra_state(self) -> torch.Tensor:
        """Empty uint8 tensor without FP8; else the pickled recipe and scalar metadata."""
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8 or self.fp8_calibration):
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": self.fp8_meta["recipe"],
                 "extra_fp8_variables": {k: v for k, v in self.fp8_meta.items()
                                         if isinstance(v, (bool, int, float, str, tuple, list))}}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if state is None:
            return
        if isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            state = pickle.loads(state.detach().cpu().numpy().tobytes())
        else:
            raise RuntimeError("Unsupported checkpoint format.")
        self.fp8_meta.update(state["extra_fp8_variables"])
        self.fp8_meta["recipe"] = state["recipe"]

    # ---- parallel groups
    def set_tensor_parallel_group(self, tp_group: Any) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def backward_dw(self) -> None:
        """Delayed wgrad compute: the stand-in computes wgrads in backward already."""

"""FP8 recipes (TE v2.11 ``transformer_engine/common/recipe.py``): names and fields only."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Optional


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(Enum):
    """FP8 formats: E4M3 everywhere, E5M2 everywhere, or HYBRID (E4M3 fwd, E5M2 bwd)."""

    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=E4M3.max_fwd, max_bwd=E5M2.max_bwd)


class Recipe:
    """Base class; the predicates mirror TE's."""

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)

    def float8_current_scaling(self) -> bool:
        return isinstance(self, Float8CurrentScaling)

    def mxfp8(self) -> bool:
        return isinstance(self, MXFP8BlockScaling)

    def float8_block_scaling(self) -> bool:
        return isinstance(self, Float8BlockScaling)

    def nvfp4(self) -> bool:
        return isinstance(self, NVFP4BlockScaling)

    def custom(self) -> bool:
        return isinstance(self, CustomRecipe)

    def float8_per_tensor_scaling(self) -> bool:
        return isinstance(self, (DelayedScaling, Float8CurrentScaling))


@dataclass()
class DelayedScaling(Recipe):
    """Scaling factor from an amax history."""

    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    scaling_factor_compute_algo: Optional[Any] = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False
    override_linear_precision: tuple = (False, False, False)


@dataclass()
class Float8CurrentScaling(Recipe):
    """Per-tensor current scaling ("tensorwise")."""

    fp8_format: Format = Format.HYBRID
    fp8_dpa: bool = False
    fp8_mha: bool = False


@dataclass()
class MXFP8BlockScaling(Recipe):
    """MXFP8: E8M0 scales per 32 consecutive values (needs dims divisible by 32)."""

    margin: int = 0
    fp8_format: Format = Format.E4M3
    fp8_dpa: bool = False
    fp8_mha: bool = False


@dataclass()
class Float8BlockScaling(Recipe):
    """Block scaling (1x128 activations, 128x128 weights)."""

    fp8_format: Format = Format.E4M3
    fp8_dpa: bool = False
    fp8_mha: bool = False


@dataclass()
class NVFP4BlockScaling(Recipe):
    """NVFP4 (named only; the stand-in runs it in high precision like the others)."""

    fp4_format: Any = None


@dataclass()
class CustomRecipe(Recipe):
    """User quantizer factory (named only)."""

    qfactory: Any = None

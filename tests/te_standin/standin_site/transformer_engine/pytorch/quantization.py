"""FP8 autocast state (TE v2.11 ``pytorch/quantization.py``): tracked, never applied to numbers."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from transformer_engine.common.recipe import Float8CurrentScaling, Recipe


class FP8GlobalStateManager:
    """Class-level FP8 state, as in TE: enabled flag, recipe, amax group, nesting depth."""

    FP8_ENABLED = False
    FP8_CALIBRATION = False
    FP8_RECIPE: Optional[Recipe] = None
    FP8_DISTRIBUTED_GROUP: Any = None
    FP8_PARAMETERS = False
    IS_FIRST_FP8_MODULE = False
    FP8_AUTOCAST_DEPTH = 0
    autocast_calls = 0
    """Stand-in only: how many times an enabled autocast was entered (tests read it)."""

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def is_fp8_calibration(cls) -> bool:
        return cls.FP8_CALIBRATION

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return cls.FP8_PARAMETERS

    @classmethod
    def get_fp8_recipe(cls) -> Recipe:
        return cls.FP8_RECIPE if cls.FP8_RECIPE is not None else get_default_recipe()

    @classmethod
    def get_fp8_group(cls) -> Any:
        return cls.FP8_DISTRIBUTED_GROUP

    @classmethod
    def is_first_fp8_module(cls) -> bool:
        first, cls.IS_FIRST_FP8_MODULE = cls.IS_FIRST_FP8_MODULE, False
        return first

    @classmethod
    def get_autocast_state(cls) -> tuple:
        return (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE,
                cls.FP8_DISTRIBUTED_GROUP, cls.IS_FIRST_FP8_MODULE)

    @classmethod
    def set_autocast_state(cls, state: tuple) -> None:
        (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP,
         cls.IS_FIRST_FP8_MODULE) = state

    @classmethod
    def reset(cls) -> None:
        cls.set_autocast_state((False, False, None, None, False))
        cls.FP8_AUTOCAST_DEPTH = 0


def get_default_recipe() -> Recipe:
    """TE 2.x default: current scaling on Hopper+ (the stand-in claims sm90)."""
    return Float8CurrentScaling()


def is_fp8_available(return_reason: bool = False):
    """The stand-in accepts FP8 (numerically a no-op)."""
    return (True, "") if return_reason else True


is_mxfp8_available = is_fp8_available
is_fp8_block_scaling_available = is_fp8_available


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False,
                 fp8_recipe: Optional[Recipe] = None, fp8_group: Any = None,
                 _graph: bool = False) -> Iterator[None]:
    """Enter an FP8 region: modules inside see ``FP8GlobalStateManager.is_fp8_enabled()``."""
    saved = FP8GlobalStateManager.get_autocast_state()
    FP8GlobalStateManager.FP8_ENABLED = enabled
    FP8GlobalStateManager.FP8_CALIBRATION = calibrating
    FP8GlobalStateManager.FP8_RECIPE = fp8_recipe if fp8_recipe is not None else \
        get_default_recipe()
    FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = fp8_group
    FP8GlobalStateManager.IS_FIRST_FP8_MODULE = enabled and \
        FP8GlobalStateManager.FP8_AUTOCAST_DEPTH == 0
    FP8GlobalStateManager.FP8_AUTOCAST_DEPTH += 1
    if enabled:
        FP8GlobalStateManager.autocast_calls += 1
    try:
        yield
    finally:
        FP8GlobalStateManager.FP8_AUTOCAST_DEPTH -= 1
        FP8GlobalStateManager.set_autocast_state(saved)


def autocast(enabled: bool = True, calibrating: bool = False, recipe: Optional[Recipe] = None,
             amax_reduction_group: Any = None, _graph: bool = False):
    """TE 2.11's new name of :func:`fp8_autocast`."""
    return fp8_autocast(enabled, calibrating, recipe, amax_reduction_group, _graph)


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True, recipe: Optional[Recipe] = None,
                   preserve_high_precision_init_val: bool = False) -> Iterator[None]:
    """FP8 parameters: tracked only (parameters stay in their dtype)."""
    saved = FP8GlobalStateManager.FP8_PARAMETERS
    FP8GlobalStateManager.FP8_PARAMETERS = enabled
    try:
        yield
    finally:
        FP8GlobalStateManager.FP8_PARAMETERS = saved


quantized_model_init = fp8_model_init

"""FP8 training through NVIDIA Transformer Engine (the GPU branch of ``precision.fp8``).

megatron-core builds the TE recipe itself from ``TransformerConfig`` fields
(``fp8_utils.get_fp8_recipe``/``get_fp8_context``) and wraps each layer in ``fp8_autocast``,
keeping the first/last ``num_layers_at_{start,end}_in_bf16`` layers out of it. So the run only
has to set those fields: :func:`te_transformer_config_kwargs`. :func:`build_te_fp8_recipe` builds
the same recipe object directly, for code outside megatron's layers (custom TE modules, tests).

Without TE or a CUDA GPU both the recipe builder and the config validation refuse with a message
that points to ``precision.fp8.emulate`` (the CPU numerics emulation in
``genlip_megatron.model.fp8_emulation``).

FP8 GEMM shapes: :func:`fp8_gemm_shape_problems` checks a list of shapes against the alignment
rule of ``genlip_megatron.config.precision.fp8_alignment`` (its one home).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from genlip_megatron.compat.te import require_transformer_engine
from genlip_megatron.config.precision import Fp8Config, fp8_alignment

__all__ = ["build_te_fp8_recipe", "fp8_gemm_shape_problems", "te_transformer_config_kwargs"]

_TE_FORMATS = {"e4m3": "E4M3", "hybrid": "HYBRID"}
_TE_RECIPES = {                      # (TE class, first TE release that has it)
    "delayed": ("DelayedScaling", "1.0"),
    "tensorwise": ("Float8CurrentScaling", "2.2"),
    "mxfp8": ("MXFP8BlockScaling", "2.1"),
    "blockwise": ("Float8BlockScaling", "2.3"),
}


def _check_choices(fp8_cfg: Fp8Config) -> None:
    if fp8_cfg.recipe not in _TE_RECIPES:
        raise ValueError(f"precision.fp8.recipe ({fp8_cfg.recipe!r}) must be one of "
                         f"{sorted(_TE_RECIPES)}.")
    if fp8_cfg.format not in _TE_FORMATS:
        raise ValueError(f"precision.fp8.format ({fp8_cfg.format!r}) must be one of "
                         f"{sorted(_TE_FORMATS)}.")


def build_te_fp8_recipe(fp8_cfg: Fp8Config):
    """The Transformer Engine recipe object for ``precision.fp8``.

    Args:
        fp8_cfg: the ``precision.fp8`` section.

    Returns:
        ``transformer_engine.common.recipe.DelayedScaling`` (delayed: margin, amax history length
        and algorithm from the config), ``Float8CurrentScaling`` (tensorwise),
        ``MXFP8BlockScaling`` (mxfp8) or ``Float8BlockScaling`` (blockwise), each with
        ``Format.E4M3`` or ``Format.HYBRID``.

    Raises:
        RuntimeError: TE or a CUDA GPU is missing, or the installed TE lacks the recipe.
        ValueError: unknown recipe or format.
    """
    _check_choices(fp8_cfg)
    try:
        require_transformer_engine(f"precision.fp8 (recipe {fp8_cfg.recipe!r})")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} To study FP8 numerics without TE/GPU, set "
                           "precision.fp8.emulate: true (CPU emulation, not a speed-up).") from None
    from transformer_engine.common import recipe as te_recipe  # lazy: TE needs CUDA

    cls_name, min_version = _TE_RECIPES[fp8_cfg.recipe]
    cls = getattr(te_recipe, cls_name, None)
    if cls is None:
        raise RuntimeError(f"precision.fp8.recipe {fp8_cfg.recipe!r} needs transformer_engine "
                           f">= {min_version} ({cls_name}); upgrade TE or pick another recipe.")
    fmt = getattr(te_recipe.Format, _TE_FORMATS[fp8_cfg.format])
    if fp8_cfg.recipe == "delayed":
        return cls(margin=fp8_cfg.margin, fp8_format=fmt,
                   amax_history_len=fp8_cfg.amax_history_len,
                   amax_compute_algo=fp8_cfg.amax_compute_algo)
    return cls(fp8_format=fmt)


def te_transformer_config_kwargs(fp8_cfg: Fp8Config) -> dict:
    """megatron-core ``TransformerConfig`` fields that turn on TE FP8 for ``precision.fp8``.

    Field names as in megatron-core 0.16.1 ``transformer/transformer_config.py`` (unchanged at
    0.20). megatron reads ``fp8_margin``/``fp8_amax_*`` only for the delayed recipe
    (``TEDelayedScaling``); current-scaling and block recipes take only the format.

    Args:
        fp8_cfg: the ``precision.fp8`` section, with ``emulate: false``.

    Returns:
        Keyword arguments for ``TransformerConfig(...)``.

    Raises:
        ValueError: the section asks for the emulation, an unknown recipe/format, or the delayed
            recipe with BF16 first/last layers (megatron refuses that combination).
    """
    _check_choices(fp8_cfg)
    if fp8_cfg.emulate:
        raise ValueError("precision.fp8.emulate is true: the emulated layers are configured by "
                         "genlip_megatron.model.fp8_emulation.emulation_config_kwargs, and "
                         "TransformerConfig.fp8 must stay None.")
    if fp8_cfg.recipe == "delayed" and fp8_cfg.first_last_layers_bf16:
        # megatron: "Delayed scaling does not support first / last layer in BF16." (amax
        # reduction would cross fp8_autocast boundaries per layer).
        raise ValueError("precision.fp8.recipe 'delayed' cannot keep layers in BF16; set "
                         "precision.fp8.first_last_layers_bf16: false or use recipe "
                         "tensorwise/mxfp8/blockwise.")
    return {
        "fp8": fp8_cfg.format,
        "fp8_recipe": fp8_cfg.recipe,
        "fp8_margin": fp8_cfg.margin,
        "fp8_amax_history_len": fp8_cfg.amax_history_len,
        "fp8_amax_compute_algo": fp8_cfg.amax_compute_algo,
        "fp8_wgrad": True,
        "first_last_layers_bf16": fp8_cfg.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": fp8_cfg.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": fp8_cfg.num_layers_at_end_in_bf16,
    }


def fp8_gemm_shape_problems(shapes: Sequence[Sequence[int]] | dict[str, Sequence[int]], *,
                            recipe: str = "tensorwise") -> list[str]:
    """Shapes that an FP8 GEMM operand cannot have, with the reason for each.

    Args:
        shapes: operand shapes ``[..., K]``, as a list or as ``{name: shape}`` for clearer
            messages (e.g. ``{"linear_fc1 weight": (ffn // tp, hidden), "tokens": (T, hidden)}``).
        recipe: ``precision.fp8.recipe``; mxfp8 needs multiples of 32, the others 16 (last dim)
            and 8 (product of leading dims).

    Returns:
        One sentence per bad shape; empty when all shapes are fine.
    """
    last_mult, lead_mult = fp8_alignment(recipe)
    named = shapes.items() if isinstance(shapes, dict) else ((None, s) for s in shapes)
    problems = []
    for name, shape in named:
        shape = tuple(int(d) for d in shape)
        label = f"{name} {list(shape)}" if name else f"shape {list(shape)}"
        if len(shape) < 2:
            problems.append(f"{label} must have at least 2 dims for an FP8 GEMM.")
            continue
        lead = math.prod(shape[:-1])
        if shape[-1] % last_mult:
            problems.append(f"{label}: last dim {shape[-1]} is not a multiple of {last_mult}.")
        if lead % lead_mult:
            problems.append(f"{label}: product of leading dims {lead} is not a multiple of "
                            f"{lead_mult}.")
    return problems

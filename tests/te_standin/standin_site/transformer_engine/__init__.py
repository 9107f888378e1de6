"""CPU stand-in for NVIDIA Transformer Engine — CI only, never installed, never imported by
``genlip_megatron`` itself.

It implements the slice of TE's Python API that megatron-core 0.16.1's TE extension
(``megatron/core/extensions/transformer_engine.py``) and genlip_megatron import and call, with
TE's names, signatures and documented semantics, **following Transformer Engine v2.11**
(``transformer_engine/pytorch/module/{linear,layernorm_linear,base}.py``,
``attention/dot_product_attention/{dot_product_attention,backends,utils}.py``,
``common/recipe.py``, ``common/fused_attn/fused_attn.cpp`` for the cuDNN backend rules):

* ``pytorch.Linear`` / ``LayerNormLinear`` / ``LayerNorm`` / ``RMSNorm`` (TP column/row modes,
  sequence parallel, ``return_bias``, ``fuse_wgrad_accumulation`` into ``weight.main_grad``,
  ``_extra_state`` FP8 metadata, TE's FP8 GEMM shape assertion inside ``fp8_autocast``);
* ``pytorch.DotProductAttention``: qkv formats thd/sbhd/bshd, mask types ``padding``,
  ``padding_causal``, ``padding_causal_bottom_right``, ``causal``, ``no_mask``; the backend
  choice (``NVTE_FUSED_ATTN`` / ``NVTE_UNFUSED_ATTN``, cuDNN's version rules for bottom-right
  masks); the unfused path builds its padding mask exactly as TE does, from ``cu_seqlens_q``
  only when ``attention_type="self"``; ``core_attention._extra_state`` and TE's
  ``remove_extra_states_check`` load hook;
* ``fp8_autocast`` / ``fp8_model_init`` / recipes (``DelayedScaling``, ``Float8CurrentScaling``,
  ``MXFP8BlockScaling``, ``Float8BlockScaling``): state tracking only, GEMMs stay in high
  precision (numerically a no-op).

Stand-in knobs (environment, read at call time): ``TE_STANDIN_CUDNN_VERSION`` (default
"9.10.0"), ``TE_STANDIN_SM_ARCH`` (default 90), ``TE_STANDIN_DROP_EXTRA_STATE_HOOK=1`` (behave
like a TE release that removed the ``remove_extra_states_check`` hook, as TE announces).
FlashAttention is never available (no ``flash_attn`` package), as on a box without flash-attn.

What it cannot show: kernel numerics (cuDNN/cuBLAS accumulation order, real FP8 rounding and
scaling), speed, memory use, CUDA graphs, userbuffer overlap, context parallelism, MoE/grouped
GEMMs (present only as names that raise), and any TE behaviour not listed above.
"""

__version__ = "2.11.0"
__cpu_standin__ = True
"""Read by ``genlip_megatron.compat.te``: this TE runs without CUDA (real TE never sets it)."""

from transformer_engine import common  # noqa: E402,F401
from transformer_engine import pytorch  # noqa: E402,F401

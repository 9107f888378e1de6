"""Transformer Engine prefix-LM attention: two fused varlen calls per batch (docs/design.md).

Imported only when ``model.attention_backend`` is "te" (``layer_spec.core_attention_class``
checks TE first). Incompatible with context parallelism (refused by the config).

Which TE backend runs the text call (``padding_causal_bottom_right``, ``sq ≠ skv``):

* FusedAttention (cuDNN): THD needs sm90+; cuDNN 9.6 accepts this mask only with
  ``max_seqlen_q``/``max_seqlen_kv`` multiples of 64 (we round the maxima up, as TE does when
  they are not given); cuDNN ≥ 9.7 lifts that rule. So the fused path needs cuDNN ≥ 9.6 here
  and runs without padding constraints from 9.7 (TE ``common/fused_attn/fused_attn.cpp``).
* FlashAttention or UnfusedDotProductAttention otherwise (A100, older cuDNN). TE's unfused
  path builds its padding mask from ``cu_seqlens_q`` alone when the module was built with
  ``attention_type="self"`` and then fails to broadcast against ``[sq, skv]``; this module is
  built with ``attention_type="cross"`` so every backend takes both ``cu_seqlens_q`` and
  ``cu_seqlens_kv``.

CPU CI runs this class against the TE stand-in (``tests/te_standin``), fused and unfused paths.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import transformer_engine.pytorch as te
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from genlip_megatron.model.attention import prefix_lm_params_from, two_call_prefix_lm

__all__ = ["TEPrefixLMAttention", "round_up_seqlen"]


logger = logging.getLogger(__name__)

FUSED_TEXT_CALL_MIN_CUDNN = (9, 6, 0)
"""cuDNN needed for the fused text call (padding_causal_bottom_right with sq ≠ skv, THD) when
the maxima are multiples of 64; (9, 7, 0) would be needed without that rounding."""

SEQLEN_ALIGN = 64
"""cuDNN 9.6's rule for ``padding_causal_bottom_right``: max_seqlen_q/kv multiples of 64."""


def round_up_seqlen(n: int, align: int = SEQLEN_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align`` (TE's own default when no maximum is given)."""
    return max(align, -(-int(n) // align) * align)


@functools.lru_cache(maxsize=1)
def check_fused_text_call_support() -> Optional[tuple]:
    """Warn once when cuDNN cannot run the fused text call; returns the cuDNN version.

    Below :data:`FUSED_TEXT_CALL_MIN_CUDNN` TE falls back to flash-attn or its unfused path
    (correct here, slower, O(S²) memory per sample).
    """
    try:
        from transformer_engine.pytorch.utils import get_cudnn_version

        version = tuple(get_cudnn_version())
    except Exception:  # noqa: BLE001 - informational: older TE without the helper, no cuDNN
        return None
    if version < FUSED_TEXT_CALL_MIN_CUDNN:
        logger.warning("cuDNN %s cannot run the prefix-LM text call fused (needs cuDNN >= 9.6 "
                       "with max_seqlen rounded to 64, as done here, or >= 9.7); Transformer "
                       "Engine will use flash-attn or its unfused path. Upgrade cuDNN for speed.",
                       ".".join(map(str, version)))
    return version


class TEPrefixLMAttention(TEDotProductAttention):
    """megatron ``TEDotProductAttention`` running the prefix-LM mask as two THD calls.

    Forward: q, k, v ``[S, B, np/tp, hn]`` + :class:`PrefixLMParams` (``varlen`` set) →
    ``[S, B, np/tp·hn]``.
    """

    spec_attn_mask_type = AttnMaskType.padding
    """Mask type given to TE at construction (each call passes its own)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, **kwargs: Any) -> None:
        # "cross": TE's unfused path then builds separate q and kv padding masks; the text
        # call has sq != skv (megatron passes "self" for a SelfAttention's core attention).
        super().__init__(config, layer_number, attn_mask_type, "cross", **kwargs)
        check_fused_text_call_support()

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor] = None, attn_mask_type: Any = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> Tensor:
        params = prefix_lm_params_from(packed_seq_params, "te")
        return two_call_prefix_lm(query, key, value, params.varlen, self._varlen_call)

    def _varlen_call(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_kv: Tensor,
                     max_q: int, max_kv: int, mask_type: str) -> Tensor:
        """One TE attention call in THD layout: ``[T, np, hn]`` → ``[T, np, hn]``.

        The maxima are rounded up to multiples of 64 (cuDNN 9.6; an upper bound is all the
        kernels need).
        """
        out = te.DotProductAttention.forward(
            self, q.contiguous(), k.contiguous(), v.contiguous(), attention_mask=None,
            qkv_format="thd", cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
            max_seqlen_q=round_up_seqlen(max_q), max_seqlen_kv=round_up_seqlen(max_kv),
            attn_mask_type=mask_type)
        return out.view(q.shape[0], q.shape[1], q.shape[2])

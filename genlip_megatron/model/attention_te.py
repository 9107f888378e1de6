"""Transformer Engine prefix-LM attention: two fused varlen calls per batch (DESIGN §5).

Imported only when ``model.attention_backend`` is "te" (``attention.core_attention_class``
checks TE first), never on CPU. Needs cuDNN ≥ 9.6 for ``padding_causal_bottom_right`` with
different q/kv lengths; incompatible with context parallelism (refused by the config).
Untested on this project's CPU CI; ``tests/unit/model/test_attention.py`` checks the same
decomposition (:func:`two_call_prefix_lm`) against the dense oracle with a torch varlen
reference, and a ``gpu``-marked test runs this class.
"""

from __future__ import annotations

from typing import Any, Optional

import transformer_engine.pytorch as te
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from genlip_megatron.model.attention import _params_from, two_call_prefix_lm

__all__ = ["TEPrefixLMAttention"]


class TEPrefixLMAttention(TEDotProductAttention):
    """megatron ``TEDotProductAttention`` running the prefix-LM mask as two THD calls.

    Forward: q, k, v ``[S, B, np/tp, hn]`` + :class:`PrefixLMParams` (``varlen`` set) →
    ``[S, B, np/tp·hn]``.
    """

    spec_attn_mask_type = AttnMaskType.padding
    """Mask type given to TE at construction (each call passes its own)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor] = None, attn_mask_type: Any = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> Tensor:
        params = _params_from(packed_seq_params, "te")
        return two_call_prefix_lm(query, key, value, params.varlen, self._varlen_call)

    def _varlen_call(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_kv: Tensor,
                     max_q: int, max_kv: int, mask_type: str) -> Tensor:
        """One TE fused-attention call in THD layout: ``[T, np, hn]`` → ``[T, np, hn]``."""
        out = te.DotProductAttention.forward(
            self, q.contiguous(), k.contiguous(), v.contiguous(), attention_mask=None,
            qkv_format="thd", cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, max_seqlen_q=max_q,
            max_seqlen_kv=max_kv, attn_mask_type=mask_type)
        return out.view(q.shape[0], q.shape[1], q.shape[2])

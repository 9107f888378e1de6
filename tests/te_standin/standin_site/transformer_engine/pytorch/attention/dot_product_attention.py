"""``DotProductAttention`` (TE v2.11 ``attention/dot_product_attention``), on CPU.

Backend choice per call, as ``get_attention_backend`` does it: FlashAttention is never
available (no flash-attn); FusedAttention (cuDNN) unless ``NVTE_FUSED_ATTN=0`` or cuDNN's rules
refuse the inputs (``common/fused_attn/fused_attn.cpp``: THD needs sm90+;
``padding_causal_bottom_right`` needs cuDNN ≥ 9.6 with ``max_seqlen_q``/``max_seqlen_kv``
multiples of 64, or cuDNN ≥ 9.7, and ``max_seqlen_q ≤ max_seqlen_kv``); else
UnfusedDotProductAttention unless ``NVTE_UNFUSED_ATTN=0``; else TE's ValueError.

* The fused path is exact varlen attention: every sample's queries against its own keys, the
  mask from ``cu_seqlens_q`` AND ``cu_seqlens_kv`` (cuDNN takes both).
* The unfused path reproduces TE's own steps: THD → BSHD with ``max_seqlen``, the padding mask
  from :func:`get_padding_mask` (``cu_seqlens_q`` only when ``attention_type == "self"``),
  :func:`get_full_mask`, scores masked with -10000, softmax, padded probabilities zeroed.

Every call appends ``{backend, qkv_format, attn_mask_type, max_seqlen_q, max_seqlen_kv}`` to
:data:`CALL_LOG` so tests can see which path ran.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
from transformer_engine.pytorch.utils import get_cudnn_version, get_device_compute_capability

CALL_LOG: list[dict] = []
"""Stand-in only: one entry per forward (tests clear and read it)."""

AttnMaskTypes = ("no_mask", "padding", "causal", "padding_causal", "causal_bottom_right",
                 "padding_causal_bottom_right", "arbitrary")
AttnTypes = ("self", "cross")


# ---------------------------------------------------------------- TE's mask helpers (utils.py)
def get_padding_mask(batch_size: int, cu_seqlens_q: torch.Tensor = None,
                     cu_seqlens_kv: torch.Tensor = None, max_seqlen_q: int = None,
                     max_seqlen_kv: int = None, attention_type: str = "self"):
    """cu_seqlens → boolean padding mask(s) ``[b, 1, 1, s]`` (True = padded), as TE builds it:
    for "self" only from ``cu_seqlens_q``; for "cross" a (q, kv) pair."""
    def one(cu: torch.Tensor, max_len: int) -> torch.Tensor:
        lens = (cu[1:] - cu[:-1]).long()
        pos = torch.arange(max_len, device=cu.device)
        return (pos[None, :] >= lens[:, None])[:, None, None, :]

    mask_q = one(cu_seqlens_q, max_seqlen_q)[:batch_size]
    if attention_type == "self":
        return mask_q
    return mask_q, one(cu_seqlens_kv, max_seqlen_kv)[:batch_size]


def get_full_mask(max_seqlen_q: int, max_seqlen_kv: int, attn_mask_type: str = "no_mask",
                  attention_mask: Any = None, attention_type: str = "self"):
    """``[b|1, 1, sq, skv]`` mask (True = masked) from the mask type and padding masks."""
    actual_q = actual_kv = None
    if "padding" in attn_mask_type:
        if attention_type == "self":
            attention_mask = torch.logical_or(attention_mask.squeeze(1).unsqueeze(3),
                                              attention_mask)
        else:
            attention_mask = torch.logical_or(attention_mask[0].squeeze(1).unsqueeze(3),
                                              attention_mask[1])
        m = attention_mask.logical_not()
        actual_q = m[:, 0, :, 0].sum(dim=1)
        actual_kv = m[:, 0, 0, :].sum(dim=1)
    diff = (torch.arange(max_seqlen_q).view(1, 1, -1, 1)
            - torch.arange(max_seqlen_kv).view(1, 1, 1, -1))
    if attn_mask_type == "causal_bottom_right":
        causal = diff + max_seqlen_kv - max_seqlen_q < 0
    elif attn_mask_type in ("causal", "padding_causal"):
        causal = diff < 0
    elif attn_mask_type == "padding_causal_bottom_right":
        b = attention_mask.shape[0]
        causal = diff.expand(b, 1, max_seqlen_q, max_seqlen_kv) \
            + (actual_kv - actual_q).view(b, 1, 1, 1) < 0
    else:
        causal = torch.zeros_like(diff, dtype=torch.bool)
    mask = causal if attention_mask is None else torch.logical_or(causal, attention_mask)
    return attn_mask_type, mask, actual_q, actual_kv


def _thd_to_bshd(t: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    if max(lens, default=0) > max_len:
        raise ValueError(f"max_seqlen {max_len} is smaller than a sequence ({max(lens)}).")
    out = t.new_zeros(len(lens), max_len, *t.shape[1:])
    for i, n in enumerate(lens):
        out[i, :n] = t[int(cu[i]):int(cu[i]) + n]
    return out


def _bshd_to_thd(t: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    return torch.cat([t[i, :n] for i, n in enumerate(lens)], dim=0)


# ---------------------------------------------------------------- backend rules
def fused_attention_supported(qkv_format: str, attn_mask_type: str, max_seqlen_q: int,
                              max_seqlen_kv: int, dropout: float) -> Tuple[bool, str]:
    """(ok, reason) of cuDNN's rules for the mask types the stand-in knows."""
    if os.environ.get("NVTE_FUSED_ATTN", "1") == "0":
        return False, "NVTE_FUSED_ATTN=0"
    cudnn = get_cudnn_version()
    major, minor = get_device_compute_capability()
    if qkv_format == "thd" and major * 10 + minor < 90:
        return False, "cuDNN THD needs sm90+"
    if attn_mask_type in ("causal_bottom_right", "padding_causal_bottom_right"):
        if max_seqlen_q > max_seqlen_kv:
            return False, "bottom-right masks need max_seqlen_q <= max_seqlen_kv"
        if cudnn >= (9, 7, 0):
            return True, ""
        if (cudnn >= (9, 6, 0) and max_seqlen_q % 64 == 0 and max_seqlen_kv % 64 == 0
                and dropout == 0.0):
            return True, ""
        return False, (f"cuDNN {'.'.join(map(str, cudnn))} needs max_seqlen_q/kv multiples of "
                       f"64 for {attn_mask_type} (cuDNN >= 9.7 lifts it); got {max_seqlen_q}/"
                       f"{max_seqlen_kv}")
    return True, ""


class DotProductAttention(TransformerEngineBaseModule):
    """softmax(QKᵀ·scale + mask) V over ``[s, b, h, d]`` / ``[b, s, h, d]`` / ``[t, h, d]``."""

    def __init__(self, num_attention_heads: int, kv_channels: Union[int, Tuple[int, int]],
                 num_gqa_groups: Optional[int] = None, attention_dropout: float = 0.0,
                 qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 window_size: Optional[Tuple[int, int]] = None, sequence_parallel: bool = False,
                 tp_size: int = 1, get_rng_state_tracker: Optional[Callable] = None,
                 tp_group: Any = None, layer_number: Optional[int] = None,
                 attention_type: str = "self", cp_group: Any = None,
                 cp_global_ranks: Any = None, cp_stream: Any = None, cp_comm_type: str = "p2p",
                 softmax_scale: Optional[float] = None, softmax_type: str = "vanilla",
                 return_max_logit: Optional[bool] = False) -> None:
        super().__init__()
        if attention_type not in AttnTypes:
            raise AssertionError(f"attention_type {attention_type} not supported")
        if cp_group is not None:
            raise NotImplementedError("the TE stand-in does not implement context parallelism.")
        if window_size is not None or softmax_type != "vanilla" or return_max_logit:
            raise NotImplementedError("the TE stand-in does not implement sliding windows, "
                                      "softmax offsets or max-logit returns.")
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type.replace(",", "_")
        self.attention_type = attention_type
        self.layer_number = layer_number
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_gqa_groups or num_attention_heads
        self.tp_size, self.tp_group = tp_size, tp_group
        self.cp_group = None
        self.get_rng_state_tracker = get_rng_state_tracker
        k_ch = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.hidden_size_per_attention_head_k = k_ch
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_ch)
        self.attention_dropout = attention_dropout

        def remove_extra_states_check(module, incompatible_keys):
            # TE's hook: tolerate a missing core_attention._extra_state (older checkpoints;
            # "Will phase out this hook"). TE_STANDIN_DROP_EXTRA_STATE_HOOK=1 emulates a TE
            # without it.
            if os.environ.get("TE_STANDIN_DROP_EXTRA_STATE_HOOK") == "1":
                return
            for key in incompatible_keys.missing_keys:
                if "core_attention._extra_state" in key:
                    incompatible_keys.missing_keys.remove(key)

        self.register_load_state_dict_post_hook(remove_extra_states_check)

    def set_context_parallel_group(self, cp_group: Any, cp_global_ranks: Any, cp_stream: Any,
                                   cp_comm_type: str = "p2p") -> None:
        if cp_group is not None:
            raise NotImplementedError("the TE stand-in does not implement context parallelism.")

    def forward(self, query_layer: torch.Tensor, key_layer: torch.Tensor,
                value_layer: torch.Tensor, attention_mask: Any = None, qkv_format: str = None,
                cu_seqlens_q: torch.Tensor = None, cu_seqlens_kv: torch.Tensor = None,
                cu_seqlens_q_padded: torch.Tensor = None,
                cu_seqlens_kv_padded: torch.Tensor = None, max_seqlen_q: int = None,
                max_seqlen_kv: int = None, attn_mask_type: Optional[str] = None,
                window_size: Optional[Tuple[int, int]] = None,
                checkpoint_core_attention: bool = False, core_attention_bias_type: str = "no_bias",
                core_attention_bias: Optional[torch.Tensor] = None,
                alibi_slopes: Optional[torch.Tensor] = None, fast_zero_fill: bool = True,
                inference_params: Any = None, pad_between_seqs: Optional[bool] = None,
                fp8_output: Optional[bool] = False, num_splits: Optional[int] = 1
                ) -> torch.Tensor:
        self.init_fp8_metadata()
        if core_attention_bias_type != "no_bias" or alibi_slopes is not None or \
                inference_params is not None or cu_seqlens_q_padded is not None:
            raise NotImplementedError("the TE stand-in does not implement attention biases, "
                                      "ALiBi, KV caching or padded cu_seqlens.")
        attn_mask_type = (attn_mask_type or self.attn_mask_type).replace(",", "_")
        if attn_mask_type not in AttnMaskTypes:
            raise AssertionError(f"attn_mask_type {attn_mask_type} not supported")
        qkv_format = qkv_format or self.qkv_format
        if qkv_format == "thd":
            if not all(x.dim() == 3 for x in (query_layer, key_layer, value_layer)):
                raise AssertionError("Queries, keys and values must be 3D tensors when "
                                     "qkv_format = thd!")
            if "padding" not in attn_mask_type:
                raise AssertionError("Attention mask type must be padding or padding_causal "
                                     "for qkv_format=thd!")
            if cu_seqlens_q is None or cu_seqlens_kv is None:
                raise AssertionError("cu_seqlens_q and cu_seqlens_kv can not be None when "
                                     "qkv_format = thd!")
            if cu_seqlens_q.shape != cu_seqlens_kv.shape or cu_seqlens_q.dim() != 1:
                raise AssertionError("cu_seqlens_q and cu_seqlens_q must both have shape "
                                     "[batch_size + 1]!")
            if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_kv.dtype != torch.int32:
                raise AssertionError("cu_seqlens_q and cu_seqlens_q must both be in dtype "
                                     "torch.int32!")
            if max_seqlen_q is None:
                max_seqlen_q = int(((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max() + 63) // 64 * 64)
            if max_seqlen_kv is None:
                max_seqlen_kv = int(((cu_seqlens_kv[1:] - cu_seqlens_kv[:-1]).max() + 63)
                                    // 64 * 64)
        elif qkv_format in ("sbhd", "bshd"):
            s_dim = 0 if qkv_format == "sbhd" else 1
            max_seqlen_q = query_layer.shape[s_dim] if max_seqlen_q is None else max_seqlen_q
            max_seqlen_kv = key_layer.shape[s_dim] if max_seqlen_kv is None else max_seqlen_kv
            if "padding" in attn_mask_type or attn_mask_type == "arbitrary":
                raise NotImplementedError("the TE stand-in implements padding masks only for "
                                          "qkv_format='thd'.")
        else:
            raise AssertionError("DotProductAttention only supports qkv_format = "
                                 "{'sbhd', 'bshd', 'thd'}!")

        fused_ok, why = fused_attention_supported(qkv_format, attn_mask_type, max_seqlen_q,
                                                  max_seqlen_kv, self.attention_dropout)
        if fused_ok:
            backend = "FusedAttention"
        elif os.environ.get("NVTE_UNFUSED_ATTN", "1") != "0":
            backend = "UnfusedDotProductAttention"
        else:
            raise ValueError("No dot product attention backend is available for the provided "
                             f"inputs. Please run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to find "
                             f"out the reasons for disabling all backends. (stand-in: {why})")
        CALL_LOG.append({"backend": backend, "qkv_format": qkv_format,
                         "attn_mask_type": attn_mask_type, "max_seqlen_q": max_seqlen_q,
                         "max_seqlen_kv": max_seqlen_kv, "attention_type": self.attention_type})
        # The fused kernel always takes both cu_seqlens; the unfused path uses attention_type.
        attention_type = "cross" if backend == "FusedAttention" else self.attention_type
        return self._attend(query_layer, key_layer, value_layer, qkv_format, attn_mask_type,
                            cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                            attention_type)

    def _attend(self, q, k, v, qkv_format, attn_mask_type, cu_q, cu_kv, max_q, max_kv,
                attention_type):
        if qkv_format == "thd":
            q = _thd_to_bshd(q, cu_q, max_q)
            k, v = (_thd_to_bshd(x, cu_kv, max_kv) for x in (k, v))
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        elif qkv_format == "bshd":
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        sq, b, h, d = q.shape
        sk = k.shape[0]
        mask = None
        if "padding" in attn_mask_type:
            mask = get_padding_mask(b, cu_q, cu_kv, sq, sk, attention_type)
        _, full_mask, _, _ = get_full_mask(sq, sk, attn_mask_type, mask, attention_type)
        if k.shape[2] != h:
            k = k.repeat_interleave(h // k.shape[2], dim=2)
            v = v.repeat_interleave(h // v.shape[2], dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", q.float(), k.float()) * self.softmax_scale
        scores = scores.masked_fill(full_mask, -10000.0)
        probs = scores.softmax(dim=-1)
        if "padding" in attn_mask_type:
            probs = probs.masked_fill(full_mask, 0.0)
        if self.training and self.attention_dropout > 0:
            probs = F.dropout(probs, self.attention_dropout)
        ctx = torch.einsum("bhst,tbhd->bshd", probs, v.float()).to(v.dtype)  # [b, sq, h, d]
        if qkv_format == "thd":
            return _bshd_to_thd(ctx, cu_q).reshape(-1, h * d)
        if qkv_format == "bshd":
            return ctx.reshape(b, sq, h * d)
        return ctx.transpose(0, 1).reshape(sq, b, h * d)

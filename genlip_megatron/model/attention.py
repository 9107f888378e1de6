"""Prefix-LM core attention for packed rows: one interface, three backends (docs/design.md).

Mask rule for a packed row (segment id = sample index in the row, -1 on padding): query q may
see key k iff both are in the same sample (segment ≥ 0) and either both are image tokens
(bidirectional within the image) or q is a text token and k ≤ q (causal over the sample, image
included). Image tokens never see text; nothing crosses samples. Padding queries see only
themselves, so every backend gives a finite, identical output (``v``) there.

The model builds a :class:`PrefixLMParams` ONCE per forward (:func:`build_prefix_lm_params`) and
megatron hands it to every layer's core attention as ``packed_seq_params`` (with
``qkv_format="sbhd"``, so megatron's THD code paths stay off). It travels as a keyword argument,
which megatron's activation recompute captures by closure instead of saving it as a tensor.

Backends (``config.prefix_attention_backend``):

* ``dense``: megatron ``DotProductAttention`` with an explicit boolean mask (True = masked,
  ``AttnMaskType.arbitrary``), O(S²) memory; the numerical oracle and the CPU training path.
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the rule above;
  forward runs on CPU (eager), backward only on GPU (torch raises on CPU, we raise first).
* ``varlen``: per-sample attention on CPU through torch's ``scaled_dot_product_attention``
  (:class:`VarlenPrefixLMAttention`): per sample, image queries over the image keys (no mask)
  and text queries over the whole sample (bottom-right causal mask); no cross-sample work and no
  ``[B, S, S]`` mask, so a packed row costs what its samples cost. The CPU training path for
  long or many-sample rows; equal to ``dense`` up to float rounding (tests).
* ``te``: two Transformer Engine varlen calls per batch (``model/attention_te.py``): image
  queries over image keys (``padding``) and text queries over all keys of their sample
  (``padding_causal_bottom_right``), separate ``cu_seqlens_q``/``cu_seqlens_kv``
  (:class:`VarlenIndex`); padding tokens output ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

__all__ = ["prefix_lm_allowed", "prefix_lm_mask_mod", "VarlenIndex", "build_varlen_index",
           "SampleSpans", "build_sample_spans", "VarlenPrefixLMAttention",
           "two_call_prefix_lm", "PrefixLMParams", "build_prefix_lm_params",
           "prefix_lm_params_from", "DensePrefixLMAttention", "FlexPrefixLMAttention"]


# ---------------------------------------------------------------------------------------------
# The mask rule
# ---------------------------------------------------------------------------------------------

def prefix_lm_allowed(segment_ids: Tensor, image_mask: Tensor) -> Tensor:
    """Boolean ``[B, S, S]``: True where query (dim 1) may attend to key (dim 2)."""
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    img_q, img_k = image_mask[:, :, None], image_mask[:, None, :]
    pos = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    causal = pos[:, None] >= pos[None, :]
    same = (seg_q == seg_k) & (seg_q >= 0)
    allowed = same & ((img_q & img_k) | (~img_q & causal))
    return allowed | ((seg_q < 0) & (pos[:, None] == pos[None, :]))


def prefix_lm_mask_mod(segment_ids: Tensor, image_mask: Tensor) -> Callable:
    """flex_attention ``mask_mod(b, h, q, kv)`` implementing :func:`prefix_lm_allowed`."""

    def mask_mod(b, h, q_idx, kv_idx):
        seg_q, seg_k = segment_ids[b, q_idx], segment_ids[b, kv_idx]
        img_q, img_k = image_mask[b, q_idx], image_mask[b, kv_idx]
        same = (seg_q == seg_k) & (seg_q >= 0)
        allowed = same & ((img_q & img_k) | (~img_q & (kv_idx <= q_idx)))
        return allowed | ((seg_q < 0) & (q_idx == kv_idx))

    return mask_mod


# ---------------------------------------------------------------------------------------------
# Varlen (THD) decomposition for the TE backend
# ---------------------------------------------------------------------------------------------

@dataclass
class VarlenIndex:
    """Token indexes into the flattened ``[B·S]`` stream (row-major) and varlen lengths.

    Every sample is ``[image | text]``, contiguous; ``n`` = number of samples in the batch.
    """

    image_tokens: Tensor       # int64 [Ni]
    text_tokens: Tensor        # int64 [Nt]
    sample_tokens: Tensor      # int64 [Ni + Nt], all non-padding tokens in order
    cu_seqlens_image: Tensor   # int32 [n + 1]
    cu_seqlens_text: Tensor    # int32 [n + 1]
    cu_seqlens_sample: Tensor  # int32 [n + 1]
    max_image: int
    max_text: int
    max_sample: int


def _cu(lengths: Tensor) -> Tensor:
    zero = torch.zeros(1, dtype=torch.int32, device=lengths.device)
    return torch.cat([zero, lengths.cumsum(0).to(torch.int32)])


def build_varlen_index(segment_ids: Tensor, image_mask: Tensor) -> VarlenIndex:
    """Decompose packed rows into image and text varlen problems (one host sync).

    Args:
        segment_ids: int ``[B, S]``, sample index per row, -1 on padding.
        image_mask: bool ``[B, S]``.

    Raises:
        RuntimeError: a sample is not laid out ``[image | text]`` (bottom-right causal alignment
            of text queries over ``[image, text]`` keys needs that order).
    """
    B, S = segment_ids.shape
    seg = segment_ids.reshape(-1).long()
    img = image_mask.reshape(-1)
    sample_tokens = (seg >= 0).nonzero().squeeze(1)
    key = (sample_tokens // S) * (S + 1) + seg[sample_tokens]
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    ordinal = starts.long().cumsum(0) - 1
    is_img = img[sample_tokens]
    text_then_image = (is_img[1:] & ~is_img[:-1] & ~starts[1:]).any()
    n = int(ordinal[-1]) + 1 if ordinal.numel() else 0
    if bool(text_then_image):
        raise RuntimeError("attention backend 'te' needs every sample laid out [image | text]; "
                           "found image tokens after text inside a sample.")
    lens = [torch.bincount(ordinal[m], minlength=n) for m in (is_img, ~is_img)]
    sample_lens = lens[0] + lens[1]
    maxima = torch.stack([x.max() if n else x.new_zeros(()) for x in (*lens, sample_lens)])
    max_image, max_text, max_sample = (int(v) for v in maxima.tolist())
    return VarlenIndex(sample_tokens[is_img], sample_tokens[~is_img], sample_tokens,
                       _cu(lens[0]), _cu(lens[1]), _cu(sample_lens),
                       max_image, max_text, max_sample)


VarlenAttend = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, str], Tensor]
"""``(q [Tq,np,hn], k [Tk,np,hn], v, cu_q, cu_kv, max_q, max_kv, mask_type) → [Tq,np,hn]``."""


def two_call_prefix_lm(query: Tensor, key: Tensor, value: Tensor, index: VarlenIndex,
                       attend: VarlenAttend) -> Tensor:
    """Prefix-LM attention as two varlen calls (image→image, text→sample).

    Args:
        query, key, value: ``[S, B, np, hn]``.
        index: from :func:`build_varlen_index`.
        attend: varlen attention, mask types "padding" and "padding_causal_bottom_right".

    Returns:
        ``[S, B, np·hn]``; padding tokens get their own ``v``.
    """
    S, B, heads, dim = query.shape

    def flat(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(B * S, heads, dim)

    q, k, v = flat(query), flat(key), flat(value)
    img, txt, smp = index.image_tokens, index.text_tokens, index.sample_tokens
    out_img = attend(q[img], k[img], v[img], index.cu_seqlens_image, index.cu_seqlens_image,
                     index.max_image, index.max_image, "padding")
    out_txt = attend(q[txt], k[smp], v[smp], index.cu_seqlens_text, index.cu_seqlens_sample,
                     index.max_text, index.max_sample, "padding_causal_bottom_right")
    out = v.index_copy(0, img, out_img.to(v.dtype)).index_copy(0, txt, out_txt.to(v.dtype))
    return out.view(B, S, heads * dim).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Per-sample spans for the CPU ``varlen`` backend
# ---------------------------------------------------------------------------------------------

@dataclass
class SampleSpans:
    """Per row, the runs of the packed sequence in order: ``(start, n_image, n_text)``.

    A padding run has ``n_image = -1`` and ``n_text`` = its length. ``text_masks`` caches the
    bool ``[t, i + t]`` text-query masks (True = attend) by ``(i, t)``, shared by all layers.
    """

    rows: list[list[tuple[int, int, int]]]
    text_masks: dict[tuple[int, int], Tensor]


def build_sample_spans(segment_ids: Tensor, image_mask: Tensor) -> SampleSpans:
    """Split packed rows into ``[image | text]`` samples and padding runs (one host sync).

    Raises:
        RuntimeError: a sample is not laid out ``[image | text]``.
    """
    B, S = segment_ids.shape
    seg = segment_ids.long()
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    run_id = starts.reshape(-1).long().cumsum(0) - 1           # runs never cross rows
    n_runs = int(run_id[-1]) + 1 if run_id.numel() else 0
    img = image_mask.reshape(-1)
    n_img = torch.zeros(n_runs, dtype=torch.long).index_add_(0, run_id, img.long())
    first = starts.reshape(-1).nonzero().squeeze(1)
    lengths = torch.diff(first, append=torch.tensor([B * S]))
    # [image | text]: inside a run, an image token never follows a text token
    later_image = img[1:] & ~img[:-1] & ~starts.reshape(-1)[1:]
    if bool(later_image.any()):
        raise RuntimeError("attention backend 'varlen' needs every sample laid out "
                           "[image | text]; found image tokens after text inside a sample.")
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]
    masks: dict[tuple[int, int], Tensor] = {}
    for f, n, i, s in zip(first.tolist(), lengths.tolist(), n_img.tolist(),
                          seg.reshape(-1)[first].tolist()):
        b, start = divmod(f, S)
        if s < 0:
            rows[b].append((start, -1, n))
            continue
        t = n - i
        rows[b].append((start, i, t))
        if t and (i, t) not in masks:
            masks[(i, t)] = torch.ones(t, n, dtype=torch.bool,
                                       device=segment_ids.device).tril(i)
    return SampleSpans(rows, masks)


def varlen_prefix_lm(query: Tensor, key: Tensor, value: Tensor, spans: SampleSpans,
                     scale: float) -> Tensor:
    """Prefix-LM attention sample by sample (two SDPA calls per sample, none across samples).

    Args:
        query, key, value: ``[S, B, np, hn]``.
        spans: from :func:`build_sample_spans`.
        scale: softmax scale.

    Returns:
        ``[S, B, np·hn]``; padding tokens get their own ``v`` (as the dense oracle).
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    S, B, heads, dim = query.shape
    rows = [t.unbind(1) for t in (query, key, value)]                 # B × [S, np, hn]
    out_rows = []
    for b, runs in enumerate(spans.rows):
        # [1, np, L, hn] views per run: torch's fused CPU (flash) SDPA kernel takes only 4-D
        # inputs (3-D ones fall back to the unfused math path). split/unbind, not slicing:
        # their backward is one cat/stack, while every slice's backward would write a
        # full-row zero gradient (O(samples × S) per layer).
        sizes = [t if i < 0 else i + t for _, i, t in runs]
        q, k, v = (r[b].transpose(0, 1)[None].split(sizes, dim=2) for r in rows)
        pieces = []
        for (_, i, t), qs, ks, vs in zip(runs, q, k, v):
            if i < 0:
                pieces.append(vs)
                continue
            if i:
                pieces.append(sdpa(qs[:, :, :i], ks[:, :, :i], vs[:, :, :i], scale=scale))
            if t:
                pieces.append(sdpa(qs[:, :, i:], ks, vs, attn_mask=spans.text_masks[(i, t)],
                                   scale=scale))
        out_rows.append(torch.cat(pieces, dim=2)[0].transpose(0, 1))         # [S, np, hn]
    return torch.stack(out_rows, dim=1).reshape(S, B, heads * dim)


# ---------------------------------------------------------------------------------------------
# Per-forward parameters
# ---------------------------------------------------------------------------------------------

@dataclass
class PrefixLMParams(PackedSeqParams):
    """Prefix-LM attention metadata for one forward, handed to every layer.

    Exactly one of ``dense_mask`` / ``block_mask`` / ``varlen`` / ``spans`` is set, per
    ``backend``.
    """

    qkv_format: str = "sbhd"
    backend: str = "dense"
    dense_mask: Optional[Tensor] = None   # bool [B, 1, S, S], True = masked out
    block_mask: Any = None                # torch.nn.attention.flex_attention.BlockMask
    varlen: Optional[VarlenIndex] = None
    spans: Optional[SampleSpans] = None


def build_prefix_lm_params(backend: str, segment_ids: Tensor, image_mask: Tensor
                           ) -> PrefixLMParams:
    """Build the backend's mask representation once per forward.

    Args:
        backend: "dense" | "flex" | "te" | "varlen".
        segment_ids: int ``[B, S]`` (-1 = padding).
        image_mask: bool ``[B, S]``.
    """
    if backend == "dense":
        allowed = prefix_lm_allowed(segment_ids, image_mask)
        return PrefixLMParams(backend=backend, dense_mask=~allowed.unsqueeze(1))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        B, S = segment_ids.shape
        # On GPU compile the mask construction: eager materialises a [B, S, S] mask first.
        block_mask = create_block_mask(prefix_lm_mask_mod(segment_ids, image_mask), B, None, S,
                                       S, device=segment_ids.device,
                                       _compile=segment_ids.device.type == "cuda")
        return PrefixLMParams(backend=backend, block_mask=block_mask)
    if backend == "te":
        return PrefixLMParams(backend=backend, varlen=build_varlen_index(segment_ids, image_mask))
    if backend == "varlen":
        return PrefixLMParams(backend=backend, spans=build_sample_spans(segment_ids, image_mask))
    raise ValueError(f"model.attention_backend ({backend!r}) must be one of dense, flex, te, "
                     "varlen.")


def _refuse_dropout(config: Any, attention_dropout: Optional[float], backend: str,
                    fix: str) -> None:
    """Backends built on fused kernels without a dropout mask refuse attention dropout."""
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        raise ValueError(f"model.attention_dropout ({dropout}) must be 0 with the '{backend}' "
                         f"attention backend; {fix}.")


def prefix_lm_params_from(packed_seq_params: Any, backend: str) -> PrefixLMParams:
    if not isinstance(packed_seq_params, PrefixLMParams) or packed_seq_params.backend != backend:
        raise RuntimeError(f"the {backend!r} prefix-LM attention needs the PrefixLMParams built "
                           "by GenLIPMegatronModel.forward (packed_seq_params); got "
                           f"{type(packed_seq_params).__name__}.")
    return packed_seq_params


# ---------------------------------------------------------------------------------------------
# Core-attention modules (ModuleSpec slot ``core_attention``)
# ---------------------------------------------------------------------------------------------

class DensePrefixLMAttention(DotProductAttention):
    """megatron ``DotProductAttention`` reading its mask from :class:`PrefixLMParams`.

    Forward: q, k, v ``[S, B, np/tp, hn]`` → ``[S, B, np/tp·hn]``.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> Tensor:
        params = prefix_lm_params_from(packed_seq_params, "dense")
        return super().forward(query, key, value, params.dense_mask,
                               attn_mask_type=AttnMaskType.arbitrary,
                               attention_bias=attention_bias, packed_seq_params=None, **kwargs)


_COMPILED_FLEX: dict[str, Callable] = {}


def _flex_fn(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cpu":
        return flex_attention  # eager: compiling costs seconds per shape on CPU
    if device_type not in _COMPILED_FLEX:
        _COMPILED_FLEX[device_type] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX[device_type]


class FlexPrefixLMAttention(MegatronModule):
    """Prefix-LM attention through ``flex_attention`` and a ``BlockMask``.

    Same constructor arguments as megatron's ``DotProductAttention``. Head dims that are not a
    power of two are zero-padded (like the reference's padding to 128) with the softmax scale of
    the true head dim. Forward: q, k, v ``[S, B, np/tp, hn]`` → ``[S, B, np/tp·hn]``.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, **kwargs: Any) -> None:
        super().__init__(config=config)
        _refuse_dropout(config, attention_dropout, "flex", "use 'dense' or 'te'")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.padded_dim = max(16, 1 << (self.head_dim - 1).bit_length())

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor] = None, attn_mask_type: Any = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> Tensor:
        params = prefix_lm_params_from(packed_seq_params, "flex")
        if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError("model.attention_backend 'flex' cannot train on CPU: torch's "
                               "FlexAttention has no CPU backward; use 'dense' on CPU.")
        S, B, heads, dim = query.shape
        pad = self.padded_dim - dim

        def bhsd(t: Tensor) -> Tensor:  # [S, B, np, hn] -> [B, np, S, hn(+pad)]
            t = t.permute(1, 2, 0, 3)
            return torch.nn.functional.pad(t, (0, pad)) if pad else t.contiguous()

        out = _flex_fn(query.device.type)(bhsd(query), bhsd(key), bhsd(value),
                                          block_mask=params.block_mask, scale=self.softmax_scale)
        out = out[..., :dim]                                        # [B, np, S, hn]
        return out.permute(2, 0, 1, 3).reshape(S, B, heads * dim)


class VarlenPrefixLMAttention(MegatronModule):
    """Per-sample prefix-LM attention on torch SDPA (:func:`varlen_prefix_lm`).

    Same constructor arguments as megatron's ``DotProductAttention``; no attention dropout.
    Forward: q, k, v ``[S, B, np/tp, hn]`` → ``[S, B, np/tp·hn]``.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, **kwargs: Any) -> None:
        super().__init__(config=config)
        _refuse_dropout(config, attention_dropout, "varlen", "use 'dense'")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor] = None, attn_mask_type: Any = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> Tensor:
        params = prefix_lm_params_from(packed_seq_params, "varlen")
        return varlen_prefix_lm(query, key, value, params.spans, self.softmax_scale)

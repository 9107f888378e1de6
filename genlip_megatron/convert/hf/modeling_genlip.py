"""GenLIP for Hugging Face ``transformers``: logits and vision-encoder features, on CPU or GPU.

Self-contained (torch + transformers only), copied into every exported checkpoint directory and
referenced from ``config.json``'s ``auto_map``::

    model = AutoModel.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    out = model(input_ids=ids, pixel_values=patches, image_grid_thw=grids)   # out.logits
    tower = model(pixel_values=patches, image_grid_thw=grids)                # vision tower
    feats = model.encode_images(patches, grids)                              # list of [n_i, E]

- :class:`GenLIPVisionModel`: the vision tower for MLLMs (``AutoModel`` of ``--vision-only``
  exports; ``GenLIPModel.vision_model``), ``BaseModelOutputWithPooling`` like SigLIP/CLIP;
- :class:`GenLIPModel`: ``[image | text]`` rows → logits/loss (the released checkpoints' keys);
- :class:`GenLIPForCausalLM`: the same with ``generate()`` (``AutoModelForCausalLM``).

It implements the reference forward (YanFangCS/GenLIP@db2c226 ``genlip_modeling.py``) exactly:
conv patch embedding (applied as the equivalent linear on (C, ph, pw)-flattened patches), text
embedding + ``in_proj``, masked scatter of the patch embeddings into the image positions,
interleaved MRoPE, pre-norm blocks with elementwise sigmoid-gated attention (``q_proj`` rows
``[query | gate]``), SwiGLU ``fc2(silu(gate_fc x) * fc1 x)``, two LayerScales per block,
``ln_post``, ``proj`` and an untied bias-free ``lm_head``.

Fixes of the reference's inference pitfalls (docs/reference-architecture.md, Inference pitfalls):
- the prefix-LM mask is built per row, so batch size > 1 and packed rows both work;
- missing ``position_ids`` are built from the image grids (image (0, r, c); text
  t = h = w = max(gh, gw) + k per sample), never 1-D positions;
- ``position_ids`` are ``[B, 3, L]`` (``[3, B, L]`` is accepted when B != 3), never silently
  mis-transposed;
- no non-persistent buffers and a guarded ``_init_weights``, so ``from_pretrained`` cannot
  re-initialise loaded weights.

Encoder features are the ``ln_post`` output (width E) of an image-only pass with bidirectional
attention inside each image (docs/reference-architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, \
    AutoProcessor, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

from .configuration_genlip import GenLIPConfig
from .image_processing_genlip import GenLIPImageProcessor
from .processing_genlip import GenLIPProcessor

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- inputs
def patchify(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``[B, C, H, W]`` images into raster-order patches.

    Returns:
        patches ``[B * gh * gw, C * p * p]`` flattened in (C, ph, pw) order, and the grids
        ``[B, 3]`` as (t=1, gh, gw).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}; resize first.")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)
    return x.reshape(b * gh * gw, c * p * p), grid


def normalize_pixel_values(pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                           num_channels: int, patch_size: int):
    """Accept patches ``[N, C*p*p]``, patches ``[N, C, p, p]`` or images ``[B, C, H, W]``.

    Returns:
        (patches ``[N, C*p*p]``, grids ``[num_images, 2]`` as (gh, gw) or None if unknown).
    """
    p, c = patch_size, num_channels
    grid = None
    if image_grid_thw is not None:
        grid = torch.as_tensor(image_grid_thw).reshape(-1, image_grid_thw.shape[-1])[:, -2:]
    if pixel_values.dim() == 2:
        d = pixel_values.shape[1]
        if d != c * p * p:
            hint = (f" (it looks like Qwen2-VL patches of temporal_patch_size={d // (c * p * p)}; "
                    "GenLIP takes temporal_patch_size=1, merge_size=1: GenLIPImageProcessor's "
                    "packed layout)") if d % (c * p * p) == 0 else ""
            raise ValueError(f"pixel_values [N, {d}] must be flattened patches of length "
                             f"C*p*p = {c * p * p}{hint}.")
        return pixel_values, grid
    if pixel_values.dim() == 4 and pixel_values.shape[1] == c:
        if tuple(pixel_values.shape[2:]) == (p, p):
            return pixel_values.reshape(pixel_values.shape[0], -1), grid
        patches, thw = patchify(pixel_values, p)
        return patches, thw[:, 1:]
    raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} is not [N, C*p*p], "
                     f"[N, C, p, p] or [B, C, H, W] with C = {c}, p = {p}.")


def _runs(flags: torch.Tensor, keys: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of equal ``keys`` among positions where ``flags`` is True."""
    idx = torch.nonzero(flags, as_tuple=False).flatten().tolist()
    k = keys.tolist()
    out, start = [], None
    for j, i in enumerate(idx):
        if start is None:
            start = i
        nxt = idx[j + 1] if j + 1 < len(idx) else None
        if nxt is None or nxt != i + 1 or k[nxt] != k[i]:
            out.append((start, i + 1))
            start = None
    return out


def build_position_ids(image_mask: torch.Tensor, segment_ids: torch.Tensor,
                       image_grids: Optional[torch.Tensor]) -> torch.Tensor:
    """MRoPE ids ``[B, 3, L]`` as the reference data pipeline builds them
    (docs/reference-architecture.md).

    Per sample (a run of equal ``segment_ids`` >= 0): an image run with grid (gh, gw) gets
    (0, r, c) in raster order; text continues at t = h = w = max(gh, gw) of the latest image
    (0 before any image), incremented per token. Padding (segment -1) gets 0.

    Args:
        image_mask: bool ``[B, L]``.
        segment_ids: int ``[B, L]`` sample index within the row, -1 on padding.
        image_grids: ``[num_images, 2]`` (gh, gw) in row order, or None (square grids assumed).
    """
    b, length = image_mask.shape
    pos = torch.zeros(b, 3, length, dtype=torch.long, device=image_mask.device)
    grids = image_grids.tolist() if image_grids is not None else None
    gi = 0
    for row in range(b):
        seg = segment_ids[row]
        img = image_mask[row]
        valid = seg >= 0
        # runs of (segment, modality): key = 2 * segment + is_image
        key = seg.long() * 2 + img.long()
        cur_seg, nxt = None, 0
        for s, e in _runs(valid, key):
            if int(seg[s]) != cur_seg:
                cur_seg, nxt = int(seg[s]), 0
            n = e - s
            if bool(img[s]):
                if grids is not None:
                    if gi >= len(grids):
                        raise ValueError(f"image_grid_thw lists {len(grids)} images but the "
                                         "image_mask holds more image runs.")
                    gh, gw = int(grids[gi][0]), int(grids[gi][1])
                else:
                    gh = gw = int(math.isqrt(n))
                    if gh * gw != n:
                        raise ValueError(f"an image run of {n} tokens is not square; pass "
                                         "image_grid_thw or position_ids.")
                if gh * gw != n:
                    raise ValueError(f"image {gi} has grid {gh}x{gw} = {gh * gw} patches but "
                                     f"its run in the image_mask has {n} tokens.")
                gi += 1
                r = torch.arange(gh, device=pos.device).repeat_interleave(gw)
                c = torch.arange(gw, device=pos.device).repeat(gh)
                pos[row, 1, s:e], pos[row, 2, s:e] = r, c
                nxt = max(nxt, gh, gw)
            else:
                t = torch.arange(nxt, nxt + n, device=pos.device)
                pos[row, :, s:e] = t
                nxt += n
    return pos


def build_prefix_lm_mask(image_mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, L, L]`` (True = may attend), per row.

    Text attends causally to everything earlier in its own sample (its image and earlier
    text); image tokens attend bidirectionally to the image tokens of their own sample; nothing
    crosses samples (``segment_ids``); padding (segment -1) attends only to itself so no row is
    empty (its output is ignored).
    """
    length = image_mask.shape[1]
    idx = torch.arange(length, device=image_mask.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    same = (seg_q == seg_k) & (seg_k >= 0)
    both_img = image_mask[:, :, None] & image_mask[:, None, :]
    allowed = same & (causal | both_img)
    allowed = allowed | (torch.eye(length, dtype=torch.bool, device=image_mask.device)[None]
                         & (segment_ids < 0)[:, :, None])
    return allowed[:, None]


def _decode_mask(shape: tuple[int, int], past_len: int, attention_mask: Optional[torch.Tensor],
                 segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, 1, L, past + L]`` mask of new text tokens over cached + new keys (causal, no pads).

    With ``segment_ids`` (``[B, L]``, -1 = padding) the new tokens are several independent
    continuations of the cached prefix packed in one row (zero-shot candidates): a token sees
    every valid cached key and the earlier tokens of its own segment only, so one pass scores
    many continuations without copying the prefix's keys once per continuation.
    """
    b, length = shape
    key_valid = (attention_mask.bool() if attention_mask is not None else
                 torch.ones(b, past_len + length, dtype=torch.bool))
    if key_valid.shape[1] != past_len + length:
        raise ValueError(f"attention_mask covers {key_valid.shape[1]} positions; with a cache of "
                         f"{past_len} it must cover {past_len + length}.")
    q_idx = torch.arange(past_len, past_len + length, device=key_valid.device)
    k_idx = torch.arange(past_len + length, device=key_valid.device)
    mask = (k_idx[None, :] <= q_idx[:, None])[None] & key_valid[:, None, :]
    if segment_ids is not None:
        seg = segment_ids.long().to(key_valid.device)
        if tuple(seg.shape) != (b, length):
            raise ValueError(f"segment_ids {tuple(seg.shape)} must be [B={b}, L={length}] "
                             "(the new tokens) when decoding with a KV cache.")
        own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        mask = torch.cat([mask[:, :, :past_len], mask[:, :, past_len:] & own], dim=2)
    return mask[:, None]


def normalize_position_ids(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, 3, L]`` from ``[B, 3, L]`` or ``[3, B, L]`` (the latter only when B != 3)."""
    if position_ids.dim() != 3:
        raise ValueError(f"position_ids must be [B, 3, L], got {tuple(position_ids.shape)}.")
    if position_ids.shape[0] == batch and position_ids.shape[1] == 3:
        return position_ids
    if position_ids.shape[0] == 3 and position_ids.shape[1] == batch:
        return position_ids.transpose(0, 1)
    raise ValueError(f"position_ids {tuple(position_ids.shape)} is neither [B={batch}, 3, L] nor "
                     f"[3, B={batch}, L].")


# --------------------------------------------------------------------------- modules
class GenLIPVisionEmbeddings(nn.Module):
    """Conv2d(C, E, p, stride p) patch embedding, applied as a linear on flattened patches."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, C*p*p]`` → ``[N, E]`` (same as the conv on each 16×16 patch)."""
        w = self.patch_embedding.weight
        return F.linear(patches.to(w.dtype), w.flatten(1), self.patch_embedding.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX half rotation: cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GenLIPRotaryEmbedding(nn.Module):
    """Interleaved MRoPE: cos/sin ``[B, L, hd]`` from (t, h, w) ids
    (docs/reference-architecture.md).

    Frequency channel i takes the H position if i % 3 == 1 (i < 3·section[1]), the W position if
    i % 3 == 2 (i < 3·section[2]), else T. ``inv_freq`` is recomputed on the fly (no buffer:
    a non-persistent buffer would be left uninitialised by meta-device ``from_pretrained``).
    """

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = float(config.rope_theta)
        self.section = list(config.mrope_section)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = position_ids.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=dev,
                                                      dtype=torch.int64).float() / self.head_dim))
        freqs = position_ids.transpose(0, 1).float()[..., None] * inv_freq  # [3, B, L, hd/2]
        out = freqs[0].clone()
        for dim, offset in ((1, 1), (2, 2)):
            idx = slice(offset, self.section[dim] * 3, 3)
            out[..., idx] = freqs[dim][..., idx]
        emb = torch.cat((out, out), dim=-1)
        return emb.cos(), emb.sin()


class GenLIPAttention(nn.Module):
    """Multi-head attention with an elementwise sigmoid output gate (Qwen "G1").

    ``q_proj`` is ``[2E, E]``: rows ``[0:E]`` the query, rows ``[E:2E]`` the gate, each head-major
    (``[E, E]``, no gate, with ``gated_attention=False``). With ``qk_layernorm`` a LayerNorm over
    the head dim (``q_norm``, ``k_norm``, shared by the heads) normalises queries and keys before
    RoPE, as megatron-core's ``qk_layernorm``.
    """

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        e = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.gated = config.gated_attention
        self.q_proj = nn.Linear(e, 2 * e if self.gated else e)
        self.k_proj = nn.Linear(e, e)
        self.v_proj = nn.Linear(e, e)
        self.out_proj = nn.Linear(e, e)
        self.q_norm = self.k_norm = None
        if getattr(config, "qk_layernorm", False):
            self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``(q, k, v, gate)``: q and k ``[B, nh, L, hd]`` after QK-norm and MRoPE, the gate
        ``[B, L, E]`` or None. Public so that attention probes see exactly these q/k."""
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q = self.q_proj(x)
        gate = None
        if self.gated:
            q, gate = q.chunk(2, dim=-1)
        q = q.reshape(shape).transpose(1, 2)  # [B, nh, L, hd]
        k = self.k_proj(x).reshape(shape).transpose(1, 2)
        v = self.v_proj(x).reshape(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v, gate

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache_update: Optional[Callable] = None):
        """``cache_update(k, v) -> (k_all, v_all)`` prepends cached keys/values (KV cache)."""
        b, length, e = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q, k, v, gate = self.project(x, cos, sin)
        if cache_update is not None:
            k, v = cache_update(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2)  # [B, L, nh, hd]
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(shape))
        return self.out_proj(out.reshape(b, length, e))


class GenLIPMLP(nn.Module):
    """SwiGLU with biases: ``fc2(silu(gate_fc(x)) * fc1(x))``."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.gate_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.gate_fc(x)) * self.fc1(x))


class GenLIPLayerScale(nn.Module):
    """``x * lambda1`` with ``lambda1`` of shape [E]."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class GenLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + LS1(attn(LN1 x)); x + LS2(mlp(LN2 x)). (DropPath is train-only.)"""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        e, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(e, eps=eps)
        self.self_attn = GenLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(e, eps=eps)
        self.mlp = GenLIPMLP(config)
        use_ls = config.ls_init_value > 1e-6
        self.layer_scale1 = GenLIPLayerScale(e, config.ls_init_value) if use_ls else nn.Identity()
        self.layer_scale2 = GenLIPLayerScale(e, config.ls_init_value) if use_ls else nn.Identity()

    def forward(self, x, cos, sin, mask, cache_update=None):
        h = self.self_attn(self.layer_norm1(x), cos, sin, mask, cache_update)
        x = x + self.layer_scale1(h)
        x = x + self.layer_scale2(self.mlp(self.layer_norm2(x)))
        return x


class GenLIPEncoder(nn.Module):
    """The stack of blocks (``visual.layers.{i}`` in the checkpoint)."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(GenLIPEncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))


class GenLIPKVCache:
    """Per-layer (key, value) ``[B, nh, L, hd]`` after RoPE, for incremental decoding.

    Same ``update``/``get_seq_length`` interface as transformers' ``DynamicCache`` (which
    ``generate()`` passes instead); ``next_position`` ([B], set by the model) is the MRoPE
    position of each row's next token.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.next_position: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions."""
        return self.layers[layer_idx][0].shape[2] if len(self.layers) > layer_idx else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values of layer ``layer_idx``; returns the layer's whole cache."""
        if layer_idx < len(self.layers):
            pk, pv = self.layers[layer_idx]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            self.layers[layer_idx] = (k, v)
        else:
            self.layers.append((k, v))
        return k, v

    def branch(self) -> "GenLIPKVCache":
        """A cache over the same tensors (no copy); decoding on it leaves this one as it is,
        because ``update`` concatenates into new tensors."""
        out = GenLIPKVCache()
        out.layers = list(self.layers)
        out.next_position = self.next_position.clone() if self.next_position is not None else None
        return out

    def select(self, rows: torch.Tensor) -> "GenLIPKVCache":
        """Keep only the given batch rows (drop finished sequences)."""
        out = GenLIPKVCache()
        out.layers = [(k[rows], v[rows]) for k, v in self.layers]
        out.next_position = self.next_position[rows] if self.next_position is not None else None
        return out


@dataclass
class GenLIPOutput(ModelOutput):
    """Outputs of :class:`GenLIPModel`.

    Attributes:
        loss: mean next-token CE over labels != -100 (labels unshifted, as in the reference).
        logits: ``[B, L, V]`` (None when ``return_logits=False``).
        last_hidden_state: ``ln_post`` output ``[B, L, E]`` (the encoder feature).
        past_key_values: the KV cache when ``use_cache``.
        hidden_states: per-layer inputs plus the final block output when requested.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional[object] = None
    hidden_states: Optional[tuple] = None


def _grid_list(grids: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in grids.tolist()]


class GenLIPPreTrainedModel(PreTrainedModel):
    """Init rules of the reference ``_init_weights`` (docs/reference-architecture.md); guarded
    in transformers 5.

    Also the image-only pass shared by :class:`GenLIPVisionModel` and :class:`GenLIPModel`
    (both own ``vision_embeddings``, ``visual``, ``rotary_emb`` and ``ln_post``).
    """

    config_class = GenLIPConfig
    base_model_prefix = ""
    _no_split_modules = ["GenLIPEncoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, GenLIPAttention):
            for lin in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                _init.xavier_uniform_(lin.weight)
                _init.zeros_(lin.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, GenLIPLayerScale):
            _init.constant_(module.lambda1, module.init_value)

    def _image_pass(self, patches: torch.Tensor, grids: list[tuple[int, int]],
                    output_hidden_states: bool = False):
        """Image-only pass: each image one padded row, full attention inside it, (0, r, c).

        Returns:
            (``ln_post`` output ``[n, Lmax, E]``, valid ``[n, Lmax]`` bool, per-layer hidden
            states ``[n, Lmax, E]`` (embeddings, each block's output, the last one through
            ``ln_post``) or None).
        """
        cfg = self.config
        sizes = [h * w for h, w in grids]
        if sum(sizes) != patches.shape[0]:
            raise ValueError(f"image_grid_thw describes {sum(sizes)} patches but pixel_values "
                             f"hold {patches.shape[0]}.")
        n, longest = len(sizes), max(sizes)
        dev = patches.device
        valid = torch.arange(longest, device=dev)[None, :] < \
            torch.tensor(sizes, device=dev)[:, None]
        pos = torch.zeros(n, 3, longest, dtype=torch.long, device=dev)
        for i, (gh, gw) in enumerate(grids):
            pos[i, 1, : gh * gw] = torch.arange(gh, device=dev).repeat_interleave(gw)
            pos[i, 2, : gh * gw] = torch.arange(gw, device=dev).repeat(gh)
        embeds = torch.zeros(n, longest, cfg.hidden_size, dtype=self.ln_post.weight.dtype,
                             device=dev)
        embeds[valid] = self.vision_embeddings(patches).to(embeds.dtype)
        mask = build_prefix_lm_mask(valid, torch.where(valid, 0, -1))
        cos, sin = self.rotary_emb(pos)
        hidden, states = embeds, [embeds] if output_hidden_states else None
        for layer in self.visual.layers:
            hidden = layer(hidden, cos, sin, mask)
            if states is not None:
                states.append(hidden)
        feats = self.ln_post(hidden)
        if states is not None:   # transformers' convention: the last entry is the final output
            states[-1] = feats
        return feats, valid, states


class GenLIPVisionModel(GenLIPPreTrainedModel):
    """GenLIP as a vision tower for multimodal LLMs (what ``--vision-only`` exports load as).

    An image-only pass: bidirectional attention inside each image (never across images), MRoPE
    positions (0, row, col) per image as in training, and the final LayerNorm (``ln_post``)
    output as the feature, as the paper feeds an MLLM. Inputs like Qwen2-VL's vision tower:

    - packed patches ``[N, C*p*p]`` of several images + ``image_grid_thw`` ``[n, 3]`` (what
      ``GenLIPImageProcessor`` returns) → ``last_hidden_state`` packed ``[N, E]``;
    - padded patches ``[n, Lmax, C*p*p]`` + ``image_grid_thw`` → ``[n, Lmax, E]`` (padding rows
      are zero);
    - images ``[B, C, H, W]`` (already normalised) → ``[B, H/p * W/p, E]``.

    ``pooler_output`` is the mean over each image's patches ``[n, E]`` (GenLIP has no CLS
    token). ``hidden_states`` (``output_hidden_states=True``) holds ``num_hidden_layers + 1``
    tensors laid out like ``last_hidden_state``: the patch embeddings, then every block's
    output, the last one after ``ln_post`` (transformers' language-model convention), so
    ``hidden_states[-1]`` is ``last_hidden_state``, the encoder feature GenLIP was trained to
    give (what LLaVA takes with ``vision_feature_layer=-1``), and ``[-2]`` the penultimate block.

    In composite models (LLaVA builds its tower with ``AutoModel.from_config``) call
    :func:`register` once first; docs/hf-mllm.md has the recipes.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: GenLIPConfig, _shared_from: Optional[nn.Module] = None):
        super().__init__(config)
        src = _shared_from
        self.vision_embeddings = src.vision_embeddings if src else GenLIPVisionEmbeddings(config)
        self.visual = src.visual if src else GenLIPEncoder(config)
        self.rotary_emb = src.rotary_emb if src else GenLIPRotaryEmbedding(config)
        self.ln_post = src.ln_post if src else nn.LayerNorm(config.hidden_size,
                                                            eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                output_hidden_states=False, return_dict: bool = True,
                grid_thw: Optional[torch.Tensor] = None, **kwargs):
        """Encode images; see the class docstring for the input layouts and outputs.

        ``grid_thw`` is Qwen2-VL's name for ``image_grid_thw``. ``output_hidden_states`` may be
        a layer index or list (LLaVA passes its ``vision_feature_layer``): any such request,
        index 0 included, returns every hidden state.
        """
        if kwargs:
            raise ValueError(f"GenLIPVisionModel (the vision tower; what a vision-only export "
                             f"loads as) takes pixel_values and image_grid_thw, not "
                             f"{sorted(kwargs)}.")
        if grid_thw is not None:
            if image_grid_thw is not None:
                raise ValueError("give image_grid_thw or its Qwen2-VL name grid_thw, not both.")
            image_grid_thw = grid_thw
        output_hidden_states = output_hidden_states is not None and \
            output_hidden_states is not False
        cfg = self.config
        d = cfg.num_channels * cfg.patch_size ** 2
        padded = pixel_values.dim() == 3 and pixel_values.shape[-1] == d
        if padded:
            if image_grid_thw is None:
                raise ValueError("padded pixel_values [n, Lmax, C*p*p] need image_grid_thw.")
            grids = _grid_list(torch.as_tensor(image_grid_thw).reshape(len(pixel_values), -1)
                               [:, -2:])
            keep = torch.arange(pixel_values.shape[1], device=pixel_values.device)[None, :] < \
                torch.tensor([h * w for h, w in grids], device=pixel_values.device)[:, None]
            patches = pixel_values[keep]
        else:
            patches, g = normalize_pixel_values(pixel_values, image_grid_thw, cfg.num_channels,
                                                cfg.patch_size)
            if g is None:
                raise ValueError("patch pixel_values [N, C*p*p] need image_grid_thw [n, 3].")
            grids = _grid_list(g)
        feats, valid, states = self._image_pass(patches, grids, output_hidden_states)
        pooled = (feats * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).to(feats.dtype)
        packed = pixel_values.dim() == 2 or (pixel_values.dim() == 4 and tuple(
            pixel_values.shape[-2:]) == (cfg.patch_size, cfg.patch_size))

        def layout(x: torch.Tensor) -> torch.Tensor:   # packed [N, E] or zero-padded [n, L, E]
            if packed:
                return x[valid]
            x = x * valid[..., None]
            return F.pad(x, (0, 0, 0, pixel_values.shape[1] - x.shape[1])) if padded else x

        out = BaseModelOutputWithPooling(
            last_hidden_state=layout(feats), pooler_output=pooled,
            hidden_states=tuple(layout(h) for h in states) if states is not None else None)
        return out if return_dict else out.to_tuple()

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """One ``[gh * gw, E]`` ``ln_post`` feature tensor per image (see GenLIPModel)."""
        return _encode_list(self, pixel_values, image_grid_thw)


def _encode_list(model: GenLIPPreTrainedModel, pixel_values, image_grid_thw):
    cfg = model.config
    patches, grids = normalize_pixel_values(pixel_values, image_grid_thw, cfg.num_channels,
                                            cfg.patch_size)
    if grids is None:
        raise ValueError("encode_images needs image_grid_thw for patch inputs.")
    grids = _grid_list(grids)
    feats, _, _ = model._image_pass(patches, grids)
    return [feats[i, : h * w] for i, (h, w) in enumerate(grids)]


class GenLIPModel(GenLIPPreTrainedModel):
    """The GenLIP transformer with its LM head (state-dict keys as the released checkpoints).

    ``model(input_ids=..., pixel_values=...)`` runs ``[image | text]`` rows (logits, loss);
    ``model(pixel_values=...)`` without ``input_ids`` is the vision tower
    (:class:`GenLIPVisionModel` output); ``model.vision_model`` is that tower sharing these
    weights.
    """

    def __init__(self, config: GenLIPConfig):
        super().__init__(config)
        if config.num_key_value_heads not in (None, config.num_attention_heads):
            raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must equal "
                             f"num_attention_heads ({config.num_attention_heads}): GenLIP is MHA.")
        if not config.use_swiglu_ffn:
            raise ValueError("use_swiglu_ffn=false (the GELU MLP) is not supported; every "
                             "released GenLIP model uses SwiGLU.")
        self.vision_embeddings = GenLIPVisionEmbeddings(config)
        self.visual = GenLIPEncoder(config)
        self.rotary_emb = GenLIPRotaryEmbedding(config)
        self.ln_post = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.vision_only:
            t = config.text_embed_dim or config.hidden_size
            self.embeddings = nn.Embedding(config.vocab_size, t)
            if t != config.hidden_size:
                self.in_proj = nn.Linear(t, config.hidden_size)
                self.proj = nn.Linear(config.hidden_size, t)
            else:
                self.in_proj = self.proj = nn.Identity()
            self.lm_head = nn.Linear(t, config.vocab_size, bias=False)
        self.post_init()

    @property
    def vision_model(self) -> GenLIPVisionModel:
        """The vision tower (:class:`GenLIPVisionModel`) over this model's own modules."""
        vm = self.__dict__.get("_vision_model")
        if vm is None:   # kept out of nn.Module registration: no duplicate state-dict keys
            vm = GenLIPVisionModel(self.config, _shared_from=self)
            self.__dict__["_vision_model"] = vm
        return vm.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``; a missing ``text_embed_dim`` (the released
        configs omit it) is read from the local ``embeddings.weight`` shape first."""
        config = kwargs.get("config")
        # duck-typed: AutoConfig may load configuration_genlip under another module name
        if getattr(config, "model_type", None) == "genlip" and \
                getattr(config, "text_embed_dim", 0) is None and not config.vision_only:
            width = _local_embedding_width(pretrained_model_name_or_path)
            if width is not None:
                config.text_embed_dim = width
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ----------------------------------------------------------------- embedding
    def _embed(self, input_ids, pixel_values, image_grid_thw, image_mask, decoding: bool):
        cfg = self.config
        grids = None
        dtype = self.ln_post.weight.dtype
        if image_mask is None:
            if decoding or cfg.image_token_id is None:  # generated tokens are always text
                image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            else:
                image_mask = input_ids == cfg.image_token_id
        image_mask = image_mask.bool()
        if cfg.vision_only:
            if not bool(image_mask.all()):
                raise ValueError("this is a vision-only export (no text embedding); pass image "
                                 "tokens only, or use encode_images().")
            embeds = torch.zeros(*input_ids.shape, cfg.hidden_size, dtype=dtype,
                                 device=input_ids.device)
        else:
            embeds = self.in_proj(self.embeddings(input_ids.masked_fill(image_mask, 0)))
        n_img = int(image_mask.sum())
        if pixel_values is not None:
            patches, grids = normalize_pixel_values(pixel_values, image_grid_thw,
                                                    cfg.num_channels, cfg.patch_size)
            if patches.shape[0] != n_img:
                raise ValueError(f"pixel_values hold {patches.shape[0]} patches but the "
                                 f"image_mask marks {n_img} image positions.")
            embeds = embeds.clone()
            embeds[image_mask] = self.vision_embeddings(patches).to(embeds.dtype)
        elif n_img:
            raise ValueError(f"image_mask marks {n_img} image positions but no pixel_values "
                             "were given.")
        elif image_grid_thw is not None:
            grids = image_grid_thw.reshape(-1, image_grid_thw.shape[-1])[:, -2:]
        return embeds, image_mask, grids

    # ----------------------------------------------------------------- trunk
    def forward(self, input_ids: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                past_key_values=None,
                use_cache: bool = False, return_logits: bool = True,
                logits_to_keep: int = 0,
                output_hidden_states: bool = False, return_dict: bool = True,
                **unused):
        """Run the model on ``[B, L]`` rows of ``[image patches | text]`` samples.

        Without ``input_ids`` it is the vision tower: ``model(pixel_values=x,
        image_grid_thw=g)`` returns :class:`GenLIPVisionModel`'s ``BaseModelOutputWithPooling``.

        Args:
            input_ids: ``[B, L]``; values at image positions are ignored.
            pixel_values: patches ``[N, C*p*p]`` / ``[N, C, p, p]`` in row order, or images
                ``[B, C, H, W]``.
            image_grid_thw: ``[num_images, 3]`` (1, gh, gw) (or ``[num_images, 2]``), needed to
                build position ids for non-square images.
            image_mask: bool ``[B, L]`` image positions; default ``input_ids == image_token_id``
                (no image positions when decoding with a cache).
            position_ids: MRoPE ids ``[B, 3, L]``; built from the grids when None (with a
                cache: continued from the cache's ``next_position``).
            attention_mask: ``[B, L]`` 1 = real token, 0 = padding (any side); with a cache,
                ``[B, past + L]``.
            segment_ids: ``[B, L]`` sample index per packed row, -1 = padding; overrides
                ``attention_mask`` for packed rows. With a cache: independent continuations
                of the cached prefix packed in each row (each sees the cache and its own
                earlier tokens; ``position_ids`` required).
            labels: ``[B, L]`` unshifted targets (-100 = ignore); the loss shifts them.
            past_key_values / use_cache: incremental decoding of text tokens (one sample/row);
                a :class:`GenLIPKVCache` or a transformers ``DynamicCache`` (``generate()``).
            return_logits: False skips ``proj``/``lm_head`` (features only).
            logits_to_keep: > 0 computes logits for the last this-many positions only.
        """
        if unused:
            raise TypeError(f"GenLIPModel.forward got unexpected arguments {sorted(unused)}.")
        if input_ids is None:
            if pixel_values is None:
                raise ValueError("give input_ids (captioning / LM) or pixel_values alone "
                                 "(vision tower).")
            return self.vision_model(pixel_values, image_grid_thw, output_hidden_states,
                                     return_dict)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        embeds, image_mask, grids = self._embed(input_ids, pixel_values, image_grid_thw,
                                                image_mask, decoding=past_len > 0)
        b = input_ids.shape[0]
        cache = past_key_values if past_key_values is not None else \
            (GenLIPKVCache() if use_cache else None)
        if past_len:
            mask = _decode_mask(input_ids.shape, past_len, attention_mask, segment_ids)
            if position_ids is None and segment_ids is not None:
                raise ValueError("position_ids are required with segment_ids on a KV cache "
                                 "(each packed continuation starts at the cache's next position).")
            if position_ids is None:
                nxt = getattr(cache, "next_position", None)
                if nxt is None:
                    raise ValueError("position_ids are required when decoding with a KV cache "
                                     "this model did not fill.")
                position_ids = (nxt[:, None] + torch.arange(input_ids.shape[1],
                                                            device=nxt.device))[:, None]
                position_ids = position_ids.expand(-1, 3, -1)
            valid = (torch.ones_like(input_ids, dtype=torch.bool) if segment_ids is None
                     else segment_ids.to(input_ids.device) >= 0)
        else:
            if segment_ids is None:  # one sample per row; attention_mask marks padding
                segment_ids = (torch.zeros_like(input_ids, dtype=torch.long)
                               if attention_mask is None else
                               torch.where(attention_mask.bool(), 0, -1))
            segment_ids = segment_ids.long()
            valid = segment_ids >= 0
            mask = build_prefix_lm_mask(image_mask, segment_ids)
            if position_ids is None:
                position_ids = build_position_ids(image_mask, segment_ids, grids)
        position_ids = normalize_position_ids(position_ids, b).to(input_ids.device)
        if cache is not None:  # next token's position: one past the largest so far per row
            seen = position_ids.amax(dim=1).masked_fill(~valid, -1).amax(dim=1) + 1
            prev = getattr(cache, "next_position", None) if past_len else None
            cache.next_position = seen if prev is None else torch.maximum(prev, seen)
        cos, sin = self.rotary_emb(position_ids)
        hidden = embeds
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.visual.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            update = (lambda k, v, i=i: cache.update(k, v, i)) if cache is not None else None
            hidden = layer(hidden, cos, sin, mask, update)
        if all_hidden is not None:
            all_hidden.append(hidden)
        feats = self.ln_post(hidden)
        logits = loss = None
        if return_logits:
            if self.config.vision_only:
                raise ValueError("this is a vision-only export (no lm_head); call with "
                                 "return_logits=False or use encode_images().")
            logits = self.lm_head(self.proj(feats[:, -logits_to_keep:] if logits_to_keep
                                            else feats))
            if labels is not None and not logits_to_keep:
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return GenLIPOutput(loss=loss, logits=logits, last_hidden_state=feats,
                            past_key_values=cache,
                            hidden_states=tuple(all_hidden) if all_hidden is not None else None)

    # ----------------------------------------------------------------- encoder use
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Vision-encoder features: ``ln_post`` output of an image-only, bidirectional pass.

        Args:
            pixel_values: images ``[B, C, H, W]``, or patches ``[N, C*p*p]`` / ``[N, C, p, p]``
                of several images concatenated in order (then ``image_grid_thw`` is required).
            image_grid_thw: ``[num_images, 3]`` (1, gh, gw) or ``[num_images, 2]``.

        Returns:
            one ``[gh * gw, E]`` tensor per image (patch features in raster order).
        """
        return _encode_list(self, pixel_values, image_grid_thw)

    def text_logits(self, features: torch.Tensor) -> torch.Tensor:
        """LM-head logits ``[..., V]`` of ``ln_post`` features ``[..., E]`` (patch readout)."""
        if self.config.vision_only:
            raise ValueError("this is a vision-only export (no lm_head).")
        return self.lm_head(self.proj(features))


class GenLIPForCausalLM(GenLIPModel, GenerationMixin):
    """:class:`GenLIPModel` with transformers' ``generate()`` (the same weights and keys).

    ``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`` loads it; feed it
    what ``GenLIPProcessor`` returns (``input_ids`` with ``image_token_id`` at the image
    positions, left-padded, ``attention_mask``, ``pixel_values``, ``image_grid_thw``). One
    image per row. Decoding uses a KV cache; MRoPE text positions continue per row from the
    cache (t = h = w = max(gh, gw) + k), so greedy output equals ``genlip_megatron.probes``.
    """

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None,
                                      attention_mask=None, pixel_values=None,
                                      image_grid_thw=None, image_mask=None, use_cache=True,
                                      **kwargs):
        """Prefill: the whole prompt with the image; then only the new tokens."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask,
                  "past_key_values": past_key_values, "use_cache": use_cache,
                  "logits_to_keep": 1}
        if past == 0:
            inputs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          image_mask=image_mask)
        return inputs


def _local_embedding_width(path) -> Optional[int]:
    """``embeddings.weight.shape[1]`` from a local checkpoint's safetensors header, or None."""
    import json
    import os
    import struct

    path = str(path)
    files = [os.path.join(path, "model.safetensors")]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            name = json.load(fh)["weight_map"].get("embeddings.weight")
        files = [os.path.join(path, name)] if name else []
    for f in files:
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                entry = json.loads(fh.read(n)).get("embeddings.weight")
            if entry:
                return int(entry["shape"][1])
    return None


def register() -> None:
    """Register this file's GenLIP classes with transformers' Auto classes (idempotent).

    Composite models build their parts from configs without ``trust_remote_code``: LLaVA's
    tower is ``AutoModel.from_config(config.vision_config)``, and ``LlavaConfig`` rebuilds its
    ``vision_config`` from ``model_type`` when loaded. After this one call::

        AutoConfig "genlip"            -> GenLIPConfig
        AutoModel(GenLIPConfig)        -> GenLIPVisionModel (the tower composite models want)
        AutoModelForCausalLM           -> GenLIPForCausalLM
        AutoImageProcessor / Processor -> GenLIPImageProcessor / GenLIPProcessor

    and ``AutoConfig.from_pretrained(export)`` (no ``trust_remote_code``) returns this file's
    ``GenLIPConfig``, the class ``AutoModel.from_config`` maps. Call it from the module that
    will be used: ``genlip_megatron.convert.hf.register()`` with this package installed, or,
    from an export alone, ``get_class_from_dynamic_module("modeling_genlip.register",
    export_dir)()`` (``transformers.dynamic_module_utils``). A later call from another copy of
    these files re-points the names to that copy's classes.
    """
    AutoConfig.register(GenLIPConfig.model_type, GenLIPConfig, exist_ok=True)
    AutoModel.register(GenLIPConfig, GenLIPVisionModel, exist_ok=True)
    AutoModelForCausalLM.register(GenLIPConfig, GenLIPForCausalLM, exist_ok=True)
    try:   # transformers >= 5 names image-processor backends
        AutoImageProcessor.register(GenLIPConfig, image_processor_classes={
            "pil": GenLIPImageProcessor}, exist_ok=True)
    except TypeError:   # pragma: no cover - transformers 4.x
        AutoImageProcessor.register(GenLIPConfig, slow_image_processor_class=GenLIPImageProcessor,
                                    exist_ok=True)
    AutoProcessor.register(GenLIPConfig, GenLIPProcessor, exist_ok=True)


def stack_grids(grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[[gh, gw], ...]`` → ``[num_images, 3]`` (1, gh, gw)."""
    return torch.tensor([[1, int(h), int(w)] for h, w in grids], dtype=torch.long)


__all__ = ["GenLIPConfig", "GenLIPModel", "GenLIPVisionModel", "GenLIPForCausalLM",
           "GenLIPOutput", "GenLIPKVCache", "patchify", "build_position_ids",
           "build_prefix_lm_mask", "stack_grids", "register"]

"""Independent plain-PyTorch GenLIP forward, written from docs/reference-architecture.md.

Follows YanFangCS/GenLIP ``genlip_modeling.py`` as described in docs/reference-architecture.md
(module tree, block, gated SDPA
attention, interleaved MRoPE, Conv2d patch embedding, masked_scatter merge, flex prefix-LM mask,
shifted mean CE) and uses the HF state-dict key names of its HF checkpoint format section. It does
not import
``genlip_megatron``; tests map the megatron model's weights into it.

Fully masked query rows (padding) output 0, as flex_attention does in the reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RefRotary(nn.Module):
    """GenLIPRotaryEmbeddings with interleaved MRoPE (docs/reference-architecture.md)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]):
        super().__init__()
        self.mrope_section = list(mrope_section)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                    / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor):
        """position_ids ``[3, B, L]`` → cos, sin ``[B, L, head_dim]`` (fp32)."""
        inv = self.inv_freq[None, None, :, None].float().expand(3, position_ids.shape[1], -1, 1)
        pos = position_ids[:, :, None, :].float()
        freqs = (inv @ pos).transpose(2, 3)                      # [3, B, L, D/2]
        freqs_t = freqs[0].clone()
        for dim, offset in enumerate((1, 2), start=1):
            length = self.mrope_section[dim] * 3
            idx = slice(offset, length, 3)
            freqs_t[..., idx] = freqs[dim, ..., idx]
        emb = torch.cat((freqs_t, freqs_t), dim=-1)
        return emb.cos(), emb.sin()


class RefAttention(nn.Module):
    """GenLIPSdpaAttention: q_proj holds [query | gate] rows; gate = sigmoid, before out_proj."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, 2 * embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, cos, sin, allowed):
        bs, length, embed = x.shape
        q, gate = self.q_proj(x).chunk(2, dim=-1)
        shape = (bs, length, self.num_heads, self.head_dim)
        q, gate = q.reshape(shape), gate.reshape(shape)
        k, v = self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))            # [B, n, L, d]
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)        # empty rows → 0 (flex)
        out = (probs @ v).transpose(1, 2)                            # [B, L, n, d]
        out = out * torch.sigmoid(gate)
        return self.out_proj(out.reshape(bs, length, embed))


class RefMLP(nn.Module):
    """SwiGLU with bias: fc2(silu(gate_fc(x)) * fc1(x))."""

    def __init__(self, embed_dim: int, inter: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, inter)
        self.gate_fc = nn.Linear(embed_dim, inter)
        self.fc2 = nn.Linear(inter, embed_dim)

    def forward(self, x):
        return self.fc2(F.silu(self.gate_fc(x)) * self.fc1(x))


class RefLayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.lambda1


class RefLayer(nn.Module):
    """GenLIPEncoderLayer (pre-norm, LayerScale, DropPath = identity at eval)."""

    def __init__(self, embed_dim, heads, inter, eps, ls_init):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(embed_dim, eps=eps)
        self.self_attn = RefAttention(embed_dim, heads)
        self.layer_scale1 = RefLayerScale(embed_dim, ls_init)
        self.layer_norm2 = nn.LayerNorm(embed_dim, eps=eps)
        self.mlp = RefMLP(embed_dim, inter)
        self.layer_scale2 = RefLayerScale(embed_dim, ls_init)

    def forward(self, h, cos, sin, allowed):
        h = h + self.layer_scale1(self.self_attn(self.layer_norm1(h), cos, sin, allowed))
        return h + self.layer_scale2(self.mlp(self.layer_norm2(h)))


class RefEncoder(nn.Module):
    def __init__(self, num_layers, *args):
        super().__init__()
        self.layers = nn.ModuleList(RefLayer(*args) for _ in range(num_layers))


class RefVisionEmbeddings(nn.Module):
    def __init__(self, channels, embed_dim, patch):
        super().__init__()
        self.patch_embedding = nn.Conv2d(channels, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, patches):
        """``[N, C, p, p]`` pre-cut patches → ``[N, E]``."""
        return self.patch_embedding(patches).flatten(1)


def flex_prefix_mask(sample_ids: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
    """create_fast_flex_mask_padding as a dense ``[B, L, L]`` (True = attend).

    ``or(and(causal, same_sample), same_image)``; indicators 1 image, 0 text, -1 padding.
    """
    L = sample_ids.shape[1]
    q = torch.arange(L)[:, None]
    kv = torch.arange(L)[None, :]
    sq, sk = sample_ids[:, :, None], sample_ids[:, None, :]
    same_sample = (sq >= 0) & (sq == sk)
    iq, ik = indicators[:, :, None], indicators[:, None, :]
    same_image = (iq > 0) & (iq == ik) & same_sample
    return ((q >= kv) & same_sample) | same_image


class RefGenLIP(nn.Module):
    """GenLIPModel with HF key names (vision_embeddings, visual, ln_post, embeddings, ...)."""

    def __init__(self, *, hidden, layers, heads, inter, text_dim, vocab, mrope_section,
                 theta=10000.0, eps=1e-6, ls_init=0.1, patch=16, channels=3):
        super().__init__()
        self.vision_embeddings = RefVisionEmbeddings(channels, hidden, patch)
        self.visual = RefEncoder(layers, hidden, heads, inter, eps, ls_init)
        self.rotary_emb = RefRotary(hidden // heads, theta, mrope_section)
        self.ln_post = nn.LayerNorm(hidden, eps=eps)
        self.embeddings = nn.Embedding(vocab, text_dim)
        self.in_proj = nn.Linear(text_dim, hidden) if text_dim != hidden else nn.Identity()
        self.proj = nn.Linear(hidden, text_dim) if text_dim != hidden else nn.Identity()
        self.lm_head = nn.Linear(text_dim, vocab, bias=False)

    def hidden_states(self, input_ids, pixel_values, image_mask, position_ids, sample_ids):
        """Trunk + ln_post + proj: ``[B, L, T]``."""
        embeds = self.in_proj(self.embeddings(input_ids))
        image_embeds = self.vision_embeddings(pixel_values)
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), image_embeds)
        cos, sin = self.rotary_emb(position_ids.transpose(0, 1))    # [B,3,L] → [3,B,L]
        indicators = torch.where(sample_ids < 0, -1, image_mask.long())
        allowed = flex_prefix_mask(sample_ids, indicators)
        h = embeds
        for layer in self.visual.layers:
            h = layer(h, cos, sin, allowed)
        return self.proj(self.ln_post(h))

    def forward(self, input_ids, pixel_values, image_mask, position_ids, sample_ids,
                labels: Optional[torch.Tensor] = None):
        """Logits ``[B, L, V]`` and, with UNSHIFTED labels, the mean CE of the shifted targets."""
        hidden = self.hidden_states(input_ids, pixel_values, image_mask, position_ids,
                                    sample_ids)
        logits = self.lm_head(hidden)
        if labels is None:
            return logits, None
        shifted = labels[..., 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               shifted.reshape(-1), ignore_index=-100, reduction="mean")
        return logits, loss


# ---------------------------------------------------------------------------------------------
# Packed test batches (PackedBatch layout, genlip_megatron/data/batch.py) built by hand
# ---------------------------------------------------------------------------------------------

def make_packed_batch(rows: Sequence[Sequence[tuple[int, int, int]]], seq_len: int, vocab: int,
                      patch_dim: int = 768, seed: int = 0, prompt_len: int = 2) -> dict:
    """Packed rows of ``[image | prompt | caption]`` samples, padded to ``seq_len``.

    Args:
        rows: per row, a list of samples ``(grid_h, grid_w, text_len)``.
        seq_len: row length S.
        vocab: token ids are drawn from ``[1, vocab)``.
        patch_dim: C·p·p of one patch.
        seed: generator seed.
        prompt_len: leading text tokens per sample without loss (the "Describe..." prompt).

    Returns:
        dict with tokens, labels (shifted: target of position i), ref_labels (unshifted, as
        the reference model takes them), position_ids [B,3,S], image_mask, segment_ids (int32),
        pixel_values [N, patch_dim], grid_hw [num_images, 2].
    """
    gen = torch.Generator().manual_seed(seed)
    B = len(rows)
    tokens = torch.zeros(B, seq_len, dtype=torch.int64)
    ref_labels = torch.full((B, seq_len), -100, dtype=torch.int64)
    labels = torch.full((B, seq_len), -100, dtype=torch.int64)
    position_ids = torch.zeros(B, 3, seq_len, dtype=torch.int64)
    image_mask = torch.zeros(B, seq_len, dtype=torch.bool)
    segment_ids = torch.full((B, seq_len), -1, dtype=torch.int32)
    grids = []
    for b, samples in enumerate(rows):
        pos = 0
        for j, (gh, gw, text_len) in enumerate(samples):
            n_img = gh * gw
            end = pos + n_img + text_len
            if end > seq_len:
                raise ValueError("samples do not fit the row")
            grids.append((gh, gw))
            segment_ids[b, pos:end] = j
            image_mask[b, pos:pos + n_img] = True
            position_ids[b, 1, pos:pos + n_img] = torch.arange(gh).repeat_interleave(gw)
            position_ids[b, 2, pos:pos + n_img] = torch.arange(gw).repeat(gh)
            text = torch.randint(1, vocab, (text_len,), generator=gen)
            t0 = pos + n_img
            tokens[b, t0:end] = text
            position_ids[b, :, t0:end] = max(gh, gw) + torch.arange(text_len)
            ref_labels[b, t0 + prompt_len:end] = text[prompt_len:]
            # shifted: position i predicts token i + 1 of the same sample
            labels[b, t0 + prompt_len - 1:end - 1] = text[prompt_len:]
            pos = end
    n_patches = int(image_mask.sum())
    pixel_values = torch.rand(n_patches, patch_dim, generator=gen) * 2 - 1
    return dict(tokens=tokens, labels=labels, ref_labels=ref_labels, position_ids=position_ids,
                image_mask=image_mask, segment_ids=segment_ids, pixel_values=pixel_values,
                grid_hw=torch.tensor(grids, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# megatron (TP=1, local backend, in-memory names) → HF keys, from the documented layout
# ---------------------------------------------------------------------------------------------

def megatron_to_hf(sd: dict, *, num_layers: int, heads: int, hidden: int, ffn: int,
                   patch: int = 16, channels: int = 3) -> dict:
    """Map a TP=1 ``GenLIPModel.state_dict()`` (local backend) to the reference's HF keys.

    Layout (GenLIPModel docs): ``linear_qkv`` rows per head ``[q_h; g_h; k_h; v_h]``;
    ``linear_fc1`` rows ``[gate_fc; fc1]``; patch embedding = Conv2d weight flattened (C,ph,pw).
    """
    d = hidden // heads
    out = {
        "vision_embeddings.patch_embedding.weight":
            sd["embedding.patch_embed.weight"].reshape(hidden, channels, patch, patch),
        "vision_embeddings.patch_embedding.bias": sd["embedding.patch_embed.bias"],
        "embeddings.weight": sd["embedding.word_embeddings.weight"],
        "ln_post.weight": sd["decoder.final_layernorm.weight"],
        "ln_post.bias": sd["decoder.final_layernorm.bias"],
        "lm_head.weight": sd["output_layer.weight"],
    }
    for name in ("in_proj", "proj"):
        src = "embedding.in_proj" if name == "in_proj" else "output_proj"
        if f"{src}.weight" in sd:
            out[f"{name}.weight"], out[f"{name}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    for i in range(num_layers):
        m, h = f"decoder.layers.{i}.", f"visual.layers.{i}."
        qkv_w = sd[m + "self_attention.linear_qkv.weight"].reshape(heads, 4, d, hidden)
        qkv_b = sd[m + "self_attention.linear_qkv.bias"].reshape(heads, 4, d)
        q_w, g_w, k_w, v_w = (qkv_w[:, j].reshape(hidden, hidden) for j in range(4))
        q_b, g_b, k_b, v_b = (qkv_b[:, j].reshape(hidden) for j in range(4))
        fc1_w, fc1_b = sd[m + "mlp.linear_fc1.weight"], sd[m + "mlp.linear_fc1.bias"]
        out.update({
            h + "layer_norm1.weight": sd[m + "input_layernorm.weight"],
            h + "layer_norm1.bias": sd[m + "input_layernorm.bias"],
            h + "self_attn.q_proj.weight": torch.cat([q_w, g_w]),
            h + "self_attn.q_proj.bias": torch.cat([q_b, g_b]),
            h + "self_attn.k_proj.weight": k_w, h + "self_attn.k_proj.bias": k_b,
            h + "self_attn.v_proj.weight": v_w, h + "self_attn.v_proj.bias": v_b,
            h + "self_attn.out_proj.weight": sd[m + "self_attention.linear_proj.weight"],
            h + "self_attn.out_proj.bias": sd[m + "self_attention.linear_proj.bias"],
            h + "layer_scale1.lambda1": sd[m + "self_attn_bda.layer_scale"],
            h + "layer_norm2.weight": sd[m + "pre_mlp_layernorm.weight"],
            h + "layer_norm2.bias": sd[m + "pre_mlp_layernorm.bias"],
            h + "mlp.gate_fc.weight": fc1_w[:ffn], h + "mlp.gate_fc.bias": fc1_b[:ffn],
            h + "mlp.fc1.weight": fc1_w[ffn:], h + "mlp.fc1.bias": fc1_b[ffn:],
            h + "mlp.fc2.weight": sd[m + "mlp.linear_fc2.weight"],
            h + "mlp.fc2.bias": sd[m + "mlp.linear_fc2.bias"],
            h + "layer_scale2.lambda1": sd[m + "mlp_bda.layer_scale"],
        })
    return out

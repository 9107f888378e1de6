"""Prefix-LM attention: the mask rule, backend agreement with the dense oracle, isolation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_genlip import make_packed_batch

from genlip_megatron.model import attention as attn

# row 0: sample 0 = 2 image + 2 text, sample 1 = 1 image + 2 text, 1 padding
SEG = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]], dtype=torch.int32)
IMG = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
ROWS = [[(2, 3, 7), (0, 0, 5), (1, 2, 6), (2, 2, 0)],   # incl. text-only and image-only samples
        [(4, 2, 9), (2, 2, 12)]]


def test_mask_rule_hand_case():
    expected = torch.tensor([
        # k: 0  1  2  3  4  5  6  7
        [1, 1, 0, 0, 0, 0, 0, 0],   # image q sees its image (bidirectional), never text
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],   # text q: causal over its sample, image included
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],   # nothing crosses samples
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],   # padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(attn.prefix_lm_allowed(SEG, IMG)[0], expected)
    params = attn.build_prefix_lm_params("dense", SEG, IMG)
    assert params.qkv_format == "sbhd" and torch.equal(params.dense_mask[0, 0], ~expected)


def test_flex_mask_mod_equals_dense_rule():
    from torch.nn.attention.flex_attention import create_mask

    b = make_packed_batch(ROWS, 64, 256)
    mask_mod = attn.prefix_lm_mask_mod(b["segment_ids"], b["image_mask"])
    dense = create_mask(mask_mod, 2, None, 64, 64, device="cpu")[:, 0]
    assert torch.equal(dense, attn.prefix_lm_allowed(b["segment_ids"], b["image_mask"]))


def _core_modules(cfg):
    kwargs = dict(config=cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    dense = attn.DensePrefixLMAttention(**{**kwargs, "attn_mask_type":
                                           attn.AttnMaskType.arbitrary})
    return dense, attn.FlexPrefixLMAttention(**kwargs)


def _qkv(S, B, heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(S, B, heads, dim, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("hidden", [64, 96], ids=["head16", "head24_padded"])
def test_flex_core_attention_equals_dense(mp_state, make_config, hidden):
    cfg = make_config(hidden_size=hidden)
    dense, flex = _core_modules(cfg)
    b = make_packed_batch(ROWS, 64, 256)
    seg, img = b["segment_ids"], b["image_mask"]
    q, k, v = _qkv(64, 2, 4, hidden // 4)
    out_dense = dense(q, k, v, None, packed_seq_params=attn.build_prefix_lm_params("dense", seg,
                                                                                  img))
    out_flex = flex(q, k, v, None, packed_seq_params=attn.build_prefix_lm_params("flex", seg, img))
    assert out_flex.shape == out_dense.shape == (64, 2, hidden)
    torch.testing.assert_close(out_flex, out_dense, atol=1e-5, rtol=1e-5)
    pad = (seg < 0).transpose(0, 1)                        # [S, B]: padding outputs its own v
    torch.testing.assert_close(out_dense[pad], v.reshape(64, 2, hidden)[pad])


def _varlen_reference(q, k, v, cu_q, cu_kv, max_q, max_kv, mask_type):
    """Plain per-segment attention with TE's mask-type semantics (bottom-right causal)."""
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_kv[i], cu_kv[i + 1])
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        if nq == 0:
            continue
        allowed = torch.ones(nq, nk, dtype=torch.bool)
        if mask_type == "padding_causal_bottom_right":
            allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[qs] = torch.einsum("hqk,khd->qhd", probs, v[ks])
        assert nq <= max_q and nk <= max_kv
    return out


def test_te_two_call_decomposition_equals_dense(mp_state, make_config):
    """The TE backend's image→image / text→sample varlen split reproduces the dense mask."""
    dense, _ = _core_modules(make_config())
    b = make_packed_batch(ROWS, 64, 256)
    seg, img = b["segment_ids"], b["image_mask"]
    q, k, v = _qkv(64, 2, 4, 16, seed=1)
    index = attn.build_varlen_index(seg, img)
    assert index.cu_seqlens_image.tolist() == [0, 6, 6, 8, 12, 20, 24]
    assert index.cu_seqlens_text.tolist() == [0, 7, 12, 18, 18, 27, 39]
    assert (index.max_image, index.max_text, index.max_sample) == (8, 12, 17)
    out = attn.two_call_prefix_lm(q, k, v, index, _varlen_reference)
    expected = dense(q, k, v, None, packed_seq_params=attn.build_prefix_lm_params("dense", seg,
                                                                                 img))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cpu_varlen_equals_dense_forward_and_backward(mp_state, make_config):
    """Per-sample SDPA (incl. text-only, image-only samples and padding) = the dense oracle."""
    cfg = make_config()
    dense, _ = _core_modules(cfg)
    varlen = attn.VarlenPrefixLMAttention(config=cfg, layer_number=1, attn_mask_type=None,
                                          attention_type="self")
    b = make_packed_batch(ROWS, 64, 256)
    seg, img = b["segment_ids"], b["image_mask"]
    spans = attn.build_sample_spans(seg, img)
    assert [(i, t) for i, t in ((i, t) for _, i, t in spans.rows[1]) if i >= 0] == [(8, 9),
                                                                                     (4, 12)]
    outs, grads = [], []
    for module, backend in ((dense, "dense"), (varlen, "varlen")):
        qkv = [t.requires_grad_() for t in _qkv(64, 2, 4, 16, seed=5)]
        out = module(*qkv, None, packed_seq_params=attn.build_prefix_lm_params(backend, seg,
                                                                               img))
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in qkv])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for g_varlen, g_dense in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_varlen, g_dense, atol=1e-5, rtol=1e-5)


def test_cpu_varlen_rejects_text_before_image():
    seg = torch.tensor([[0, 0, 0, -1]], dtype=torch.int32)
    img = torch.tensor([[False, True, True, False]])
    with pytest.raises(RuntimeError, match=r"'varlen'.*\[image \| text\]"):
        attn.build_sample_spans(seg, img)


def test_varlen_index_rejects_text_before_image():
    seg = torch.tensor([[0, 0, 0]], dtype=torch.int32)
    img = torch.tensor([[False, True, True]])
    with pytest.raises(RuntimeError, match=r"\[image \| text\]"):
        attn.build_varlen_index(seg, img)


def test_flex_refuses_training_on_cpu_with_clear_error(mp_state, make_config):
    _, flex = _core_modules(make_config())
    b = make_packed_batch(ROWS, 64, 256)
    q, k, v = (t.requires_grad_() for t in _qkv(64, 2, 4, 16))
    params = attn.build_prefix_lm_params("flex", b["segment_ids"], b["image_mask"])
    with pytest.raises(RuntimeError, match="use 'dense' on CPU"):
        flex(q, k, v, None, packed_seq_params=params)


def test_backend_without_its_params_is_refused(mp_state, make_config):
    dense, _ = _core_modules(make_config())
    q, k, v = _qkv(8, 1, 4, 16)
    with pytest.raises(RuntimeError, match="PrefixLMParams"):
        dense(q, k, v, None, packed_seq_params=None)


def _logits(model, b):
    with torch.no_grad():
        return model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                     b["pixel_values"])


@pytest.fixture
def models(mp_state, make_config):
    """The same weights with the dense, the flex and the CPU varlen backend."""
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    cfg = make_config(init_std=0.2)
    dense = GenLIPMegatronModel(cfg).eval()
    others = [GenLIPMegatronModel(dataclasses.replace(cfg, prefix_attention_backend=name)).eval()
              for name in ("flex", "varlen")]
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(dense.parameters(), other.parameters()))
    return dense, *others


@pytest.mark.parametrize("backend", [1, 2], ids=["flex", "varlen"])
def test_model_backend_equals_dense(models, backend):
    b = make_packed_batch(ROWS, 64, 256, seed=2)
    torch.testing.assert_close(_logits(models[backend], b), _logits(models[0], b), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("backend", [0, 1, 2], ids=["dense", "flex", "varlen"])
def test_samples_are_isolated(models, backend):
    model = models[backend]
    b = make_packed_batch(ROWS, 64, 256, seed=4)
    base = _logits(model, b)
    seg, img = b["segment_ids"], b["image_mask"]

    # Perturb every token and pixel of sample 2 in row 0: all other positions are unchanged.
    other = dict(b)
    target = (seg == 2) & (torch.arange(2)[:, None] == 0)
    other["tokens"] = torch.where(target & ~img, (b["tokens"] + 7) % 256, b["tokens"])
    pix = b["pixel_values"].clone()
    pix[target[img]] += 0.5
    other["pixel_values"] = pix
    changed = _logits(model, other)
    assert torch.equal(changed[~target], base[~target])
    assert not torch.equal(changed[target], base[target])

    # Perturb only the text of sample 0 in row 1: its image tokens are unchanged.
    text_only = dict(b)
    row1_s0 = (seg == 0) & (torch.arange(2)[:, None] == 1)
    text_only["tokens"] = torch.where(row1_s0 & ~img, (b["tokens"] + 3) % 256, b["tokens"])
    changed = _logits(model, text_only)
    assert torch.equal(changed[row1_s0 & img], base[row1_s0 & img])
    assert not torch.equal(changed[row1_s0 & ~img], base[row1_s0 & ~img])


@pytest.mark.gpu
def test_flex_gradients_match_dense_on_gpu(mp_state, make_config):
    dense, flex = _core_modules(make_config())
    b = make_packed_batch(ROWS, 64, 256)
    seg, img = b["segment_ids"].cuda(), b["image_mask"].cuda()
    grads = []
    for module, backend in ((dense, "dense"), (flex, "flex")):
        qkv = [t.cuda().requires_grad_() for t in _qkv(64, 2, 4, 16)]
        out = module.cuda()(*qkv, None, packed_seq_params=attn.build_prefix_lm_params(
            backend, seg, img))
        out.square().sum().backward()
        grads.append([t.grad for t in qkv])
    for g_flex, g_dense in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_flex, g_dense, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_te_backend_equals_dense_on_gpu(mp_state, make_config):
    pytest.importorskip("transformer_engine")
    from genlip_megatron.model.attention_te import TEPrefixLMAttention

    cfg = make_config(transformer_impl="te", attention_backend="te", params_dtype="bf16")
    te_attn = TEPrefixLMAttention(config=cfg, layer_number=1,
                                  attn_mask_type=attn.AttnMaskType.padding,
                                  attention_type="self").cuda()
    dense, _ = _core_modules(cfg)
    b = make_packed_batch(ROWS, 64, 256)
    seg, img = b["segment_ids"].cuda(), b["image_mask"].cuda()
    q, k, v = (t.cuda().bfloat16() for t in _qkv(64, 2, 4, 16))
    out = te_attn(q, k, v, None, packed_seq_params=attn.build_prefix_lm_params("te", seg, img))
    ref = dense.cuda()(q, k, v, None, packed_seq_params=attn.build_prefix_lm_params("dense", seg,
                                                                                   img))
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

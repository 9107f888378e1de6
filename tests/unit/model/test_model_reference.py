"""GenLIPMegatronModel (megatron, TP=1) against the independent plain-PyTorch reference (fp32).

The reference (tests/reference_genlip.py) is written from docs/reference-architecture.md with HF
key names;
our weights are mapped into it with the documented layout. Packed rows hold several samples with
different image sizes; the tiny preset has text_dim (48) ≠ hidden (64), so in_proj/proj are on.
"""

from __future__ import annotations

import pytest
import torch
from reference_genlip import RefGenLIP, make_packed_batch, megatron_to_hf

ROWS = [[(2, 3, 7), (3, 3, 5), (1, 2, 6)],      # three samples, padding at the end
        [(4, 2, 9), (2, 2, 12)]]
SEQ = 48


def _reference_for(model, cfg) -> RefGenLIP:
    ref = RefGenLIP(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_attention_heads,
                    inter=cfg.ffn_hidden_size, text_dim=cfg.text_dim, vocab=cfg.vocab_size,
                    mrope_section=cfg.mrope_section, theta=cfg.rope_theta,
                    eps=cfg.layernorm_epsilon, ls_init=cfg.layerscale_init)
    sd = megatron_to_hf({k: v for k, v in model.state_dict().items() if v is not None},
                        num_layers=cfg.num_layers, heads=cfg.num_attention_heads,
                        hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size)
    missing, unexpected = ref.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return ref.eval()


@pytest.fixture
def model_and_ref(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    cfg = make_config(init_std=0.2)   # larger than 0.02 so logits are O(1)
    model = GenLIPMegatronModel(cfg).eval()
    # Perturb LayerScale/LayerNorm/biases away from their init so every tensor matters.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, _reference_for(model, cfg), cfg


def test_logits_and_loss_match_reference(model_and_ref):
    model, ref, cfg = model_and_ref
    b = make_packed_batch(ROWS, SEQ, cfg.vocab_size, seed=3)
    args = (b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"], b["pixel_values"])
    with torch.no_grad():
        logits = model(*args)                                     # [B, S, V]
        per_token = model(*args, labels=b["labels"])              # [B, S]
        ref_logits, ref_loss = ref(b["tokens"], b["pixel_values"].view(-1, 3, 16, 16),
                                   b["image_mask"], b["position_ids"], b["segment_ids"].long(),
                                   labels=b["ref_labels"])
    real = b["segment_ids"] >= 0                                  # padding differs by design
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    valid = b["labels"] != -100
    assert torch.all(per_token[~valid] == 0) and per_token.dtype == torch.float32
    loss = per_token.sum() / valid.sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert logits.std() > 0.5                                     # not a degenerate match


def test_encode_images_matches_reference_ln_post(model_and_ref):
    model, ref, cfg = model_and_ref
    grid = torch.tensor([[2, 3], [4, 4], [1, 5]])
    n = int((grid[:, 0] * grid[:, 1]).sum())
    pixels = torch.rand(n, cfg.patch_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = model.encode_images(pixels, grid)
    assert [f.shape for f in feats] == [(6, 64), (16, 64), (5, 64)]
    start = 0
    for (gh, gw), feat in zip(grid.tolist(), feats):
        patches = pixels[start:start + gh * gw]
        start += gh * gw
        pos = torch.zeros(1, 3, gh * gw, dtype=torch.long)
        pos[0, 1] = torch.arange(gh).repeat_interleave(gw)
        pos[0, 2] = torch.arange(gw).repeat(gh)
        with torch.no_grad():   # the reference run on one image alone, ln_post output
            h = ref.vision_embeddings(patches.view(-1, 3, 16, 16))[None]
            cos, sin = ref.rotary_emb(pos.transpose(0, 1))
            allowed = torch.ones(1, gh * gw, gh * gw, dtype=torch.bool)
            for layer in ref.visual.layers:
                h = layer(h, cos, sin, allowed)
            expected = ref.ln_post(h)[0]
        torch.testing.assert_close(feat, expected, atol=1e-5, rtol=1e-5)
    # Images of one call never see each other: changing the second leaves the others unchanged.
    other = pixels.clone()
    other[6:22] = torch.rand(16, cfg.patch_dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        feats2 = model.encode_images(other, grid)
    torch.testing.assert_close(feats2[0], feats[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(feats2[2], feats[2], atol=1e-6, rtol=0)
    assert (feats2[1] - feats[1]).abs().max() > 1e-3


def _loss_and_grads(model, b):
    per_token = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                      b["pixel_values"], labels=b["labels"])
    loss = per_token.sum() / (b["labels"] != -100).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_activation_recompute_is_exact(mp_state, make_config, granularity):
    """Recompute (incl. the per-forward prefix-LM params, passed by closure) changes nothing."""
    from genlip_megatron.config import ParallelConfig, RecomputeConfig
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    b = make_packed_batch(ROWS, SEQ, 256, seed=5)
    loss, grads = _loss_and_grads(GenLIPMegatronModel(make_config()).train(), b)
    recompute = RecomputeConfig(granularity=granularity, num_layers=1)
    cfg = make_config(parallel=ParallelConfig(recompute=recompute))
    loss_r, grads_r = _loss_and_grads(GenLIPMegatronModel(cfg).train(), b)
    assert torch.equal(loss, loss_r)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_bf16_model_trains_close_to_fp32(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    b = make_packed_batch(ROWS, SEQ, 256, seed=6)
    loss32, _ = _loss_and_grads(GenLIPMegatronModel(make_config()).train(), b)
    model = GenLIPMegatronModel(make_config(params_dtype="bf16")).train()
    loss16, grads16 = _loss_and_grads(model, b)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads16.values())


def test_text_only_micro_batch(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    b = make_packed_batch([[(0, 0, 20)], [(0, 0, 9), (0, 0, 11)]], 24, 256, seed=7)
    model = GenLIPMegatronModel(make_config()).eval()
    with torch.no_grad():
        a = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"], None,
                  labels=b["labels"])
        c = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                  b["pixel_values"], labels=b["labels"])
    assert b["pixel_values"].shape[0] == 0 and torch.equal(a, c)

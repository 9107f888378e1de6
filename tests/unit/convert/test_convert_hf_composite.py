"""The HF export inside transformers' own MLLM classes (LLaVA, Qwen2-VL), as docs/hf-mllm.md says.

A user with an export and transformers only: one ``register()`` call, then
``LlavaForConditionalGeneration`` builds its tower from the export's config without
``trust_remote_code``, ``LlavaProcessor`` wraps our image processor, a tiny Qwen2 trains on the
processor output unchanged, and the model round-trips through ``save_pretrained``. The Qwen2-VL
side: our packed layout is transformers' Qwen2-VL image-processor output, and
``Qwen2VLForConditionalGeneration`` trains on it with GenLIP as its ``visual``. Exports are
tiny random ones written by our converter; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from convert_testlib import TINY, random_hf_state_dict, write_hf_export
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from genlip_megatron.convert.hf.image_processing_genlip import GenLIPImageProcessor, \
    smart_resize
from genlip_megatron.convert.hf_config import image_settings

TEXT_KEYS = ("embeddings.", "in_proj.", "proj.", "lm_head.")
FIXED = {"policy": "fixed", "fixed_size": 32, "decoder": "pillow"}          # 2x2 patches
NATIVE = {"policy": "native", "min_pixels": 1024, "max_pixels": 4096, "decoder": "dali"}


@pytest.fixture(scope="module")
def auto_registry():
    """Restore transformers' Auto-class registries afterwards: register() is process-global."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    maps = (CONFIG_MAPPING, MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, IMAGE_PROCESSOR_MAPPING,
            PROCESSOR_MAPPING)
    saved = [dict(m._extra_content) for m in maps]
    yield
    for m, content in zip(maps, saved):
        m._extra_content.clear()
        m._extra_content.update(content)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny tokenizer, images, captions, export root) shared by the tests."""
    from genlip_megatron.data.synthetic import caption_corpus, render_sample
    from genlip_megatron.data.tokenizer import train_tiny_bpe

    root = tmp_path_factory.mktemp("composite")
    tok = train_tiny_bpe(caption_corpus(), 200, root / "tok.json")
    rng = np.random.default_rng(3)
    (a, cap_a), (b, cap_b) = (render_sample(rng, p_two=0.0, p_word=0.0) for _ in range(2))
    return tok, [a.resize((70, 66)), b.resize((80, 48))], [cap_a, cap_b], root


def _vision_export(setup, name: str, image: dict):
    tok, _, _, root = setup
    sd = random_hf_state_dict(TINY, seed=5, scale=0.4)
    return write_hf_export(root / name, TINY,
                           {k: v for k, v in sd.items() if not k.startswith(TEXT_KEYS)},
                           vision_only=True, tokenizer=root / "tok.json",
                           image=image_settings(image, 16))


def _tiny_qwen2(vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256)


def _train(model, batch: dict, labels: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------ register()
def test_register_maps_every_auto_class_idempotently(auto_registry, setup):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, \
        AutoProcessor

    from genlip_megatron.convert.hf import register
    from genlip_megatron.convert.hf import modeling_genlip as mod

    vit = _vision_export(setup, "reg", FIXED)
    register()
    register()                                  # idempotent: no "already registered" error
    cfg = AutoConfig.from_pretrained(vit)       # no trust_remote_code, no prompt
    assert type(cfg) is mod.GenLIPConfig and cfg.vision_only
    assert type(AutoModel.from_config(cfg)) is mod.GenLIPVisionModel
    assert type(AutoModelForCausalLM.from_config(mod.GenLIPConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=32))) is mod.GenLIPForCausalLM
    proc = AutoImageProcessor.from_pretrained(vit, layout="images")
    assert type(proc) is mod.GenLIPImageProcessor and proc.layout == "images"
    with pytest.raises(ValueError, match="layout 'nchw' is not"):   # checked, not just set
        AutoImageProcessor.from_pretrained(vit, layout="nchw")
    captioner = AutoProcessor.from_pretrained(vit)
    assert type(captioner) is mod.GenLIPProcessor
    _, images, _, _ = setup
    rows = captioner(images=images, layout="images")          # LLaVA layout through it too
    assert rows["pixel_values"].shape == (2, 3, 32, 32) and "image_grid_thw" not in rows
    assert (rows["input_ids"] == captioner.image_token_id).sum(1).tolist() == [4, 4]
    tower = AutoModel.from_pretrained(vit, dtype=torch.float32)
    want = load_file(str(vit / "model.safetensors"))
    assert tower.state_dict().keys() == want.keys()
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in want.items())


# ------------------------------------------------------------------------------ LLaVA
@torch.no_grad()
def _projector_input(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector (the selected vision features)."""
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda mod, args, out: seen.append(args[0]))
    model.model.get_image_features(pixel_values=pixel_values)
    hook.remove()
    return seen[0]


def test_transformers_llava_builds_trains_and_round_trips(auto_registry, setup, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, \
        LlavaForConditionalGeneration, LlavaProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    tok, images, captions, _ = setup
    vit = _vision_export(setup, "llava", FIXED)
    # the documented one call, from the export alone (its own modeling_genlip.py)
    get_class_from_dynamic_module("modeling_genlip.register", str(vit))()
    cfg = AutoConfig.from_pretrained(vit)
    # the snippet (trust_remote_code=True) now gives the same, registered class
    assert type(AutoConfig.from_pretrained(vit, trust_remote_code=True)) is type(cfg)
    processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(
        vit, layout="images"), tokenizer=AutoTokenizer.from_pretrained(vit),
        patch_size=cfg.patch_size, vision_feature_select_strategy="full",
        image_token="<|image_pad|>")
    batch = processor(images=images, text=[f"<|image_pad|>{c}<|im_end|>" for c in captions],
                      padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    image_id = processor.image_token_id
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [4, 4]   # 2x2 patches, no CLS
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg.llava_config(_tiny_qwen2(tok.vocab_size),
                                                           image_token_id=image_id))
    assert type(model.model.vision_tower).__name__ == "GenLIPVisionModel"
    model.model.vision_tower.load_state_dict(load_file(str(vit / "model.safetensors")),
                                             strict=True)

    # the features LLaVA projects are GenLIPVisionModel's own (packed path, other layout)
    tower = AutoModel.from_pretrained(vit, dtype=torch.float32).eval()
    packed = GenLIPImageProcessor(**image_settings(FIXED, 16))(images)
    with torch.no_grad():
        direct = tower(**packed).last_hidden_state.reshape(2, 4, -1)
    model.eval()
    torch.testing.assert_close(_projector_input(model, batch["pixel_values"]), direct,
                               atol=1e-5, rtol=1e-5)

    # save_pretrained → from_pretrained: the export's weights and the outputs come back
    model.save_pretrained(tmp_path / "llava")
    saved = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == "genlip"
    assert saved["vision_feature_select_strategy"] == "full"
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava",
                                                         dtype=torch.float32).eval()
    back_tower = back.model.vision_tower.state_dict()
    assert all(torch.equal(back_tower[k], v) for k, v in tower.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, model(**batch).logits)

    labels = batch["input_ids"].masked_fill((batch["input_ids"] == image_id)
                                            | (batch["attention_mask"] == 0), -100)
    model.train()
    losses = _train(model, dict(batch), labels, steps=8)
    vt = model.model.vision_tower
    assert vt.visual.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert vt.ln_post.weight.grad.abs().sum() > 0        # layer -1 is the ln_post output
    assert all(np.isfinite(losses)) and losses[-1] == min(losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    prompt = processor(images=images, text=["<|image_pad|>"] * 2, return_tensors="pt")
    out = model.eval().generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, prompt["input_ids"].shape[1] + 3)   # generate() runs the tower too
    assert torch.equal(out[:, :prompt["input_ids"].shape[1]], prompt["input_ids"])


# ------------------------------------------------------------------------------ layouts
def test_images_layout_is_the_packed_pixels_unpatched(setup):
    _, images, _, _ = setup
    for settings in (image_settings(FIXED, 16),
                     {**image_settings(FIXED, 16), "image_mean": [0.4, 0.5, 0.6],
                      "image_std": [0.2, 0.3, 0.25]}):
        proc = GenLIPImageProcessor(**settings)
        packed = proc(images)
        grid = proc(images, layout="images")
        assert set(grid) == {"pixel_values"}      # LLaVA's forward takes nothing else
        px = grid["pixel_values"]
        assert px.shape == (2, 3, 32, 32)
        # [B, C, gh, p, gw, p] → [B, gh, gw, C, p, p]: the packed raster order, (C, ph, pw)
        patches = px.reshape(2, 3, 2, 16, 2, 16).permute(0, 2, 4, 1, 3, 5).reshape(8, 768)
        assert torch.equal(patches, packed["pixel_values"])
    native = GenLIPImageProcessor(**image_settings(NATIVE, 16), layout="images")
    assert native([images[0], images[0]])["pixel_values"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"2 sizes .* use layout='packed'"):
        native(images)
    with pytest.raises(ValueError, match="layout 'nchw' is not"):
        GenLIPImageProcessor(layout="nchw")


@torch.no_grad()
def test_packed_layout_is_transformers_qwen2_vl_input(setup):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        smart_resize as qwen_smart_resize

    _, images, _, _ = setup
    ours = GenLIPImageProcessor(**image_settings(NATIVE, 16))
    qwen = Qwen2VLImageProcessorPil(patch_size=16,
                                    temporal_patch_size=ours.temporal_patch_size,
                                    merge_size=ours.merge_size, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, do_resize=False)
    got = ours(images)
    resized = [ours.preprocess_one(im)[2].numpy() for im in images]   # our resize kernel
    want = qwen(images=resized, return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist() == \
        [[1, 4, 4], [1, 3, 5]]
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)
    for h, w in [(94, 122), (48, 80), (1000, 30), (17, 17), (4000, 3000), (33, 700)]:
        for lo, hi in [(4096, 262144), (1024, 4096)]:
            assert smart_resize(h, w, 16, lo, hi) == qwen_smart_resize(h, w, 16, lo, hi)


class GenLIPAsQwen2VLVisual(nn.Module):
    """docs/hf-mllm.md's adapter: GenLIP tower + a merger to the LM width, Qwen2-VL's API."""

    spatial_merge_size = 1

    def __init__(self, tower: nn.Module, width: int):
        super().__init__()
        e = tower.config.hidden_size
        self.tower = tower
        self.merger = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, width), nn.GELU(),
                                    nn.Linear(width, width))

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    def forward(self, pixel_values, grid_thw, **kwargs):
        feats = self.tower(pixel_values, grid_thw=grid_thw).last_hidden_state   # [sum N, E]
        return BaseModelOutputWithPooling(last_hidden_state=feats,
                                          pooler_output=self.merger(feats))


def test_transformers_qwen2_vl_trains_on_the_packed_layout(auto_registry, setup):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration

    from genlip_megatron.convert.hf import register

    tok, images, captions, _ = setup
    vit = _vision_export(setup, "qwen2vl", NATIVE)
    register()
    vision = AutoImageProcessor.from_pretrained(vit)(images)       # packed, native resolution
    hf_tok = AutoTokenizer.from_pretrained(vit)
    image_id = hf_tok.convert_tokens_to_ids("<|image_pad|>")
    # Qwen2-VL's processor rule: grid.prod() // merge_size**2 image tokens per image
    rows = [[image_id] * int(g.prod()) + hf_tok.encode(c + "<|im_end|>",
                                                       add_special_tokens=False)
            for g, c in zip(vision["image_grid_thw"], captions)]
    ids = torch.zeros(2, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    batch = {"input_ids": ids, "attention_mask": mask, **vision,
             "mm_token_type_ids": (ids == image_id).int()}
    torch.manual_seed(0)
    text = _tiny_qwen2(tok.vocab_size).to_dict()
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, image_token_id=image_id,
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=16,
                           temporal_patch_size=1, spatial_merge_size=1)))
    tower = AutoModel.from_pretrained(vit, dtype=torch.float32)
    model.model.visual = GenLIPAsQwen2VLVisual(tower, 64)
    with torch.no_grad():
        out = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
        direct = tower.eval().encode_images(vision["pixel_values"], vision["image_grid_thw"])
    assert [len(x) for x in out.pooler_output] == [16, 15]
    qwen_default = vision["pixel_values"].repeat(1, 2)     # temporal_patch_size=2 patches
    with pytest.raises(ValueError, match="temporal_patch_size=2; GenLIP takes"):
        tower(qwen_default, grid_thw=vision["image_grid_thw"])
    torch.testing.assert_close(out.last_hidden_state, torch.cat(direct), atol=1e-5, rtol=1e-5)
    labels = ids.masked_fill((ids == image_id) | (mask == 0), -100)
    losses = _train(model.train(), batch, labels, steps=8)
    assert tower.visual.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(np.isfinite(losses)) and losses[-1] == min(losses), losses
    assert losses[-1] < 0.8 * losses[0], losses

"""Probes of a GenLIP checkpoint (Megatron or HF), all on the HF-format module.

- :func:`load_genlip_for_inference` (path → model, tokenizer) and
  :func:`from_megatron_state_dict` (live TP=1 megatron weights → model);
- :func:`generate_captions` / :func:`generate_ids`: "let ViT speak" with a KV cache;
  :func:`caption_exact_match`: accuracy on held-out ``EvalSample``s (the demo evaluation);
- :func:`patch_readout` / :func:`render_readout`: LM-head words of patch features, as a PNG;
- :func:`encode_images`: vision-encoder features (``ln_post`` output);
- :func:`load_image` / :func:`checkpoint_image_config`: image file → patches with the
  checkpoint's training resize policy and size.

CLIs: ``tools/generate_captions.py``, ``tools/patch_readout.py``, ``tools/extract_features.py``.
"""

from genlip_megatron.probes.features import encode_images, save_features
from genlip_megatron.probes.generation import GenerationConfig, caption_exact_match, \
    generate_captions, generate_ids
from genlip_megatron.probes.images import ProbeImage, load_image
from genlip_megatron.probes.loading import build_hf_model, checkpoint_image_config, \
    from_megatron_state_dict, load_genlip_for_inference
from genlip_megatron.probes.readout import PatchWords, patch_readout, render_readout

__all__ = ["load_genlip_for_inference", "from_megatron_state_dict", "build_hf_model",
           "generate_captions", "generate_ids", "caption_exact_match", "GenerationConfig",
           "patch_readout", "render_readout", "PatchWords", "encode_images", "save_features",
           "load_image", "ProbeImage", "checkpoint_image_config"]

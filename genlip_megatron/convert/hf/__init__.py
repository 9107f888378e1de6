"""Self-contained HF files copied into every export (``auto_map``): the configuration, the
models (``GenLIPModel``, ``GenLIPForCausalLM``, ``GenLIPVisionModel``), ``GenLIPImageProcessor``
and ``GenLIPProcessor``. Importable as ``genlip_megatron.convert.hf.<file>``; they import nothing
from genlip_megatron."""

"""Self-contained HF files copied into every export (``auto_map``): the configuration, the
models (``GenLIPModel``, ``GenLIPForCausalLM``, ``GenLIPVisionModel``), ``GenLIPImageProcessor``
and ``GenLIPProcessor``. Importable as ``genlip_megatron.convert.hf.<file>``; they import nothing
from genlip_megatron.

:func:`register` (``from genlip_megatron.convert.hf import register; register()``) makes the
export usable inside transformers' composite models (LLaVA, ...): see ``docs/hf-mllm.md``.
"""

from genlip_megatron.convert.hf.modeling_genlip import register

__all__ = ["register"]

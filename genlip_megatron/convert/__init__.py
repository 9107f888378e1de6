"""Checkpoint conversion Megatron ⇄ Hugging Face (released GenLIP format).

Public API:
- :func:`megatron_to_hf` / :func:`hf_to_megatron`: directory → directory, streaming
  (CLI: ``tools/convert_checkpoint.py to-hf|from-hf``);
- :func:`megatron_state_dict_to_hf` / :func:`hf_state_dict_to_megatron`: in-memory TP=1 dicts;
- :func:`mapping_registry`: the per-tensor rule table (``print(mapping_registry(m).table())``),
  with ``merge_ranks`` / ``split_ranks`` for per-rank (TP/PP) state dicts.

The HF modeling files live in ``convert/hf/`` and are copied into every export.
"""

from genlip_megatron.convert.converter import hf_state_dict_to_megatron, hf_to_megatron, \
    megatron_state_dict_to_hf, megatron_to_hf
from genlip_megatron.convert.registry import ConversionError, MappingRegistry, mapping_registry

__all__ = ["megatron_to_hf", "hf_to_megatron", "megatron_state_dict_to_hf",
           "hf_state_dict_to_megatron", "mapping_registry", "MappingRegistry", "ConversionError"]

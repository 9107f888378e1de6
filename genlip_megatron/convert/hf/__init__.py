"""Self-contained HF modeling files: copied into every export (``auto_map``) and importable as
``genlip_megatron.convert.hf.modeling_genlip``; they import nothing from genlip_megatron."""

"""GenLIPMegatronModel and its parts, built from megatron-core ModuleSpecs.

Modules (imported explicitly; this package imports nothing so that light users stay light):

* ``transformer_config``: ``GenLIPTransformerConfig`` and ``build_transformer_config``.
* ``genlip``: ``GenLIPMegatronModel`` (pipeline chunks, loss, ``encode_images``),
  ``build_genlip_model``.
* ``layer_spec``: the TransformerLayer ``ModuleSpec`` (local / FP8-emulated / TE providers).
* ``attention`` (+ ``attention_te``): prefix-LM core attention, dense | flex | te.
* ``rope``: interleaved MRoPE; ``embedding``: patch + text embedding; ``norm``: SP LayerNorm;
  ``transformer_layer``: LayerScale + DropPath residual; ``init``: reference initialisation;
  ``fp8_emulation``: CPU FP8 GEMM emulation of the parallel linears.

On CPU call ``genlip_megatron.compat.apply_cpu_compat()`` before importing these modules.
"""

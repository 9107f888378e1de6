"""GenLIP's megatron-core ``TransformerConfig`` and its construction from the run config.

:class:`GenLIPTransformerConfig` is the ONLY input of the model code (plus an optional process
group collection). :func:`build_transformer_config` is the single place that turns the YAML
sections (``ModelConfig``, ``ParallelConfig``, ``PrecisionConfig``) into it, including the
machine-dependent choices (CPU initialisation, fusions, gloo pipeline quirks).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from genlip_megatron.compat.te import te_provides_wgrad_accumulation_fusion
from genlip_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from genlip_megatron.model.fp8 import te_transformer_config_kwargs
from genlip_megatron.model.fp8_emulation import emulation_config_kwargs, fp8_layer_numbers
from genlip_megatron.model.lm_loss import CHUNK_LOGITS, LOSS_IMPLS

__all__ = ["GenLIPTransformerConfig", "build_transformer_config", "ATTENTION_BACKENDS",
           "resolve_attention_backend",
           "gradient_accumulation_fusion_enabled", "local_linear_config"]

ATTENTION_BACKENDS = ("dense", "flex", "te", "varlen")
"""Prefix-LM core-attention backends (``model.attention_backend``, besides "auto")."""


def resolve_attention_backend(requested: str, has_cuda: bool, transformer_impl: str,
                              attention_dropout: float = 0.0) -> str:
    """``model.attention_backend`` → the backend that runs; "auto" picks the fastest usable one.

    auto: Transformer Engine's varlen attention on a GPU with ``model.transformer_impl: te``,
    ``flex`` on a GPU otherwise, ``varlen`` on CPU (a packed row costs what its samples cost;
    ``dense`` is 3.5× slower on a 4096-token row). ``flex`` and ``varlen`` have no attention
    dropout, so with ``attention_dropout > 0`` auto falls back to ``dense`` outside TE. Any
    other value is returned unchanged (``dense`` runs only when asked for: it is the oracle).
    """
    if requested != "auto":
        return requested
    if has_cuda and transformer_impl == "te":
        return "te"
    if attention_dropout > 0:
        return "dense"
    return "flex" if has_cuda else "varlen"


@dataclass
class GenLIPTransformerConfig(TransformerConfig):
    """megatron ``TransformerConfig`` plus the GenLIP fields (docs/reference-architecture.md).

    megatron fields GenLIP relies on: ``hidden_size`` H, ``num_layers``, ``num_attention_heads``
    (= ``num_query_groups``, MHA), ``kv_channels`` (head dim), ``ffn_hidden_size`` (SwiGLU width),
    ``layernorm_epsilon``, ``init_method_std``, ``attention_dropout``, ``transformer_impl``
    ("local" | "transformer_engine"), ``mrope_section`` (T, H, W sections of the interleaved MRoPE;
    megatron's own chunked MRoPE is not used).
    """

    text_dim: int = 0
    """Text embedding width T (0 means H); in_proj T→H and proj H→T exist only when T ≠ H."""
    vocab_size: int = 151936
    """LM vocabulary size (must be divisible by the tensor-parallel size)."""
    patch_dim: int = 768
    """Length of one flattened image patch, C·p·p in (C, ph, pw) order."""
    rope_theta: float = 10000.0
    """RoPE base."""
    layerscale_init: float = 0.1
    """Initial LayerScale value (two per block)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, the same in every layer (per packed row, timm semantics)."""
    prefix_attention_backend: str = "dense"
    """Prefix-LM core attention: "dense" (oracle, CPU), "flex" (torch flex_attention), "te",
    "varlen" (per-sample torch SDPA, CPU: packed rows cost what their samples cost)."""
    loss_impl: str = "chunked"
    """LM-head loss: "chunked" (label positions in chunks, one chunk's logits alive, see
    model/lm_loss.py) or "full" (all logits at once; the oracle)."""
    loss_chunk_logits: int = CHUNK_LOGITS
    """Logits alive at a time in the "chunked" loss (vocabulary blocks of this / N entries)."""
    fp8_emulation_format: Optional[str] = None
    """CPU FP8 emulation of the block linears ("e4m3" | "hybrid"); None disables it."""
    fp8_emulation_layers: Optional[list[int]] = None
    """1-based global layer numbers whose linears run emulated FP8 (None: every layer)."""
    init_seed: int = 1234
    """Seed of the reference initialisation (per-tensor generators; TP/PP-invariant)."""
    fold_bias_into_gemm: bool = False
    """Local linears add their bias inside the GEMM (``addmm``; model/linear.py). Set on the
    CPU path, where nothing else fuses the bias add."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.text_dim:
            self.text_dim = self.hidden_size
        _validate_genlip_fields(self)


def _validate_genlip_fields(c: GenLIPTransformerConfig) -> None:
    """Refuse GenLIP settings the model cannot build, naming the run-config key and the fix."""
    if c.prefix_attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend ({c.prefix_attention_backend!r}) must be one "
                         f"of {list(ATTENTION_BACKENDS)}.")
    if c.loss_impl not in LOSS_IMPLS:
        raise ValueError(f"model.loss_impl ({c.loss_impl!r}) must be one of {list(LOSS_IMPLS)}.")
    if c.loss_chunk_logits < 1:
        raise ValueError(f"model.loss_chunk_logits ({c.loss_chunk_logits}) must be at least 1.")
    if c.num_query_groups != c.num_attention_heads:
        raise ValueError(f"GenLIP attention is MHA: num_query_groups ({c.num_query_groups}) must "
                         f"equal model.num_attention_heads ({c.num_attention_heads}).")
    if c.kv_channels * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"kv_channels × heads ({c.kv_channels} × {c.num_attention_heads}) must "
                         f"equal model.hidden_size ({c.hidden_size}).")
    if c.kv_channels % 2:
        raise ValueError(f"model head dim ({c.kv_channels}) must be even for rotary embeddings.")
    if c.mrope_section is None or len(c.mrope_section) != 3:
        raise ValueError(f"model.mrope_section must have 3 entries (T, H, W), got "
                         f"{c.mrope_section}.")
    if c.context_parallel_size != 1:
        raise ValueError(f"parallel.cp ({c.context_parallel_size}) must be 1: the prefix-LM "
                         "mask needs bottom-right-aligned causal masks, which Transformer Engine "
                         "disables under context parallelism.")
    if c.prefix_attention_backend in ("flex", "varlen") and c.attention_dropout > 0:
        raise ValueError(f"model.attention_dropout ({c.attention_dropout}) must be 0 with "
                         f"model.attention_backend '{c.prefix_attention_backend}' (no dropout "
                         "there); use 'dense' or 'te'.")
    if c.prefix_attention_backend == "te" and c.transformer_impl != "transformer_engine":
        raise ValueError("model.attention_backend 'te' needs model.transformer_impl: te.")
    if not 0.0 <= c.drop_path_rate < 1.0:
        raise ValueError(f"model.drop_path_rate ({c.drop_path_rate}) must be in [0, 1).")
    if c.vocab_size % c.tensor_model_parallel_size:
        raise ValueError(f"model.vocab_size ({c.vocab_size}) is not divisible by parallel.tp "
                         f"({c.tensor_model_parallel_size}); pad the vocabulary.")


def _apex_grad_accum_fusion_available() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def gradient_accumulation_fusion_enabled(has_cuda: bool, transformer_impl: str) -> bool:
    """Fuse weight-gradient accumulation into ``main_grad`` where a kernel provides it.

    Apex's ``fused_weight_gradient_mlp_cuda`` serves megatron's local linears; Transformer
    Engine's linears do it themselves (``fuse_wgrad_accumulation``), so with
    ``model.transformer_impl: te`` the fusion is on whenever TE is usable. Local linears that
    remain in a TE model (the LM head) get it only with Apex: see
    :func:`local_linear_config`.
    """
    if not has_cuda:
        return False
    return _apex_grad_accum_fusion_available() or (
        transformer_impl == "te" and te_provides_wgrad_accumulation_fusion())


def local_linear_config(config: TransformerConfig) -> TransformerConfig:
    """``config`` for megatron's LOCAL parallel linears: without Apex's fused wgrad kernel,
    ``gradient_accumulation_fusion`` is switched off for them (megatron's ColumnParallelLinear
    refuses it), while TE linears keep it (a shallow copy; the original is unchanged)."""
    if not config.gradient_accumulation_fusion or _apex_grad_accum_fusion_available():
        return config
    local = copy.copy(config)
    local.gradient_accumulation_fusion = False
    return local


def _cpu_step_kwargs(has_cuda: bool, transformer_impl: str) -> dict:
    """The CPU path's replacements for the GPU fusions (docs/performance.md): biases inside
    the local linears' GEMMs (model/linear.py) and megatron's MLP activation-module slot
    (``use_te_activation_func``, which takes any module from the layer spec) filled with
    GenLIP's SwiGLU (model/swiglu.py). GPU runs keep megatron's fused bias-SwiGLU / TE."""
    cpu_local = not has_cuda and transformer_impl == "local"
    return {"fold_bias_into_gemm": cpu_local, "use_te_activation_func": cpu_local}


def _recompute_kwargs(parallel: ParallelConfig) -> dict:
    r = parallel.recompute
    if r.granularity is None:
        return {}
    if r.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": r.method,
            "recompute_num_layers": r.num_layers}


def _precision_kwargs(model: ModelConfig, precision: PrecisionConfig) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision.params_dtype]
    out = {"params_dtype": dtype, "pipeline_dtype": dtype, "bf16": dtype == torch.bfloat16}
    fp8 = precision.fp8
    if fp8 is None:
        return out
    if fp8.emulate:
        out.update(emulation_config_kwargs(fp8))
        out["fp8_emulation_layers"] = sorted(fp8_layer_numbers(model.num_layers, fp8))
    else:
        out.update(te_transformer_config_kwargs(fp8))
    return out


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig,
                             precision: PrecisionConfig, *, init_seed: int = 1234,
                             has_cuda: Optional[bool] = None) -> GenLIPTransformerConfig:
    """Translate the run config into the model's ``GenLIPTransformerConfig``.

    Args:
        model: ``model`` section (architecture, attention backend, transformer_impl).
        parallel: ``parallel`` section (tp/pp/vpp/sp, recompute).
        precision: ``precision`` section (params dtype, FP8 or its emulation).
        init_seed: seed of the reference initialisation (the trainer passes training.seed).
        has_cuda: override CUDA detection (tests); None probes ``torch.cuda.is_available()``.

    Returns:
        The config: LayerNorm (eps from the config), biases everywhere, SwiGLU, gated attention
        (unless ``model.gated_attention`` is false), optional QK LayerNorm, MHA, hidden
        dropout 0, CPU initialisation without CUDA, fusions only where they exist.
    """
    if has_cuda is None:
        has_cuda = torch.cuda.is_available()
    normal = _normal_init(model.init_std)
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_attention_heads, kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="LayerNorm", layernorm_epsilon=model.layernorm_eps,
        add_bias_linear=True, add_qkv_bias=True, gated_linear_unit=True, activation_func=F.silu,
        attention_output_gate=model.gated_attention, qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=model.attention_dropout,
        init_method_std=model.init_std, init_method=normal, output_layer_init_method=normal,
        mrope_section=list(model.mrope_section),
        # Machine-dependent: CPU init builds full master weights and slices them (TP-invariant);
        # fused kernels only where they exist (apex is not on PyPI, see docs/design.md).
        use_cpu_initialization=not has_cuda,
        bias_activation_fusion=has_cuda, bias_dropout_fusion=False, masked_softmax_fusion=False,
        **_cpu_step_kwargs(has_cuda, model.transformer_impl),
        persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=gradient_accumulation_fusion_enabled(
            has_cuda, model.transformer_impl),
        # Parallel layout.
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp, sequence_parallel=parallel.sp,
        context_parallel_size=parallel.cp,
        # gloo matches batched p2p ops by posting order: with PP=2 interleaved, forward
        # activations and backward grads of the same shape get swapped (docs/design.md,
        # CPU workarounds).
        batch_p2p_comm=has_cuda or parallel.vpp is None,
        deallocate_pipeline_outputs=True,
        transformer_impl="transformer_engine" if model.transformer_impl == "te" else "local",
        # GenLIP fields.
        text_dim=model.text_dim, vocab_size=model.vocab_size, patch_dim=model.patch_dim,
        rope_theta=model.rope_theta, layerscale_init=model.layerscale_init,
        drop_path_rate=model.drop_path_rate,
        prefix_attention_backend=resolve_attention_backend(
            model.attention_backend, has_cuda, model.transformer_impl, model.attention_dropout),
        loss_impl=model.loss_impl, loss_chunk_logits=model.loss_chunk_logits, init_seed=init_seed,
    )
    kwargs.update(_recompute_kwargs(parallel))
    kwargs.update(_precision_kwargs(model, precision))
    return GenLIPTransformerConfig(**kwargs)


def _normal_init(std: float):
    """N(0, std) initialiser (a partial, so configs stay picklable)."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)

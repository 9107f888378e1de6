"""The GenLIP TransformerLayer ``ModuleSpec`` for the local and Transformer Engine backends.

One block (docs/reference-architecture.md):
pre-norm LayerNorm → gated self-attention (fused ``linear_qkv`` with
per-head ``[q, gate, k, v]`` rows, or ``[q, k, v]`` with ``model.gated_attention: false``;
optional per-head q/k LayerNorm; prefix-LM core attention, ``linear_proj``) → LayerScale +
DropPath residual → LayerNorm → SwiGLU MLP (``linear_fc1`` = ``[gate_fc; fc1]``, ``linear_fc2``)
→ LayerScale + DropPath residual.

The backend is picked once, through a provider object (megatron's ``BackendSpecProvider``
protocol): :class:`GenLIPLocalProvider` (megatron's local modules + :class:`GenLIPLayerNorm`),
:class:`GenLIPFp8EmulatedProvider` (local, with the FP8-emulated linears of
``model/fp8_emulation.py``) or megatron's ``TESpecProvider`` (imported only when selected). All
produce the same checkpoint keys: the local spec maps its separate norms onto TE's fused
``layer_norm_*`` names through ``sharded_state_dict_keys_map``.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, \
    get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules, \
    get_transformer_layer_offset

from genlip_megatron.compat.te import require_transformer_engine
from genlip_megatron.model.attention import DensePrefixLMAttention, FlexPrefixLMAttention, \
    VarlenPrefixLMAttention
from genlip_megatron.model.linear import BiasGemmColumnParallelLinear, BiasGemmRowParallelLinear
from genlip_megatron.model.norm import GenLIPLayerNorm
from genlip_megatron.model.swiglu import SwiGLU
from genlip_megatron.model.transformer_layer import GenLIPTransformerLayer, LayerScaleDropPathAdd

__all__ = ["GenLIPLocalProvider", "GenLIPFp8EmulatedProvider", "get_backend_provider",
           "get_genlip_layer_submodules", "get_genlip_layer_spec", "get_genlip_block_spec",
           "LOCAL_TO_TE_KEYS", "canonical_name", "core_attention_class"]

LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
"""Local module names → the canonical (TE-fused) checkpoint names of the two block norms."""


def canonical_name(name: str) -> str:
    """A parameter/state name of either backend in canonical (TE-fused) form.

    Used wherever local and TE models are compared tensor by tensor (the TE stand-in tests and
    ``tools/gpu_smoke.py``); checkpoints get the same mapping through
    ``sharded_state_dict_keys_map``.
    """
    for local, te_name in LOCAL_TO_TE_KEYS.items():
        name = name.replace(local, te_name)
    return name


class GenLIPLocalProvider(LocalSpecProvider):
    """megatron's local modules, with a LayerNorm that allows sequence parallelism, linears
    that can add their bias inside the GEMM (``model/linear.py``; active with
    ``config.fold_bias_into_gemm``) and a SwiGLU module (``model/swiglu.py``; used by megatron's
    MLP only with ``config.use_te_activation_func``)."""

    def column_parallel_linear(self) -> type:
        """megatron's ``ColumnParallelLinear`` with the bias-in-GEMM fast path."""
        return BiasGemmColumnParallelLinear

    def row_parallel_linear(self) -> type:
        """megatron's ``RowParallelLinear`` with the bias-in-GEMM fast path (TP = 1)."""
        return BiasGemmRowParallelLinear

    def activation_func(self) -> type:
        """The MLP activation module: GenLIP's SwiGLU."""
        return SwiGLU

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, **kwargs: Any) -> type:
        """GenLIP uses LayerNorm everywhere (the optional qk-norm included: no RMSNorm)."""
        return GenLIPLayerNorm


class GenLIPFp8EmulatedProvider(GenLIPLocalProvider):
    """Local modules whose parallel linears run emulated FP8 GEMMs (CPU numerics studies)."""

    def column_parallel_linear(self) -> type:
        """``Fp8EmulatedColumnParallelLinear`` (same constructor as ColumnParallelLinear)."""
        from genlip_megatron.model.fp8_emulation import Fp8EmulatedColumnParallelLinear

        return Fp8EmulatedColumnParallelLinear

    def row_parallel_linear(self) -> type:
        """``Fp8EmulatedRowParallelLinear`` (same constructor as RowParallelLinear)."""
        from genlip_megatron.model.fp8_emulation import Fp8EmulatedRowParallelLinear

        return Fp8EmulatedRowParallelLinear


def get_backend_provider(config: Any, fp8_emulated: bool = False) -> BackendSpecProvider:
    """The spec provider for ``config.transformer_impl`` ("local" | "transformer_engine").

    Raises:
        RuntimeError: Transformer Engine requested but not usable here, or FP8 emulation with
            the TE implementation.
    """
    if config.transformer_impl == "transformer_engine":
        if fp8_emulated:
            raise RuntimeError("precision.fp8.emulate runs on the local implementation; set "
                               "model.transformer_impl: local (or emulate: false for real FP8).")
        require_transformer_engine("model.transformer_impl 'te'")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if config.transformer_impl != "local":
        raise ValueError(f"model.transformer_impl ({config.transformer_impl!r}) must be 'local' "
                         "or 'te'.")
    return GenLIPFp8EmulatedProvider() if fp8_emulated else GenLIPLocalProvider()


def get_genlip_layer_submodules(backend: BackendSpecProvider, core_attention: type,
                                qk_layernorm: bool = False) -> TransformerLayerSubmodules:
    """Submodules of one GenLIP block for ``backend``.

    Args:
        backend: provider of linears and norms (local, FP8-emulated or TE).
        core_attention: prefix-LM core-attention class (:func:`core_attention_class`).
        qk_layernorm: per-head LayerNorm on queries and keys (``model.qk_layernorm``), the
            norm megatron's GPT spec takes for it (``backend.layer_norm(for_qk=True)``: our
            LayerNorm locally, TENorm with TE). megatron sums these weights' gradients over TP
            by name (``finalize_model_grads``), since each rank normalises its own heads.
    """
    fused = backend.fuse_layernorm_and_linear()
    qk_norm = backend.layer_norm(for_qk=True) if qk_layernorm else None
    linear_in = (backend.column_parallel_layer_norm_linear() if fused
                 else backend.column_parallel_linear())
    norm = IdentityOp if fused else backend.layer_norm()
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            # Structural constant for the core attention's constructor; every backend takes
            # its real mask from the per-forward PrefixLMParams.
            params={"attn_mask_type": getattr(core_attention, "spec_attn_mask_type",
                                              AttnMaskType.arbitrary)},
            submodules=SelfAttentionSubmodules(
                linear_qkv=linear_in, core_attention=core_attention,
                linear_proj=backend.row_parallel_linear(), q_layernorm=qk_norm,
                k_layernorm=qk_norm),
        ),
        self_attn_bda=LayerScaleDropPathAdd,
        pre_mlp_layernorm=norm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=linear_in, linear_fc2=backend.row_parallel_linear(),
            # built by megatron only with config.use_te_activation_func (set on the CPU path
            # by build_transformer_config)
            activation_func=backend.activation_func())),
        mlp_bda=LayerScaleDropPathAdd,
        sharded_state_dict_keys_map={} if fused else dict(LOCAL_TO_TE_KEYS),
    )


def get_genlip_layer_spec(config: Any, fp8_emulated: bool = False) -> ModuleSpec:
    """``ModuleSpec(GenLIPTransformerLayer)`` for ``config`` (backend chosen by the config)."""
    backend = get_backend_provider(config, fp8_emulated)
    submodules = get_genlip_layer_submodules(
        backend, core_attention_class(config.prefix_attention_backend),
        qk_layernorm=bool(config.qk_layernorm))
    return ModuleSpec(module=GenLIPTransformerLayer, submodules=submodules)


def get_genlip_block_spec(config: Any, vp_stage: Optional[int] = None,
                          pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage plus the final LayerNorm (``ln_post``).

    With ``config.fp8_emulation_format`` set, the layers listed in
    ``config.fp8_emulation_layers`` (1-based, global; None = all) get the FP8-emulated linears.
    """
    num_local = get_num_layers_to_build(config, vp_stage, pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    plain = get_genlip_layer_spec(config)
    fp8_layers: set[int] = set()
    if config.fp8_emulation_format:
        fp8_layers = set(config.fp8_emulation_layers or range(1, config.num_layers + 1))
    emulated = get_genlip_layer_spec(config, fp8_emulated=True) if fp8_layers else plain
    specs = [emulated if offset + i + 1 in fp8_layers else plain for i in range(num_local)]
    return TransformerBlockSubmodules(layer_specs=specs,
                                      layer_norm=get_backend_provider(config).layer_norm())


def core_attention_class(backend: str) -> type:
    """The core-attention module class for ``config.prefix_attention_backend``.

    Raises:
        RuntimeError: "te" without a usable Transformer Engine.
    """
    if backend == "dense":
        return DensePrefixLMAttention
    if backend == "flex":
        return FlexPrefixLMAttention
    if backend == "varlen":
        return VarlenPrefixLMAttention
    if backend == "te":
        require_transformer_engine("model.attention_backend 'te'")
        # Imported here because importing transformer_engine needs TE (and CUDA) installed.
        from genlip_megatron.model.attention_te import TEPrefixLMAttention

        return TEPrefixLMAttention
    raise ValueError(f"model.attention_backend ({backend!r}) must be one of dense, flex, te, "
                     "varlen.")

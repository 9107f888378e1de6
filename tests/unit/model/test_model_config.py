"""build_transformer_config mapping, and clear errors for configs the model cannot build."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from genlip_megatron.config import Fp8Config, ParallelConfig, PrecisionConfig, RecomputeConfig, \
    decode_variant
from genlip_megatron.model.transformer_config import build_transformer_config


def _build(parallel=None, precision=None, has_cuda=False, **model_overrides):
    model = dataclasses.replace(decode_variant("tiny"), **model_overrides)
    return build_transformer_config(model, parallel or ParallelConfig(),
                                    precision or PrecisionConfig(), has_cuda=has_cuda)


def test_genlip_architecture_flags():
    c = _build()
    assert (c.normalization, c.layernorm_epsilon) == ("LayerNorm", 1e-6)
    assert c.add_bias_linear and c.add_qkv_bias and c.gated_linear_unit
    assert c.activation_func is F.silu and c.attention_output_gate
    assert (c.num_query_groups, c.kv_channels, c.ffn_hidden_size) == (4, 16, 176)
    assert (c.hidden_dropout, c.attention_dropout) == (0.0, 0.0)
    assert (c.text_dim, c.vocab_size, c.patch_dim) == (48, 256, 768)
    assert (list(c.mrope_section), c.rope_theta, c.layerscale_init) == ([2, 3, 3], 1e4, 0.1)
    assert c.params_dtype == torch.bfloat16 and c.bf16 and c.pipeline_dtype == torch.bfloat16
    assert c.transformer_impl == "local" and c.prefix_attention_backend == "varlen"  # auto, CPU
    assert c.loss_impl == "chunked" and c.loss_chunk_logits == 2 ** 24
    t = torch.empty(4000)
    c.init_method(t)
    assert abs(t.std() - 0.02) < 0.002 and c.output_layer_init_method is not None


def test_machine_dependent_choices():
    cpu = _build(parallel=ParallelConfig(tp=1, pp=2, vpp=1), num_layers=2)
    assert cpu.use_cpu_initialization and not cpu.bias_activation_fusion
    assert not cpu.gradient_accumulation_fusion and not cpu.apply_rope_fusion
    assert cpu.batch_p2p_comm is False          # gloo + interleaved PP
    assert _build(parallel=ParallelConfig(pp=2)).batch_p2p_comm is True
    gpu = _build(has_cuda=True)
    assert not gpu.use_cpu_initialization and gpu.bias_activation_fusion
    assert not gpu.persist_layer_norm and not gpu.masked_softmax_fusion


def test_parallel_precision_and_recompute():
    c = _build(parallel=ParallelConfig(tp=2, sp=True, recompute=RecomputeConfig(
        granularity="full", method="block", num_layers=1)), precision=PrecisionConfig(
        params_dtype="fp32"))
    assert (c.tensor_model_parallel_size, c.sequence_parallel) == (2, True)
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == \
        ("full", "block", 1)
    assert c.params_dtype == torch.float32 and not c.bf16
    s = _build(parallel=ParallelConfig(recompute=RecomputeConfig(granularity="selective")))
    assert s.recompute_granularity == "selective" and s.recompute_modules == ["core_attn"]


@pytest.mark.parametrize("overrides, parallel, message", [
    ({"attention_backend": "sparse"}, None, "model.attention_backend"),
    ({"attention_backend": "te"}, None, "model.transformer_impl: te"),
    ({"attention_backend": "flex", "attention_dropout": 0.1}, None, "attention_dropout"),
    ({"drop_path_rate": 1.0}, None, "drop_path_rate"),
    ({"mrope_section": [2, 3]}, None, "mrope_section"),
    ({}, ParallelConfig(cp=2), "parallel.cp"),
    ({"vocab_size": 255}, ParallelConfig(tp=2), "vocab_size"),
])
def test_bad_configs_are_refused_with_the_key(overrides, parallel, message):
    with pytest.raises(ValueError, match=message):
        _build(parallel=parallel, **overrides)


def test_te_without_transformer_engine_is_a_clear_error(mp_state):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    cfg = _build(transformer_impl="te", attention_backend="te")
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        GenLIPMegatronModel(cfg)
    cfg = _build(transformer_impl="local", attention_backend="dense")
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        GenLIPMegatronModel(dataclasses.replace(cfg, transformer_impl="transformer_engine"))


def test_sequence_length_not_divisible_under_sp(mp_state, make_config):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    model = GenLIPMegatronModel(make_config())
    model.config.sequence_parallel = True           # as a TP=2 run would have it
    model.tp_group = type("G", (), {"size": lambda self: 2, "rank": lambda self: 0})()
    seg = torch.zeros(1, 7, dtype=torch.int32)
    with pytest.raises(ValueError, match="data.max_seq_len"):
        model(None, torch.zeros(1, 3, 7, dtype=torch.long), seg.bool(), seg, None)


def test_fp8_emulation_selects_emulated_linears_per_layer(mp_state):
    fe = pytest.importorskip("genlip_megatron.model.fp8_emulation")
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    fp8 = Fp8Config(emulate=True, first_last_layers_bf16=True)
    cfg = _build(precision=PrecisionConfig(params_dtype="fp32", fp8=fp8), num_layers=4)
    assert cfg.fp8 is None and cfg.fp8_emulation_format == "hybrid"
    assert cfg.fp8_emulation_layers == [2, 3]
    model = GenLIPMegatronModel(cfg)
    emulated = [isinstance(layer.self_attention.linear_qkv, fe.Fp8EmulatedColumnParallelLinear)
                and isinstance(layer.mlp.linear_fc2, fe.Fp8EmulatedRowParallelLinear)
                for layer in model.decoder.layers]
    assert emulated == [False, True, True, False]
    plain = GenLIPMegatronModel(_build(precision=PrecisionConfig(params_dtype="fp32"),
                                       num_layers=4))
    assert plain.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("requested, cuda, impl, dropout, want", [
    ("auto", False, "local", 0.0, "varlen"),      # CPU: per-sample SDPA
    ("auto", True, "local", 0.0, "flex"),         # GPU without TE layers
    ("auto", True, "te", 0.0, "te"),              # GPU with TE layers
    ("auto", True, "te", 0.1, "te"),              # TE has attention dropout
    ("auto", False, "local", 0.1, "dense"),       # flex/varlen have none: the oracle
    ("auto", True, "local", 0.1, "dense"),
    ("dense", True, "te", 0.0, "dense"),          # explicit choices are kept
    ("varlen", True, "local", 0.0, "varlen"),
])
def test_auto_attention_backend(requested, cuda, impl, dropout, want):
    from genlip_megatron.model.transformer_config import resolve_attention_backend

    assert resolve_attention_backend(requested, cuda, impl, dropout) == want


def test_dense_only_when_asked():
    assert _build().prefix_attention_backend == "varlen"
    assert _build(attention_backend="dense").prefix_attention_backend == "dense"
    assert _build(attention_dropout=0.1).prefix_attention_backend == "dense"

"""Config-time guards of the GPU paths (issue 10): FP8 GEMM alignment under TE (item 6) and
gradient-accumulation fusion with TE linears (item 9)."""

from __future__ import annotations

import dataclasses

import pytest

from genlip_megatron.config import ConfigError, ParallelConfig, PrecisionConfig, \
    config_from_dict, decode_variant


def validate(raw: dict, world_size: int = 16):
    return config_from_dict(raw).validate(world_size=world_size, has_cuda=True, has_te=True)


def _fp8(recipe: str = "tensorwise", **extra) -> dict:
    return {"precision": {"params_dtype": "bf16", "fp8": {"recipe": recipe, **extra}}}


def _raw(parallel: dict, data: dict, recipe: str = "tensorwise", micro_batch: int = 1,
         emulate: bool = False) -> dict:
    return {"model": {"variant": "So/16", "transformer_impl": "te"}, "parallel": parallel,
            "data": data, "training": {"micro_batch_size": micro_batch,
                                       "global_batch_size": 16 * micro_batch},
            **_fp8(recipe, emulate=emulate)}


def test_linear_proj_input_width_must_fit_fp8():
    # So/16: H 1152 / tp 16 = 72 is not a multiple of 16 (FFN 3072/16 = 192 is fine).
    with pytest.raises(ConfigError, match=r"model.hidden_size / parallel.tp \(1152/16 = 72, the "
                                          r"input width of linear_proj\) is not a multiple of "
                                          r"16.*use parallel.tp in \[1, 2, 4, 8\]"):
        validate(_raw({"tp": 16}, {}))
    validate(_raw({"tp": 8}, {}))  # 144 = 9 × 16


def test_mxfp8_needs_32_aligned_linear_proj_input():
    with pytest.raises(ConfigError, match=r"1152/8 = 144.*multiple of 32.*\[1, 2, 4\]"):
        validate(_raw({"tp": 8}, {}, recipe="mxfp8"))


def test_sequence_parallel_token_shard_must_fit_fp8():
    # S/tp × B = 16400/4 × 1 = 4100 rows per rank, not a multiple of 8.
    raw = _raw({"tp": 4, "sp": True}, {"max_seq_len": 16400})
    with pytest.raises(ConfigError, match=r"data.max_seq_len / parallel.tp × "
                                          r"training.micro_batch_size \(16400/4 × 1 = 4100 tokens "
                                          r"per micro-batch\) is not a multiple of 8.*set "
                                          r"data.max_seq_len: 16416 or "
                                          r"training.micro_batch_size: 2"):
        validate(raw)
    validate(_raw({"tp": 4, "sp": True}, {"max_seq_len": 16416}))
    validate(_raw({"tp": 4, "sp": True}, {"max_seq_len": 16400}, micro_batch=2))


def test_mxfp8_token_count_needs_multiple_of_32():
    with pytest.raises(ConfigError, match=r"\(16400 × 1 = 16400 tokens per micro-batch\) is not "
                                          r"a multiple of 32.*data.max_seq_len: 16416"):
        validate(_raw({"tp": 1}, {"max_seq_len": 16400}, recipe="mxfp8"))


def test_fp8_emulation_has_no_te_alignment_rules():
    validate(_raw({"tp": 4, "sp": True}, {"max_seq_len": 16400}, emulate=True))


def _tconfig(impl: str, has_cuda: bool):
    from genlip_megatron.model.transformer_config import build_transformer_config

    model = dataclasses.replace(decode_variant("tiny"), transformer_impl=impl,
                                attention_backend="te" if impl == "te" else "dense")
    return build_transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="fp32"),
                                    has_cuda=has_cuda)


def test_te_linears_enable_gradient_accumulation_fusion_without_apex(monkeypatch):
    import genlip_megatron.model.transformer_config as tc

    monkeypatch.setattr(tc, "_apex_grad_accum_fusion_available", lambda: False)
    monkeypatch.setattr(tc, "te_provides_wgrad_accumulation_fusion", lambda: True)
    te_cfg = _tconfig("te", has_cuda=True)
    assert te_cfg.gradient_accumulation_fusion
    # The LM head stays a local ColumnParallelLinear: without Apex it must not get the flag
    # (megatron refuses it), while the TE linears keep it.
    head_cfg = tc.local_linear_config(te_cfg)
    assert not head_cfg.gradient_accumulation_fusion and te_cfg.gradient_accumulation_fusion
    assert not _tconfig("local", has_cuda=True).gradient_accumulation_fusion
    assert not _tconfig("te", has_cuda=False).gradient_accumulation_fusion
    monkeypatch.setattr(tc, "_apex_grad_accum_fusion_available", lambda: True)
    assert _tconfig("local", has_cuda=True).gradient_accumulation_fusion
    assert tc.local_linear_config(te_cfg) is te_cfg

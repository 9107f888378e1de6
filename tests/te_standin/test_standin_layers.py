"""TE-facing model code against the TE stand-in: spec, numerics vs the dense backend, every
attention backend TE may pick (issue 10 items 4, 5, 9 and FP8 through TE)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.te_standin

FP32_TOL = 2e-5


def test_standin_never_reaches_this_process(standin):
    # megatron decides HAVE_TE at import: the pytest process must keep seeing "no TE".
    import megatron.core.extensions.transformer_engine as te_ext

    assert importlib.util.find_spec("transformer_engine") is None
    assert not te_ext.HAVE_TE
    facts = standin.run("standin_facts")
    assert facts == {"have_te": [True, True, True], "version": "2.11.0", "te_available": True,
                     "cuda": False, "torch_adam": True}


def test_te_layer_spec_builds(standin):
    got = standin.run("spec_classes")
    assert got["linear_qkv"] == "TELayerNormColumnParallelLinear"
    assert got["linear_fc1"] == "TELayerNormColumnParallelLinear"
    assert got["linear_proj"] == "TERowParallelLinear"
    assert got["core_attention"] == "TEPrefixLMAttention"
    assert got["attention_type"] == "cross"                       # fix 4
    assert got["final_layernorm"].startswith("transformer_engine.")
    assert got["key_diff"] == []  # same checkpoint keys as the local spec (besides _extra_state)


def _assert_matches_dense(got: dict) -> None:
    assert abs(got["loss_te"] - got["loss_dense"]) <= FP32_TOL * max(1.0, got["loss_dense"])
    assert got["max_grad_diff"] <= FP32_TOL * max(1.0, got["max_grad"])


def test_te_backend_matches_dense_forward_backward(standin):
    got = standin.run("te_vs_dense")
    _assert_matches_dense(got)
    calls = got["calls"]
    assert {c["backend"] for c in calls} == {"FusedAttention"}
    assert {c["attn_mask_type"] for c in calls} == {"padding", "padding_causal_bottom_right"}
    assert any(c["max_seqlen_q"] != c["max_seqlen_kv"] for c in calls)  # the text call


@pytest.mark.parametrize("knobs", [{"gated_attention": False}, {"qk_layernorm": True}],
                         ids=["no_gate", "qk_norm"])
def test_te_backend_matches_dense_with_ablation_knobs(standin, knobs):
    # qk_layernorm takes TESpecProvider.layer_norm(for_qk=True) (TENorm) on the TE side.
    got = standin.run("te_vs_dense", model=knobs)
    _assert_matches_dense(got)
    names = got["grad_names"]
    assert any("q_layernorm" in n for n in names) is bool(knobs.get("qk_layernorm"))
    assert got["qkv_rows"] == (4 if knobs.get("gated_attention", True) else 3) * 64


@pytest.mark.parametrize("env_vars", [{"NVTE_FUSED_ATTN": "0"}, {"TE_STANDIN_SM_ARCH": "80"}],
                         ids=["fused-disabled", "a100-thd"])
def test_unfused_backend_runs_the_text_call(standin, env_vars):
    # A100 (no cuDNN THD) or NVTE_FUSED_ATTN=0 without flash-attn: TE's unfused path.
    got = standin.run("te_vs_dense", env_vars=env_vars)
    _assert_matches_dense(got)
    assert {c["backend"] for c in got["calls"]} == {"UnfusedDotProductAttention"}


def test_unfused_mask_from_cu_seqlens_q_only_breaks_the_text_call(standin):
    # What megatron builds by default (attention_type="self"): TE's unfused path makes the
    # padding mask from cu_seqlens_q alone and cannot broadcast it against [sq, skv].
    assert standin.run("unfused_self_attention", attention_type="cross") == "ok"
    broken = standin.run("unfused_self_attention", attention_type="self")
    assert broken.startswith("error:") and "must match the size" in broken


def test_cudnn_96_fused_path_needs_rounded_maxima(standin):
    got = standin.run("cudnn_96", round_maxima=True)
    assert got["error"] is None
    _assert_matches_dense(got)
    assert {c["backend"] for c in got["calls"]} == {"FusedAttention"}
    assert all(c["max_seqlen_q"] % 64 == 0 and c["max_seqlen_kv"] % 64 == 0
               for c in got["calls"])
    exact = standin.run("cudnn_96", round_maxima=False)
    assert "No dot product attention backend is available" in exact["error"]
    assert "multiples of 64" in exact["error"]


def test_old_cudnn_is_reported_at_start_up(standin):
    assert standin.run("cudnn_warning", version="9.10.0") == []
    (message,) = standin.run("cudnn_warning", version="9.5.1")
    assert "cuDNN 9.5.1 cannot run the prefix-LM text call fused" in message


def test_fp8_tensorwise_runs_through_te_layers(standin):
    got = standin.run("fp8_tensorwise")
    assert got["error"] is None
    assert got["autocast_calls"] > 0 and got["recipe_is_current_scaling"]
    assert got["config_recipe"].endswith("tensorwise")
    assert got["loss_fp8"] == got["loss_plain"]  # the stand-in keeps GEMMs in high precision
    # 1 row × 44 tokens: TE's FP8 GEMM rule (rows % 8) fails, as config validation predicts.
    misaligned = standin.run("fp8_tensorwise", seq=44, rows=[[(2, 3, 7), (1, 2, 6)]])
    assert "divisible by 8" in misaligned["error"]


def test_gradient_accumulation_fusion_with_te_linears(standin):
    got = standin.run("wgrad_fusion")
    assert got["te_linear_fused"] and not got["head_fused"]  # LM head: local, no Apex
    assert got["max_diff"] <= FP32_TOL * max(1.0, got["max_grad"])

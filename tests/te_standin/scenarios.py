"""Scenario bodies executed in the TE stand-in worker (see ``harness.py``); results are plain
picklable values that the test functions in ``test_*.py`` assert on."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from reference_genlip import make_packed_batch
from training_helpers import TINY_CONFIG, tiny_overrides

from harness import env

# Several samples per row, text-only and image-only ones too; the 6×12 image makes the text
# call's key maximum (80 → 128 after rounding) differ from its query maximum (→ 64).
ROWS = [[(6, 12, 8), (1, 2, 6)],
        [(2, 3, 7), (0, 0, 5), (1, 2, 6), (2, 2, 0), (3, 2, 9)]]
SEQ, VOCAB = 96, 256


@contextlib.contextmanager
def mp_state(seed: int = 1234) -> Iterator[None]:
    """megatron parallel state TP = PP = 1 for one scenario, torn down afterwards."""
    from megatron.core import parallel_state, tensor_parallel

    from genlip_megatron.training.parallel import destroy_topology

    destroy_topology()
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        destroy_topology()


def _tconfig(te: bool, *, precision=None, init_seed: int = 1234, **model_overrides):
    from genlip_megatron.config import ParallelConfig, PrecisionConfig, decode_variant
    from genlip_megatron.model.transformer_config import build_transformer_config

    model = dataclasses.replace(decode_variant("tiny"),
                                transformer_impl="te" if te else "local",
                                attention_backend="te" if te else "dense", **model_overrides)
    return build_transformer_config(model, ParallelConfig(),
                                    precision or PrecisionConfig(params_dtype="fp32"),
                                    init_seed=init_seed, has_cuda=False)


def _model(te: bool, **kwargs):
    from genlip_megatron.model.genlip import GenLIPMegatronModel

    return GenLIPMegatronModel(_tconfig(te, **kwargs))


def _batch(rows=ROWS, seq: int = SEQ) -> dict:
    return make_packed_batch(rows, seq, VOCAB, seed=11)


def _loss(model, b: dict) -> torch.Tensor:
    per_token = model(b["tokens"], b["position_ids"], b["image_mask"], b["segment_ids"],
                      b["pixel_values"], labels=b["labels"])
    mask = (b["labels"] >= 0).float()
    return (per_token.float() * mask).sum() / mask.sum()


def _canonical_grads(model) -> dict:
    """name → grad with the local norms renamed to TE's fused ``layer_norm_*`` names."""
    from genlip_megatron.model.layer_spec import canonical_name

    return {canonical_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}


def _attention_calls() -> list[dict]:
    from transformer_engine.pytorch.attention import CALL_LOG

    return list(CALL_LOG)


def _clear_calls() -> None:
    from transformer_engine.pytorch.attention import CALL_LOG

    CALL_LOG.clear()


# ------------------------------------------------------------------------------ scenarios
def standin_facts() -> dict:
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.fp8_utils as fp8_utils
    import megatron.core.transformer.transformer_block as block
    from megatron.core import optimizer
    from megatron.core.utils import get_te_version

    from genlip_megatron.compat.te import transformer_engine_available

    return {"have_te": [te_ext.HAVE_TE, fp8_utils.HAVE_TE, block.HAVE_TE],
            "version": str(get_te_version()), "te_available": transformer_engine_available(),
            "cuda": torch.cuda.is_available(),
            "torch_adam": bool(optimizer.USING_PYTORCH_OPTIMIZER)}


def spec_classes() -> dict:
    with mp_state():
        te_model, local_model = _model(True), _model(False)
    layer = te_model.decoder.layers[0]
    attn = layer.self_attention
    te_keys = {k for k in te_model.state_dict() if not k.endswith("_extra_state")}
    local_keys = {k for k in local_model.state_dict() if not k.endswith("_extra_state")}
    from genlip_megatron.model.layer_spec import canonical_name

    renamed = {canonical_name(k) for k in local_keys}
    return {"linear_qkv": type(attn.linear_qkv).__name__,
            "linear_proj": type(attn.linear_proj).__name__,
            "core_attention": type(attn.core_attention).__name__,
            "attention_type": attn.core_attention.attention_type,
            "linear_fc1": type(layer.mlp.linear_fc1).__name__,
            "final_layernorm": type(te_model.decoder.final_layernorm).__module__,
            "key_diff": sorted(te_keys ^ renamed)}


def te_vs_dense(env_vars: Optional[dict] = None, rows=None, seq: int = SEQ,
                model: Optional[dict] = None) -> dict:
    """Same init, same packed batch: TE model vs the local model with dense attention
    (``model``: ModelConfig overrides for both, e.g. the ablation knobs)."""
    with env(**(env_vars or {})), mp_state():
        b = _batch(rows or ROWS, seq)
        out = {}
        for te in (True, False):
            model_ = _model(te, **(model or {}))
            _clear_calls()
            loss = _loss(model_, b)
            loss.backward()
            out[te] = (float(loss.detach()), _canonical_grads(model_), _attention_calls())
    (l_te, g_te, calls), (l_dense, g_dense, _) = out[True], out[False]
    assert g_te.keys() == g_dense.keys(), sorted(g_te.keys() ^ g_dense.keys())
    return {"loss_te": l_te, "loss_dense": l_dense,
            "max_grad_diff": max(float((g_te[k] - g_dense[k]).abs().max()) for k in g_te),
            "max_grad": max(float(g.abs().max()) for g in g_dense.values()),
            "calls": calls, "grad_names": sorted(g_te),
            "qkv_rows": int(g_te["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0])}


def unfused_self_attention(attention_type: str) -> str:
    """The text call through TE's unfused path with a module built for ``attention_type``."""
    from megatron.core.transformer.enums import AttnMaskType

    from genlip_megatron.model.attention import build_prefix_lm_params
    from genlip_megatron.model.attention_te import TEPrefixLMAttention

    with env(NVTE_FUSED_ATTN="0"), mp_state():
        cfg = _tconfig(True)
        core = TEPrefixLMAttention(config=cfg, layer_number=1,
                                   attn_mask_type=AttnMaskType.padding, attention_type="self")
        core.attention_type = attention_type  # what megatron would build without our override
        b = _batch()
        S, B = b["tokens"].shape[1], b["tokens"].shape[0]
        q, k, v = (torch.randn(S, B, 4, 16) for _ in range(3))
        try:
            core(q, k, v, None, packed_seq_params=build_prefix_lm_params(
                "te", b["segment_ids"], b["image_mask"]))
        except RuntimeError as exc:
            return f"error: {exc}"
    return "ok"


def cudnn_96(round_maxima: bool) -> dict:
    """cuDNN 9.6 rules, no unfused fallback: the text call needs maxima multiples of 64."""
    import genlip_megatron.model.attention_te as attention_te

    saved = attention_te.round_up_seqlen
    if not round_maxima:
        attention_te.round_up_seqlen = lambda n, align=64: int(n)
    try:
        result = te_vs_dense({"TE_STANDIN_CUDNN_VERSION": "9.6.0", "NVTE_UNFUSED_ATTN": "0"})
        result["error"] = None
    except ValueError as exc:
        result = {"error": str(exc)}
    finally:
        attention_te.round_up_seqlen = saved
    return result


def extra_state_resume(tmp: str, drop_hook: bool, break_weight: bool = False) -> dict:
    """Save a TE model with CheckpointManager, load it into a freshly initialised one."""
    from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
    from genlip_megatron.config.training import CheckpointConfig

    hook = {"TE_STANDIN_DROP_EXTRA_STATE_HOOK": "1" if drop_hook else "0"}
    out = {}
    with env(**hook), mp_state():
        src = _model(True, init_seed=1)
        keys = [k for k in src.state_dict() if k.endswith("_extra_state")]
        out["extra_state_keys"] = len(keys)
        out["core_attention_extra_state_in_state_dict"] = any(
            "core_attention._extra_state" in k for k in keys)
        mgr = CheckpointManager(CheckpointConfig(save_dir=tmp))
        mgr.save([src], None, None, TrainingState(step=3), None, {"model": {}})
        dst = _model(True, init_seed=2)
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load({"model": dst.sharded_state_dict()},
                                         tmp + "/iter_0000003")["model"]
        try:
            _model(True, init_seed=3).load_state_dict(loaded)
            out["torch_strict_load"] = "ok"
        except Exception as exc:  # noqa: BLE001 - record what a plain strict load does
            out["torch_strict_load"] = f"error: {type(exc).__name__}: {exc}"[:300]
        try:
            if break_weight:  # a genuinely missing weight must still be an error
                from genlip_megatron.training.checkpointing import load_model_state

                load_model_state(dst, {k: v for k, v in loaded.items()
                                       if not k.endswith("linear_fc2.bias")})
            mgr.load(tmp, [dst], None, None, None, {"model": {}}, with_optimizer=False)
            out["manager_load"] = "ok"
        except Exception as exc:  # noqa: BLE001
            out["manager_load"] = f"error: {type(exc).__name__}: {exc}"[:400]
        src_sd, dst_sd = src.state_dict(), dst.state_dict()
        out["weights_equal"] = all(torch.equal(src_sd[k], dst_sd[k]) for k in src_sd
                                   if not k.endswith("_extra_state") and k in dst_sd
                                   and torch.is_tensor(dst_sd[k]))
    return out


# --------------------------------------------------------------------- trainer-based scenarios
def _run_config(data_dir: str, save_dir: str, **extra):
    from genlip_megatron.config import load_config

    sets = tiny_overrides(Path(data_dir), Path(save_dir), model__transformer_impl="te",
                          model__attention_backend="te", **extra)
    return load_config(TINY_CONFIG, sets).validate(world_size=1)


def _train(cfg, step_hook=None) -> tuple[dict, dict]:
    """Run the Trainer; returns ({step: loss}, final float state dict of the model)."""
    from genlip_megatron.training.checkpointing import unwrap_model
    from genlip_megatron.training.parallel import destroy_topology
    from genlip_megatron.training.trainer import Trainer

    destroy_topology()
    trainer = Trainer(cfg)
    if step_hook is not None:
        original = trainer.train_step

        def train_step():
            step_hook(trainer)
            return original()

        trainer.train_step = train_step
    try:
        summary = trainer.train()
    finally:
        trainer.close()
        model_sd = {k: v.detach().clone() for k, v in
                    unwrap_model(trainer.model[0]).state_dict().items() if torch.is_tensor(v)}
        destroy_topology()
    return {s: loss for s, loss, _ in summary.losses}, model_sd


def train_resume(data_dir: str, tmp: str) -> dict:
    """4 steps with checkpoints at 2 and 4; then resume a copy of iter_2 and run steps 3-4.

    Runs as a TE without ``remove_extra_states_check`` would (TE announces its removal).
    """
    with env(TE_STANDIN_DROP_EXTRA_STATE_HOOK="1"):
        full_dir, resume_dir = Path(tmp) / "full", Path(tmp) / "resumed"
        cfg = _run_config(data_dir, str(full_dir), training__train_steps=4,
                          checkpoint__save_interval=2)
        losses_a, weights_a = _train(cfg)
        resume_dir.mkdir(parents=True)
        shutil.copytree(full_dir / "iter_0000002", resume_dir / "iter_0000002")
        (resume_dir / "latest").write_text("iter_0000002\n")
        cfg_b = _run_config(data_dir, str(resume_dir), training__train_steps=4,
                            checkpoint__save_interval=2)
        losses_b, weights_b = _train(cfg_b)
    return {"losses_full": losses_a, "losses_resumed": losses_b,
            "weights_identical": weights_a.keys() == weights_b.keys() and all(
                torch.equal(weights_a[k], weights_b[k]) for k in weights_a),
            "checkpoint": str(full_dir / "iter_0000004")}


def convert_roundtrip(ckpt: str, tmp: str) -> dict:
    """Megatron (TE) → HF → Megatron, then ``init_from``-style load into a TE model."""
    from genlip_megatron.convert.converter import hf_to_megatron, megatron_to_hf
    from genlip_megatron.training.checkpointing import CheckpointManager
    from genlip_megatron.config.training import CheckpointConfig

    hf_dir, back_dir = Path(tmp) / "hf", Path(tmp) / "back"
    megatron_to_hf(ckpt, hf_dir, dtype="fp32", progress=False)
    hf_to_megatron(hf_dir, back_dir, progress=False)
    model_kw = {"num_layers": 4, "vocab_size": 256}
    with env(TE_STANDIN_DROP_EXTRA_STATE_HOOK="1"), mp_state():
        direct, via_hf = _model(True, **model_kw), _model(True, init_seed=9, **model_kw)
        from megatron.core import dist_checkpointing

        run_config = dist_checkpointing.load_common_state_dict(ckpt)["config"]
        mgr = CheckpointManager(CheckpointConfig())
        mgr.load(ckpt, [direct], None, None, None, run_config, with_optimizer=False)
        mgr.load(back_dir, [via_hf], None, None, None, run_config, with_optimizer=False)
        a, b = direct.state_dict(), via_hf.state_dict()
        keys = [k for k in a if torch.is_tensor(a[k]) and not k.endswith("_extra_state")]
        return {"files": sorted(p.name for p in hf_dir.iterdir()), "num_tensors": len(keys),
                "max_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)}


def async_publish(data_dir: str, tmp: str) -> dict:
    """Async save at step 2; the writer is allowed to finish before step 3. Where does
    ``latest`` point when step 4 starts (before step 4's own save)?"""
    from genlip_megatron.training.checkpointing import CheckpointManager

    seen = {}

    def hook(trainer):
        step = trainer.state.step
        queue = trainer.ckpt._async_queue
        if step == 3 and queue is not None:
            for call in list(queue.async_calls):  # let the forked writer finish first
                process = getattr(call.async_caller, "process", None)
                if process is not None:
                    process.join(timeout=120)
        latest = Path(tmp) / "latest"
        seen[step] = latest.read_text().strip() if latest.is_file() else None

    from genlip_megatron.compat import cpu_compat_disabled

    saved = CheckpointManager._async_enabled
    # Async saves on CPU: megatron's real machinery (forked writer, Manager result queue); the
    # CPU compat's in-process result queue only serves synchronous saves.
    CheckpointManager._async_enabled = lambda self: bool(self.cfg.async_save)
    try:
        with cpu_compat_disabled("checkpoint_queue"):
            cfg = _run_config(data_dir, tmp, training__train_steps=4,
                              checkpoint__save_interval=2, checkpoint__async_save="true")
            _train(cfg, step_hook=hook)
    finally:
        CheckpointManager._async_enabled = saved
    return {"latest_at_step_start": seen, "final": (Path(tmp) / "latest").read_text().strip(),
            "dirs": sorted(p.name for p in Path(tmp).iterdir() if p.name.startswith("iter_"))}


def fp8_tensorwise(seq: int = SEQ, rows=None) -> dict:
    """FP8 (tensorwise current scaling) through megatron's TE path: recipe, autocast, extra
    state, TE's GEMM shape rule."""
    from transformer_engine.common.recipe import Float8CurrentScaling
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    from genlip_megatron.config import Fp8Config, PrecisionConfig

    prec = PrecisionConfig(params_dtype="fp32", fp8=Fp8Config(recipe="tensorwise"))
    with mp_state():
        b = _batch(rows or ROWS, seq)
        fp8_model = _model(True, precision=prec)
        plain = _model(True)
        before = FP8GlobalStateManager.autocast_calls
        try:
            loss = float(_loss(fp8_model, b).detach())
        except AssertionError as exc:
            return {"error": str(exc)}
        calls = FP8GlobalStateManager.autocast_calls - before
        import pickle

        state = fp8_model.decoder.layers[0].self_attention.linear_qkv.get_extra_state()
        recipe = pickle.loads(state.numpy().tobytes())["recipe"] if state.numel() else None
        return {"error": None, "autocast_calls": calls, "loss_fp8": loss,
                "loss_plain": float(_loss(plain, b).detach()),
                "recipe_is_current_scaling": isinstance(recipe, Float8CurrentScaling),
                "config_recipe": str(fp8_model.config.fp8_recipe)}


def wgrad_fusion() -> dict:
    """TE linears with ``gradient_accumulation_fusion`` under megatron DDP vs without."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from genlip_megatron.model.genlip import GenLIPMegatronModel

    grads = {}
    with mp_state():
        b = _batch()
        for fused in (True, False):
            cfg = _tconfig(True)
            cfg.gradient_accumulation_fusion = fused
            model = DistributedDataParallel(cfg, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True), GenLIPMegatronModel(cfg))
            model.zero_grad_buffer()
            _loss(model, b).backward()
            model.finish_grad_sync()
            grads[fused] = {n: p.main_grad.detach().clone()
                            for n, p in model.module.named_parameters()}
            head = model.module.output_layer
            grads[f"head_{fused}"] = head.gradient_accumulation_fusion
            fused_linear = model.module.decoder.layers[0].self_attention.linear_qkv
            grads[f"te_{fused}"] = fused_linear.fuse_wgrad_accumulation
    return {"max_diff": max(float((grads[True][n] - grads[False][n]).abs().max())
                            for n in grads[True]),
            "max_grad": max(float(g.abs().max()) for g in grads[False].values()),
            "te_linear_fused": grads["te_True"], "head_fused": grads["head_True"]}


def gpu_smoke(tmp: str, data_dir: str, checks: list) -> list:
    """tools/gpu_smoke.py's checks that need no CUDA, on the tiny size (CPU + TE stand-in)."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gpu_smoke", root / "tools" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["gpu_smoke"] = smoke  # dataclasses look their module up
    spec.loader.exec_module(smoke)
    ctx = smoke.Smoke(Path(tmp), size="tiny", data_dir=Path(data_dir))
    return [(r.name, r.ok, r.detail) for r in smoke.run_checks(checks, ctx)]


def cross_backend_init(tmp: str, src_te: bool, dst_te: bool) -> dict:
    """Checkpoint a model of one implementation, ``init_from`` it into the other."""
    from genlip_megatron.training.checkpointing import CheckpointManager, TrainingState
    from genlip_megatron.config.training import CheckpointConfig

    with env(TE_STANDIN_DROP_EXTRA_STATE_HOOK="1"), mp_state():
        src, dst = _model(src_te, init_seed=1), _model(dst_te, init_seed=2)
        mgr = CheckpointManager(CheckpointConfig(save_dir=tmp))
        mgr.save([src], None, None, TrainingState(step=1), None, {"model": {}})
        from genlip_megatron.training.checkpointing import drop_absent_extra_state

        dropped = drop_absent_extra_state({"model": dst.sharded_state_dict()},
                                          Path(tmp) / "iter_0000001")
        try:
            mgr.load(tmp, [dst], None, None, None, {"model": {}}, with_optimizer=False)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"[-600:]}
        from genlip_megatron.model.layer_spec import canonical_name

        def canon(sd):
            return {canonical_name(k): v for k, v in sd.items()
                    if torch.is_tensor(v) and not k.endswith("_extra_state")}

        a, b = canon(src.state_dict()), canon(dst.state_dict())
        return {"error": None, "dropped": dropped,
                "equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}


def cudnn_warning(version: str) -> list:
    """Warnings logged when the TE attention module is built under cuDNN ``version``."""
    import logging

    import genlip_megatron.model.attention_te as attention_te

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    attention_te.logger.addHandler(handler)
    attention_te.check_fused_text_call_support.cache_clear()
    try:
        with env(TE_STANDIN_CUDNN_VERSION=version), mp_state():
            _model(True)
    finally:
        attention_te.logger.removeHandler(handler)
        attention_te.check_fused_text_call_support.cache_clear()
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]

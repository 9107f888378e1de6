"""MoE router kernels: megatron imports these names from TE >= 2.7; GenLIP has no MoE."""


def _missing(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"the TE stand-in does not implement {name} (MoE).")

    fn.__name__ = name
    return fn


fused_topk_with_score_function = _missing("fused_topk_with_score_function")
fused_compute_score_for_moe_aux_loss = _missing("fused_compute_score_for_moe_aux_loss")
fused_moe_aux_loss = _missing("fused_moe_aux_loss")

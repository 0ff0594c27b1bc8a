"""transformer_engine.pytorch.router (stand-in): MoE router kernels, names only (imported by Megatron for
TE >= 2.7; calling them raises)."""


def _missing(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"TE stand-in: {name} (MoE router kernel) is not emulated")

    fn.__name__ = name
    return fn


fused_topk_with_score_function = _missing("fused_topk_with_score_function")
fused_compute_score_for_moe_aux_loss = _missing("fused_compute_score_for_moe_aux_loss")
fused_moe_aux_loss = _missing("fused_moe_aux_loss")

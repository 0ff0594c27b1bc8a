"""Which kernels fill Megatron's layer slots: *local* (pure PyTorch, CPU/CI), *sdpa* (GPU without Transformer
Engine) or *te* (Transformer Engine).

A Megatron `TransformerLayer` is a set of slots (norms, QKV linear, core attention, projection, MLP
linears). The backends fill them differently, and TE's fused norm+linear changes parameter *names*:

    slot             local                      sdpa                   te
    attention norm   input_layernorm.weight     (as local)             self_attention.linear_qkv.layer_norm_weight
    MLP norm         pre_mlp_layernorm.weight   (as local)             mlp.linear_fc1.layer_norm_weight
    core attention   DotProductAttention        SDPACoreAttention      TEDotProductAttention
                     (dense S x S scores)       (torch SDPA: flash /   (flash / cuDNN fused)
                                                mem-efficient)

'sdpa' is the local spec with the core attention swapped (sdpa_attention.py), so its parameter names are
local's. Its norms are local's `WrappedTorchNorm` -> `torch.nn.RMSNorm`, whose forward `F.rms_norm`
dispatches to torch's fused `_fused_rms_norm` kernel, with one change: weights in params_dtype (local keeps
them fp32, and a bf16 input with an fp32 weight misses the fused kernel). Megatron's other local norm,
`FusedLayerNorm`, needs apex and does LayerNorm only. On CUDA 'sdpa' also turns on Megatron's fused
bias+SwiGLU (torch.compile'd, no TE needed).

`NORM_PARAM_NAMES` records the naming difference in one place; `hf_mapping` reads it, so conversion and
weight sync follow whatever backend built the model. The backend is chosen once, from the config and the
hardware (`resolve_backend`): "auto" means TE when CUDA is up and `transformer_engine` imports, sdpa on CUDA
without TE, else local. TE is imported lazily, only when asked for, and a missing install fails with a
message that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Literal

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

SpecChoice = Literal["auto", "local", "sdpa", "te"]
Backend = Literal["local", "sdpa", "te"]

_LOCAL_NORM_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "pre_mlp_layernorm.weight",
}
# Slot name -> parameter name (relative to a decoder layer) per backend. See module docstring.
NORM_PARAM_NAMES: dict[Backend, dict[str, str]] = {
    "local": _LOCAL_NORM_NAMES,
    "sdpa": _LOCAL_NORM_NAMES,  # same slots as local, only the core attention differs
    "te": {
        "attn_norm": "self_attention.linear_qkv.layer_norm_weight",
        "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
    },
}


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch bindings can be found (without importing them)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(spec: SpecChoice = "auto", *, cp_size: int = 1, packed_sequences: bool = False) -> Backend:
    """'auto' -> 'te' on a CUDA machine with Transformer Engine installed, 'sdpa' on CUDA without TE, else
    'local' ('sdpa' under context parallelism or with packed sequences, which the local spec lacks).
    'local' and 'sdpa' can be forced anywhere (sdpa runs on CPU too: tests)."""
    if spec in ("local", "sdpa"):
        return spec
    if spec == "te":
        _require_te()
        return "te"
    if spec == "auto":
        if not torch.cuda.is_available():
            return "sdpa" if cp_size > 1 or packed_sequences else "local"
        if te_available():
            _require_te()  # installed but broken: say so rather than fail deep inside Megatron
            return "te"
        return "sdpa"
    raise ValueError(f"spec must be 'auto', 'local', 'sdpa' or 'te', got {spec!r}")


def _require_te() -> None:
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "spec='te' needs Transformer Engine: pip install 'calibrl-mcore[gpu]' (transformer-engine[pytorch]) "
            f"or use spec='sdpa' / 'local' (import failed: {err})"
        ) from err
    # The CPU tests' stand-in package (tests/te_standin) carries TE's classes without CUDA kernels.
    if not torch.cuda.is_available() and not getattr(transformer_engine, "STANDIN", False):
        raise RuntimeError(
            "spec='te' needs a CUDA device (Transformer Engine kernels are GPU-only); use 'local' or 'sdpa'"
        )


class TorchNormInParamsDtype:
    """Megatron's `WrappedTorchNorm` (`torch.nn.RMSNorm` / `LayerNorm`) with its weight in `params_dtype`.

    `WrappedTorchNorm` always builds fp32 weights; in a bf16 model the input is bf16, and torch's fused
    norm kernel (aten `_fused_rms_norm`) needs input and weight of one dtype, else it falls back to the
    unfused composite ("Mismatch dtype between input and weight ... Cannot dispatch to fused
    implementation"). Same parameter names; a class (not a function) because `build_module` calls classes.

    Sequence parallelism (which `WrappedTorchNorm` refuses): a norm is per token, so on a [s/tp, b, h]
    shard it computes exactly its part; only its weight's gradient is partial per TP rank. The weight is
    marked `sequence_parallel` (as TE's norms mark theirs), so that Megatron's `finalize_model_grads`
    all-reduces those gradients over TP.
    """

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs
    ) -> torch.nn.Module:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = dataclasses.replace(config, sequence_parallel=False)  # only for the constructor's check
        norm = WrappedTorchNorm(config=config, hidden_size=hidden_size, eps=eps, **kwargs)
        norm = norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm


def norm_module(backend: Backend) -> type:
    """A standalone RMSNorm/LayerNorm module (final norm, patch-merger norm) for `backend`.

    local: `WrappedTorchNorm` (fp32 weights, as before). sdpa: the same torch norms with weights in
    params_dtype, so that bf16 runs hit torch's fused kernels. te: `TENorm`.
    """
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    if backend == "sdpa":
        return TorchNormInParamsDtype
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def core_attention_module(backend: Backend) -> type:
    """The class for `SelfAttentionSubmodules.core_attention`: S x S local, torch SDPA, or TE's."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    if backend == "sdpa":
        from .sdpa_attention import SDPACoreAttention

        return SDPACoreAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def linear_modules(backend: Backend) -> tuple[type, type]:
    """(column-parallel, row-parallel) linear classes without a fused norm."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear, _row_parallel_linear()


@functools.cache
def _row_parallel_linear() -> type:
    """Megatron's `RowParallelLinear`, handing its own TP group to the matmul.

    Megatron 0.16.1's `RowParallelLinear.forward` calls the matmul with `tp_group=None`, which
    `get_tensor_model_parallel_group_if_none` answers with a `warnings.warn` on every forward: harmless
    eagerly, but a graph break wherever the layer is `torch.compile`d (`vlm_base.compile_decoder_layers`).
    The group is only read for sequence-parallel / dgrad all-reduce, both off in that call, so the numerics
    are the same; parameter names too.
    """
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallelLinearWithGroup(RowParallelLinear):
        def _forward_impl(self, input, weight, *args, **kwargs):
            if kwargs.get("tp_group", 0) is None:
                kwargs["tp_group"] = self.tp_group
            return super()._forward_impl(input, weight, *args, **kwargs)

    return RowParallelLinearWithGroup


def transformer_layer_spec(backend: Backend, attn_mask_type: AttnMaskType) -> ModuleSpec:
    """A pre-norm TransformerLayer (attention + SwiGLU/GELU MLP) with its slots filled for `backend`.

    attn_mask_type: `causal` for the language decoder; `arbitrary` for the vision tower, whose window /
    per-image attention is given as an explicit block-diagonal mask.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    column, row = linear_modules(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        # TE fuses the pre-norm into the following linear: the norm slots stay empty.
        attn_norm, mlp_norm = IdentityOp, IdentityOp
        qkv = fc1 = TELayerNormColumnParallelLinear
    else:  # local, sdpa: standalone norms, Megatron's own linears
        attn_norm = mlp_norm = norm_module(backend)
        qkv = fc1 = column
    core_attention = core_attention_module(backend)

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=attn_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(backend: Backend, config: TransformerConfig, attn_mask_type: AttnMaskType):
    """TransformerBlockSubmodules for this pipeline stage's layers + the backend's final norm.

    Built here rather than handing a layer spec to TransformerBlock, whose fallback final norm is picked
    from what happens to be installed (apex's FusedLayerNorm cannot do RMSNorm).
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = transformer_layer_spec(backend, attn_mask_type)
    num_layers = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm_module(backend))


def mlp_spec(backend: Backend) -> MLPSubmodules:
    """Plain (non-norm-fused) MLP slots, used by the vision patch merger."""
    column, row = linear_modules(backend)
    return MLPSubmodules(linear_fc1=column, linear_fc2=row)


def backend_config_kwargs(backend: Backend, params_dtype: torch.dtype) -> dict:
    """TransformerConfig flags that depend on the backend/hardware rather than on the architecture.

    CPU (local spec, and the te spec on the tests' TE stand-ins): every fused kernel off (they are CUDA-only)
    and fp32 softmax. TE: masked-softmax fusion on (read only by Megatron's own attention, unused), fused
    bias+SwiGLU on CUDA. sdpa: fused bias+SwiGLU on when CUDA is up (Megatron's
    torch.compile'd kernel; off on CPU, where sdpa must compute exactly what local does), masked softmax
    unused (SDPA does the softmax). RoPE fusion stays off everywhere: Megatron's fused RoPE does not take the
    per-token (M-RoPE / 2D vision) frequency tables used here.
    """
    on_te = backend == "te"
    fused_activation = backend in ("te", "sdpa") and torch.cuda.is_available()
    return dict(
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # dtype of the activations sent between pipeline stages
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=fused_activation,
        masked_softmax_fusion=on_te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Megatron 0.16's default "full" is deprecated (a warning per config) and means the same as [].
        cuda_graph_scope=[],
    )

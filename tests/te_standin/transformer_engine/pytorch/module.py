"""TE 2.11's modules (stand-in): `Linear`, `LayerNormLinear`, `RMSNorm`, `LayerNorm`, `GroupedLinear`.

Signatures, parameter names, TP attributes and `_extra_state` follow TE 2.11 `pytorch/module/{base,linear,
layernorm_linear,rmsnorm,layernorm,grouped_linear}.py`; the math is eager torch (fp32 norms, as TE computes
them), the TP communication is Megatron's autograd mappings (the same collectives TE issues).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..common.recipe import DelayedScaling, Float8BlockScaling
from .fp8 import FP8GlobalStateManager

GemmParallelModes = ("row", "column", None)
_E4M3_MAX = 448.0
_BLOCK_LEN = 128  # Float8BlockQuantizer.block_len


def assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    """TE 2.11 `pytorch/utils.py`, verbatim rule and message."""
    for tensor in tensors:
        assert math.prod(tensor.shape[:-1]) % 8 == 0 and tensor.shape[-1] % 16 == 0, (
            "FP8 execution requires the product of all dimensions except the last to be divisible"
            " by 8 and the last dimension to be divisible by 16, but got tensor with"
            f" dims={list(tensor.size())}"
        )


def _block_quantizable(inp: torch.Tensor) -> bool:
    """`Float8BlockQuantizer.is_quantizable` (tensor/float8_blockwise_tensor.py)."""
    return inp.ndim >= 2 and inp.shape[-1] % _BLOCK_LEN == 0 and math.prod(inp.shape[:-1]) % _BLOCK_LEN == 0


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


class TransformerEngineBaseModule(torch.nn.Module):
    """module/base.py: TP group bookkeeping, parameter init metadata, FP8 meta in `_extra_state`."""

    def __init__(self) -> None:
        super().__init__()
        self.param_init_meta: dict[str, tuple[Callable | None, Callable | None]] = {}
        self.fp8_meta: dict = {}
        self.tp_group = None
        self.tp_group_initialized = False

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def set_nccl_overlap_warning_if_tp(self) -> None:
        pass

    def register_parameter(self, name, param, **kwargs) -> None:
        super().register_parameter(name, param)
        if param is not None:
            self.param_init_meta[name] = (kwargs.get("init_fn"), kwargs.get("get_rng_state_tracker"))

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            init_fn, tracker = self.param_init_meta.get(name, (None, None))
            if init_fn is None:
                continue
            with torch.no_grad():
                if tracker is None:
                    init_fn(param)
                else:
                    with tracker().fork(getattr(self, "rng_tracker_name", None) or "model-parallel-rng"):
                        init_fn(param)

    # FP8 meta ("scaling_fwd": amax history + scale per GEMM input) travels in `_extra_state`, a uint8 tensor,
    # empty without FP8, as TE 2.11 get_extra_state / set_extra_state.
    def get_extra_state(self) -> torch.Tensor:
        if not self.fp8_meta:
            return torch.empty(0, dtype=torch.uint8)
        state = {k: {"amax_history": v["amax_history"].cpu(), "scale": float(v["scale"])}
                 for k, v in self.fp8_meta.items()}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        loaded = pickle.loads(state.detach().cpu().numpy().tobytes())
        self.fp8_meta = {k: {"amax_history": v["amax_history"], "scale": v["scale"], "fmax": _E4M3_MAX}
                         for k, v in loaded.items()}

    # ---- FP8 emulation: per-tensor e4m3 quantise-dequantise (straight-through gradient) ----------------------

    def _fp8_qdq(self, x: torch.Tensor, key: str) -> torch.Tensor:
        recipe = FP8GlobalStateManager.get_fp8_recipe()
        amax = x.detach().abs().amax().float()
        if isinstance(recipe, DelayedScaling):  # scale from the history; this amax joins it at autocast exit
            history_len = recipe.amax_history_len
            meta = self.fp8_meta.get(key)
            if meta is None or meta["amax_history"].numel() != history_len:
                meta = self.fp8_meta[key] = {"amax_history": torch.zeros(history_len), "scale": 1.0,
                                             "fmax": _E4M3_MAX}
            FP8GlobalStateManager.record_amax(amax, meta)
            scale = torch.as_tensor(meta["scale"], dtype=torch.float32)
        else:  # current / block scaling: from this tensor
            scale = _E4M3_MAX / amax.clamp_min(1e-12)
        q = (x.float() * scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).float() / scale
        return x + (q.to(x.dtype) - x).detach()


def _init_linear(module, in_features, out_features, tp_group, tp_size, parallel_mode, sequence_parallel,
                 params_dtype, device, bias, return_bias, init_method, get_rng_state_tracker, parameters_split):
    if parameters_split is not None:
        raise NotImplementedError("TE stand-in: parameters_split is not emulated")
    module.in_features, module.out_features = in_features, out_features
    module.use_bias, module.return_bias = bias, return_bias
    module.apply_bias = bias and not return_bias
    module.get_rng_state_tracker = get_rng_state_tracker
    if tp_group is None:
        module.tp_size = tp_size
        if tp_size == 1:
            module.set_tensor_parallel_group(tp_group)
    else:
        module.tp_size = _group_size(tp_group)
        module.set_tensor_parallel_group(tp_group)
    assert parallel_mode in GemmParallelModes, f"parallel_mode {parallel_mode} not supported"
    module.parallel_mode = parallel_mode
    if parallel_mode == "column":
        module.out_features = out_features // module.tp_size
    elif parallel_mode == "row":
        module.in_features = in_features // module.tp_size
    module.sequence_parallel = module.tp_size > 1 and sequence_parallel
    params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
    module.weight_names, module.bias_names = ["weight"], ["bias"]
    module.register_parameter(
        "weight", torch.nn.Parameter(torch.empty(module.out_features, module.in_features, device=device,
                                                 dtype=params_dtype)),
        init_fn=init_method, get_rng_state_tracker=get_rng_state_tracker)
    if bias:
        module.register_parameter("bias", torch.nn.Parameter(torch.empty(module.out_features, device=device,
                                                                         dtype=params_dtype)),
                                  init_fn=lambda t: t.zero_())
    else:
        module.bias = torch.Tensor().to(dtype=params_dtype, device=device)


def _set_linear_tp_attributes(module) -> None:
    """linear.py reset_parameters: weight partition dim 0 (column) / 1 (row); bias split (column) or SP."""
    module.weight.tensor_model_parallel = True
    module.weight.partition_dim = 1 if module.parallel_mode == "row" else 0
    module.weight.partition_stride = 1
    if module.use_bias:
        if module.parallel_mode == "row":
            module.bias.sequence_parallel = module.sequence_parallel
        elif module.parallel_mode == "column":
            for attr, value in (("tensor_model_parallel", True), ("partition_dim", 0), ("partition_stride", 1)):
                setattr(module.bias, attr, value)


def _linear_forward(module, inputmat: torch.Tensor, inp_shape: torch.Size):
    """inputmat [tokens_local, in] -> output [..., out] (and bias when return_bias)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    weight = module.weight
    fp8 = FP8GlobalStateManager.is_fp8_enabled()
    with_all_gather = module.parallel_mode == "column" and module.sequence_parallel
    if fp8:
        assert_dim_for_fp8_exec(inputmat, weight)
        if with_all_gather and isinstance(FP8GlobalStateManager.get_fp8_recipe(), Float8BlockScaling):
            assert _block_quantizable(inputmat), "All-gather requires quantizable tensor for quantizer " \
                                                 "Float8BlockQuantizer"
    group = module.tp_group
    if module.parallel_mode == "column" and module.tp_size > 1:
        inputmat = (gather_from_sequence_parallel_region(inputmat, tensor_parallel_output_grad=True, group=group)
                    if module.sequence_parallel else copy_to_tensor_model_parallel_region(inputmat, group=group))
    if fp8:
        inputmat, weight = module._fp8_qdq(inputmat, "input"), module._fp8_qdq(weight, "weight")
    out = inputmat @ weight.t()  # [tokens, out_local]
    if module.parallel_mode == "row" and module.tp_size > 1:
        out = (reduce_scatter_to_sequence_parallel_region(out, group=group) if module.sequence_parallel
               else reduce_from_tensor_model_parallel_region(out, group=group))
    out = out.view(-1, *inp_shape[1:-1], out.shape[-1])
    if module.apply_bias:
        out = out + module.bias
    if module.return_bias:
        return out, module.bias  # an empty tensor without bias, as TE
    return out


class Linear(TransformerEngineBaseModule):
    """module/linear.py `Linear` (TE 2.11 signature)."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Callable | None = None, rng_tracker_name: str | None = None,
                 init_method: Callable | None = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: torch.dtype | None = None, parallel_mode: str | None = None,
                 parameters_split=None, device="cuda", ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_name: str | None = None, delay_wgrad_compute: bool = False, symmetric_ar_type: str | None = None,
                 save_original_input: bool = False, name: str | None = None) -> None:
        super().__init__()
        if fuse_wgrad_accumulation:
            raise NotImplementedError("TE stand-in: fuse_wgrad_accumulation (main_grad GEMM) is not emulated")
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.rng_tracker_name = rng_tracker_name
        self.name = name
        _init_linear(self, in_features, out_features, tp_group, tp_size, parallel_mode, sequence_parallel,
                     params_dtype, device, bias, return_bias, init_method, get_rng_state_tracker, parameters_split)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init=False):
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            _set_linear_tp_attributes(self)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None, fp8_output: bool | None = False,
                fp8_grad: bool | None = False):
        assert inp.shape[-1] == self.in_features, "GEMM not possible"
        return _linear_forward(self, inp.reshape(-1, self.in_features), inp.shape)


class LayerNormLinear(TransformerEngineBaseModule):
    """module/layernorm_linear.py `LayerNormLinear` (TE 2.11 signature): norm of the local input, then Linear."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Callable | None = None, init_method: Callable | None = None,
                 bias: bool = True, normalization: str = "LayerNorm", return_bias: bool = False,
                 params_dtype: torch.dtype | None = None, parallel_mode: str | None = None,
                 return_layernorm_output: bool = False, return_layernorm_output_gathered: bool = False,
                 parameters_split=None, zero_centered_gamma: bool = False, device="cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs: bool = False, ub_overlap_rs_dgrad: bool = False,
                 ub_bulk_wgrad: bool = False, ub_bulk_dgrad: bool = False, ub_name: str | None = None,
                 delay_wgrad_compute: bool = False, symmetric_ar_type: str | None = None, name: str = None) -> None:
        super().__init__()
        assert normalization in ["LayerNorm", "RMSNorm"], "Unsupported normalization type!"
        if fuse_wgrad_accumulation:
            raise NotImplementedError("TE stand-in: fuse_wgrad_accumulation (main_grad GEMM) is not emulated")
        if return_layernorm_output:
            raise NotImplementedError("TE stand-in: return_layernorm_output is not emulated")
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.name = name
        _init_linear(self, in_features, out_features, tp_group, tp_size, parallel_mode, sequence_parallel,
                     params_dtype, device, bias, return_bias, init_method, get_rng_state_tracker, parameters_split)
        params_dtype = self.weight.dtype
        gamma_init = (lambda t: t.zero_()) if zero_centered_gamma else (lambda t: t.fill_(1.0))
        self.register_parameter("layer_norm_weight", torch.nn.Parameter(
            torch.empty(in_features, device=device, dtype=params_dtype)), init_fn=gamma_init)
        if normalization != "RMSNorm":
            self.register_parameter("layer_norm_bias", torch.nn.Parameter(
                torch.empty(in_features, device=device, dtype=params_dtype)), init_fn=lambda t: t.zero_())
        else:
            self.layer_norm_bias = None
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init=False):
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            self.layer_norm_weight.sequence_parallel = self.sequence_parallel
            if self.normalization != "RMSNorm":
                self.layer_norm_bias.sequence_parallel = self.sequence_parallel
            _set_linear_tp_attributes(self)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None, fp8_output: bool | None = False,
                fp8_grad: bool | None = False):
        assert inp.shape[-1] == self.layer_norm_weight.numel(), "GEMM not possible"
        x = inp.reshape(-1, inp.shape[-1])
        normed = _norm(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps,
                       self.zero_centered_gamma)
        return _linear_forward(self, normed, inp.shape)  # FP8 shape checks on the local (pre-gather) input


def _norm(x, normalization, weight, bias, eps, zero_centered_gamma):
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    xf = x.float()
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        y = F.layer_norm(xf, (xf.shape[-1],), gamma, None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


class _Norm(torch.nn.Module):
    """module/rmsnorm.py, module/layernorm.py: `weight` (+ `bias`), `sequence_parallel` set on them."""

    normalization = "RMSNorm"

    def __init__(self, normalized_shape=None, eps: float = 1e-5, sequence_parallel: bool | None = None,
                 params_dtype: torch.dtype | None = None, zero_centered_gamma: bool = False,
                 hidden_size: int | None = None, device=None, dtype=None, **kwargs) -> None:
        super().__init__()
        if normalized_shape is None:
            if hidden_size is None:
                raise RuntimeError("Neither `normalized_shape` nor `hidden_size` (deprecated) args are provided")
            normalized_shape = hidden_size
        elif hidden_size is not None:
            raise RuntimeError("Both `normalized_shape` and `hidden_size` (deprecated) args are provided")
        dtype = params_dtype if params_dtype is not None else (dtype or torch.get_default_dtype())
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        fill = 0.0 if zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full((normalized_shape,), fill, device=device, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype))
                     if self.normalization == "LayerNorm" else None)
        if sequence_parallel is not None:
            for p in self.parameters():
                p.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(x, self.normalization, self.weight, self.bias, self.eps, self.zero_centered_gamma)


class RMSNorm(_Norm):
    normalization = "RMSNorm"


class LayerNorm(_Norm):
    normalization = "LayerNorm"


class GroupedLinear(TransformerEngineBaseModule):
    """module/grouped_linear.py: exists so Megatron's TEGroupedLinear (MoE) can be defined; not emulated."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, *args, **kwargs) -> None:
        raise NotImplementedError("TE stand-in: GroupedLinear (MoE experts) is not emulated")

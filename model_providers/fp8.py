"""FP8 training of the decoder's linears: which recipe, through which backend, and the shape rules it imposes.

Two backends (`model.fp8_backend`):
  * `te`: Transformer Engine's layers (spec 'te') under Megatron's `get_fp8_context`. Recipes delayed,
    tensorwise (current scaling), blockwise. The settings go into the TransformerConfig *constructor*
    (`te_config_kwargs`), so Megatron's own FP8 validation in `TransformerConfig.__post_init__` runs.
  * `torchao`: torchao's float8 training (the path torchtitan uses) on the sdpa / local spec's Megatron
    linears (`apply_torchao_fp8`, a class swap: same parameters, names and checkpoints). Recipes tensorwise
    and rowwise. No TE needed: the lent GPU can measure it.

Recipe facts (read from their sources):
  * delayed: e4m3 forward / e5m2 backward ('hybrid'); TE's `DelayedScaling` defaults (and NeMo / Megatron-
    Bridge) keep an amax history of 1024 steps reduced with 'max', Megatron's TransformerConfig defaults to
    1 / 'most_recent': `model.fp8_amax_history_len` / `model.fp8_amax_compute_algo` set them (default TE's).
  * tensorwise (TE `Float8CurrentScaling`): 'hybrid' too, as Megatron-Bridge's current-scaling recipe:
    gradients in e5m2 keep their range. blockwise (TE `Float8BlockScaling`): e4m3, TE's default.
  * Delayed scaling all-reduces amaxes over Megatron's amax group at every outermost `fp8_autocast` exit
    (forward) and in the first backward module (TE 2.11 `FP8GlobalStateManager.reduce_and_update_fp8_tensors`).
    The default group is TP x DP x CP, but our DP ranks may run different numbers of micro-batches (rows are
    dealt round-robin, `train.max_tokens_per_micro_batch` packs by tokens, dynamic sampling drops groups): a
    rank with one micro-batch fewer would wait forever. So delayed scaling reduces over TP x CP only
    (`tp_only_amax_red`): those ranks see the same micro-batches. DP ranks then keep their own scales.
  * 'first' / 'last' in `model.fp8_bf16_layers` keep the first / last decoder layer *of the model* in bf16:
    Megatron counts global layer indices (`fp8_utils.is_first_last_bf16_layer`), so under PP only the first
    and the last stage hold such a layer. Megatron refuses bf16 layers with delayed scaling. The vision
    towers and adapters always run in bf16 (their widths, e.g. Qwen2.5-VL's MLP 3420, are not multiples of
    16, and TE never gets an FP8 context there), so 'vision' is not an option.

Shape rules. TE 2.11 asserts for every FP8 GEMM (`pytorch/utils.py: assert_dim_for_fp8_exec`, called by
`Linear` / `LayerNormLinear`) that the product of the input's leading dims is a multiple of 8 and its last
dim a multiple of 16, and the same for the weight ([out, in]: out % 8, in % 16); blockwise quantizers take
only tensors whose both dims are multiples of 128 (`Float8BlockQuantizer.is_quantizable`, checked before the
sequence-parallel all-gather). `torch._scaled_mm` (torchao) needs both weight dims to be multiples of 16.
Megatron pads only for FP8 *inference* (`fp8_utils.prepare_model_for_fp8_inference`) and aligns to
`get_fp8_align_size` = 16. So the trainer pads every micro-batch so that each rank's tokens (after the CP
and SP splits) are a multiple of `token_multiple` (16, blockwise 128): `sequence_pad_multiple`. Weight
shapes are checked when the model is built (`check_fp8_weight_shapes`), naming the parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays unimported for config validation
    from torch import nn

FP8_BACKENDS = ("te", "torchao")
FP8_RECIPES: dict[str, tuple[str, ...]] = {
    "te": ("delayed", "tensorwise", "blockwise"),
    "torchao": ("tensorwise", "rowwise"),
}
FP8_BF16_PARTS = ("first", "last")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")
# Megatron's TransformerConfig.fp8: 'hybrid' = e4m3 forward, e5m2 gradients (see module docstring).
_TE_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3"}
# Tokens per rank must be a multiple of this (see module docstring).
_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "rowwise": 16}
# (weight out, weight in) multiples: TE's assert_dim_for_fp8_exec, torch._scaled_mm.
_WEIGHT_MULTIPLE = {"te": (8, 16), "torchao": (16, 16)}


@dataclass(frozen=True)
class FP8Settings:
    """The FP8 part of `model` (ModelConfig): recipe 'none' means bf16 everywhere."""

    recipe: str = "none"
    backend: str = "te"
    bf16_layers: tuple[str, ...] = FP8_BF16_PARTS
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    @classmethod
    def from_model_config(cls, model_cfg) -> FP8Settings:
        """From `calibrl_mcore.config.ModelConfig` (its fp8* keys)."""
        return cls(
            recipe=model_cfg.fp8,
            backend=model_cfg.fp8_backend,
            bf16_layers=tuple(model_cfg.fp8_bf16_layers),
            amax_history_len=model_cfg.fp8_amax_history_len,
            amax_compute_algo=model_cfg.fp8_amax_compute_algo,
        )

    @property
    def enabled(self) -> bool:
        return self.recipe != "none"

    def validate(self) -> None:
        """Errors name the config key and what to change."""
        if self.backend not in FP8_BACKENDS:
            raise ValueError(f"model.fp8_backend={self.backend!r} is not one of {list(FP8_BACKENDS)}")
        unknown = sorted(set(self.bf16_layers) - set(FP8_BF16_PARTS))
        if unknown:
            hint = (" (the vision towers always run in bf16: remove 'vision')" if "vision" in unknown else "")
            raise ValueError(f"model.fp8_bf16_layers has unknown parts {unknown}; choose from "
                             f"{list(FP8_BF16_PARTS)}{hint}")
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(f"model.fp8_amax_compute_algo={self.amax_compute_algo!r} is not one of "
                             f"{list(AMAX_COMPUTE_ALGOS)}")
        if self.amax_history_len < 1:
            raise ValueError(f"model.fp8_amax_history_len must be >= 1, got {self.amax_history_len}")
        if not self.enabled:
            return
        recipes = FP8_RECIPES[self.backend]
        if self.recipe not in recipes:
            other = next(b for b in FP8_BACKENDS if self.recipe in FP8_RECIPES[b]) if any(
                self.recipe in r for r in FP8_RECIPES.values()) else None
            hint = f" (model.fp8_backend={other} has it)" if other else ""
            raise ValueError(f"model.fp8={self.recipe!r} is not a {self.backend} recipe: choose from "
                             f"{list(recipes)}{hint}")
        if self.recipe == "delayed" and self.bf16_layers:
            raise ValueError("model.fp8=delayed cannot keep layers in bf16 (Megatron refuses first/last bf16 "
                             "layers with delayed scaling): set model.fp8_bf16_layers=[] or use fp8=tensorwise")

    def check_spec(self, spec_backend: str) -> None:
        """The layer spec must match the FP8 backend: TE's recipes run in TE layers, torchao's in Megatron's."""
        self.validate()
        if not self.enabled:
            return
        if self.backend == "te" and spec_backend != "te":
            raise ValueError(f"model.fp8={self.recipe!r} with fp8_backend=te needs Transformer Engine layers "
                             f"(model.spec=te); this model uses the {spec_backend!r} spec: set "
                             "model.fp8_backend=torchao for the sdpa spec")
        if self.backend == "torchao" and spec_backend == "te":
            raise ValueError("model.fp8_backend=torchao converts Megatron's own linears (spec sdpa or local); "
                             "with model.spec=te use fp8_backend=te")

    @property
    def token_multiple(self) -> int:
        """Each rank's tokens per micro-batch must be a multiple of this (1 without FP8)."""
        return _TOKEN_MULTIPLE[self.recipe] if self.enabled else 1


NO_FP8 = FP8Settings()


def sequence_pad_multiple(cp_size: int, tp_size: int, sequence_parallel: bool, fp8: FP8Settings = NO_FP8) -> int:
    """What a micro-batch's sequence length (or a packed sequence's length) must be a multiple of.

    Context parallelism cuts it into 2·CP chunks and each rank keeps s / CP tokens; sequence parallelism cuts
    those by TP (the existing rule: 2·CP x TP). FP8 needs each rank's s / (CP·TP_sp) tokens to be a multiple of
    `fp8.token_multiple`, hence the lcm: without FP8 the result is the existing rule unchanged.
    """
    tp_sp = tp_size if sequence_parallel else 1
    base = (2 * cp_size if cp_size > 1 else 1) * tp_sp
    return math.lcm(base, cp_size * tp_sp * fp8.token_multiple)


def te_config_kwargs(fp8: FP8Settings) -> dict:
    """TransformerConfig constructor kwargs for TE FP8 (empty when off or for torchao)."""
    if not fp8.enabled or fp8.backend != "te":
        return {}
    first, last = "first" in fp8.bf16_layers, "last" in fp8.bf16_layers
    return dict(
        fp8=_TE_FORMAT[fp8.recipe],
        fp8_recipe=fp8.recipe,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        tp_only_amax_red=fp8.recipe == "delayed",
        first_last_layers_bf16=first or last,
        num_layers_at_start_in_bf16=int(first),
        num_layers_at_end_in_bf16=int(last),
    )


# ---- shape checks ---------------------------------------------------------------------------------------------


def _decoder_fp8_linears(model: nn.Module, fp8: FP8Settings) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of this stage's decoder linears that run in FP8 (bf16 layers excluded)."""
    layers = model.language_model.decoder.layers
    num_layers = model.config.num_layers
    for layer in layers:
        index = layer.layer_number - 1  # global, as Megatron counts it
        if ("first" in fp8.bf16_layers and index == 0) or ("last" in fp8.bf16_layers and index == num_layers - 1):
            continue
        for slot in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            module = layer.get_submodule(slot)
            yield f"language_model.decoder.layers.{index}.{slot}", module


def check_fp8_weight_shapes(model: nn.Module, fp8: FP8Settings) -> None:
    """Every FP8 linear's local weight [out, in] must fit the backend's GEMM (module docstring)."""
    if not fp8.enabled:
        return
    out_multiple, in_multiple = _WEIGHT_MULTIPLE[fp8.backend]
    for name, module in _decoder_fp8_linears(model, fp8):
        out, inp = module.weight.shape
        if out % out_multiple or inp % in_multiple:
            raise ValueError(
                f"{name}.weight has local shape [{out}, {inp}] (TP={model.config.tensor_model_parallel_size}); "
                f"FP8 ({fp8.backend}) needs [out, in] multiples of [{out_multiple}, {in_multiple}]: choose another "
                "TP size or set model.fp8=none"
            )


# ---- torchao -------------------------------------------------------------------------------------------------


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


@functools.cache
def _torchao_config(recipe: str):
    """(Float8LinearConfig, LinearMMConfig) of a torchao recipe ('tensorwise' | 'rowwise').

    The LinearMMConfig is taken from a `Float8Linear` built on the meta device, so it is exactly what
    torchao's own module would use for that config."""
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as err:
        raise RuntimeError("model.fp8_backend=torchao needs torchao: pip install 'calibrl-mcore[fp8]' "
                           f"(torchao==0.18.0) or set model.fp8=none (import failed: {err})") from err
    config = Float8LinearConfig.from_recipe_name(recipe)
    probe = Float8Linear(16, 16, bias=False, device="meta", config=config)
    return config, probe.linear_mm_config


class _TorchaoFloat8Matmul:
    """Mixin for Megatron's Column/RowParallelLinear: the local GEMM through torchao's float8 matmul.

    Megatron's linear calls `_forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
    sequence_parallel, ..., tp_group)` (tensor_parallel/layers.py, 0.16.1). This replacement keeps its
    communication: under sequence parallelism the input is all-gathered over TP (backward: reduce-scatter),
    with `allreduce_dgrad` the input gradient is all-reduced over TP; then output = fp8(input) @ fp8(weight).T
    (+ bias) with torchao's `matmul_with_hp_or_float8_args`, whose backward computes dgrad and wgrad in FP8
    too. Gradient-accumulation fusion (apex) is not used on this path: gradients land in `.grad`, which
    Megatron's DDP hook adds to main_grad as for any local linear.
    """

    fp8_recipe: str

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        group = tp_group if tp_group is not None else self.tp_group
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=group)
        config, mm_config = _torchao_config(self.fp8_recipe)
        output = matmul_with_hp_or_float8_args.apply(input, weight.t(), mm_config, config)  # [s, b, out/tp]
        return output if bias is None else output + bias


@functools.cache
def _float8_class(cls: type) -> type:
    return type(f"Float8{cls.__name__}", (_TorchaoFloat8Matmul, cls), {})


def apply_torchao_fp8(model: nn.Module, fp8: FP8Settings) -> list[str]:
    """Swap this stage's FP8 decoder linears to torchao float8 GEMMs (in place); returns their names.

    A class swap on each Megatron linear (`_TorchaoFloat8Matmul`): parameters, their names, TP attributes and
    `sharded_state_dict` stay as they are, so conversion, weight sync and checkpoints do not change. Like
    torchtitan, the parameters stay in high precision; only the GEMMs run in FP8.
    """
    if not fp8.enabled or fp8.backend != "torchao":
        return []
    _torchao_config(fp8.recipe)  # import / config errors before any module changes
    check_fp8_weight_shapes(model, fp8)
    swapped = []
    for name, module in _decoder_fp8_linears(model, fp8):
        module.__class__ = _float8_class(type(module))
        module.fp8_recipe = fp8.recipe
        swapped.append(name)
    return swapped


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules that run torchao float8 GEMMs (tests, logs)."""
    return [n for n, m in model.named_modules() if isinstance(m, _TorchaoFloat8Matmul)]


def describe(fp8: FP8Settings, parts: Sequence[str] = ()) -> str:
    """One line for the start-up log."""
    if not fp8.enabled:
        return "fp8: off"
    bf16 = ",".join(fp8.bf16_layers) or "none"
    return f"fp8: {fp8.backend} {fp8.recipe}, bf16 layers: {bf16}, token multiple {fp8.token_multiple}" + (
        f", {len(parts)} linears" if parts else "")


__all__ = [
    "FP8Settings", "NO_FP8", "FP8_BACKENDS", "FP8_RECIPES", "FP8_BF16_PARTS", "sequence_pad_multiple",
    "te_config_kwargs", "check_fp8_weight_shapes", "apply_torchao_fp8", "fp8_linear_names", "torchao_available",
    "describe",
]

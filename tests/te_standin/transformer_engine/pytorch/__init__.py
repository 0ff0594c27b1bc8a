"""transformer_engine.pytorch (stand-in, TE 2.11 names): what Megatron 0.16.1's TE spec builds.

Reproduced with TE's constructor signatures, parameter names / TP attributes and forward math:
  * `Linear`, `LayerNormLinear` (module/linear.py, module/layernorm_linear.py): weight [out/tp, in] (column) or
    [out, in/tp] (row), `bias` (an empty tensor when bias=False, as TE), `layer_norm_weight` / `layer_norm_bias`;
    column: SP all-gather of the input (backward reduce-scatter) or dgrad all-reduce; row: all-reduce or SP
    reduce-scatter of the output. Under `fp8_autocast` TE's shape assert (`assert_dim_for_fp8_exec`), the
    blockwise all-gather rule, and a per-tensor e4m3 quantise-dequantise of input and weight.
  * `RMSNorm`, `LayerNorm` (module/rmsnorm.py, module/layernorm.py): `weight` (+ `bias`), zero-centred gamma.
  * `DotProductAttention` (attention/dot_product_attention/dot_product_attention.py): sbhd / bshd / thd,
    mask types no_mask / causal / padding / padding_causal / arbitrary (bool mask, True = masked out), GQA,
    context parallelism over `cp_group` with Megatron's load-balanced 2·CP chunk order (sbhd/bshd).
  * `fp8_autocast` / `FP8GlobalStateManager` (quantization.py) with delayed scaling's amax all-reduce.
Not reproduced: userbuffers, FP8 parameters (`fp8_model_init`), delayed wgrad, `GroupedLinear` (MoE: the class
exists so Megatron's module imports, constructing it raises), CP with thd, fused kernels of any kind.
"""

from . import distributed, ops, tensor  # noqa: F401
from .attention import DotProductAttention
from .fp8 import FP8GlobalStateManager, fp8_autocast, fp8_model_init
from .module import GroupedLinear, LayerNorm, LayerNormLinear, Linear, RMSNorm

autocast = fp8_autocast  # TE 2.11's new name

__all__ = ["DotProductAttention", "FP8GlobalStateManager", "GroupedLinear", "LayerNorm", "LayerNormLinear",
           "Linear", "RMSNorm", "autocast", "fp8_autocast", "fp8_model_init"]

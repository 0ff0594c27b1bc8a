"""Transformer Engine stand-ins for CPU tests: TE 2.11's names, signatures and forward math, no CUDA.

Put `tests/te_standin` on PYTHONPATH (`tests.te_standin_env`) *before* Megatron is imported and Megatron's own
TE wrappers (`megatron.core.extensions.transformer_engine`: TELayerNormColumnParallelLinear, TENorm,
TEDotProductAttention, ...) subclass these classes exactly as they subclass TE's: the te spec's whole module
tree is built and run by Megatron's real code, on gloo. Where real TE is installed, tests do not put this
directory on the path, so the same tests run against TE.

Checked against transformer_engine 2.11.0 (the newest TE that megatron-core 0.16.1 declares, `>=2.9,<2.12`),
py3-none-any wheel: `pytorch/module/{linear,layernorm_linear,base}.py`, `pytorch/module/rmsnorm.py`,
`pytorch/ops/basic/rmsnorm.py`, `pytorch/attention/dot_product_attention/{dot_product_attention,utils}.py`,
`pytorch/quantization.py`, `pytorch/utils.py`, `common/recipe/__init__.py`. What is reproduced, and what not,
is listed in `pytorch/__init__.py`.
"""

__version__ = "2.11.0"
STANDIN = True  # model_providers.specs allows the te spec on CPU only for this package

from . import common, pytorch  # noqa: E402,F401

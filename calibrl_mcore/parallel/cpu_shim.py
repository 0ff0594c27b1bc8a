"""Run Megatron-Core 0.16.1 on CPU (gloo, fp32). The only place in the project that adapts Megatron to CPU.

Megatron hard-codes CUDA on the paths we use in four ways; each gets the narrowest patch we found:

1. Calls inside Megatron functions: `torch.cuda.current_device()` as a tensor-factory device,
   `torch.cuda.synchronize()`, literal `device="cuda"` factories, `torch.cuda.get_rng_state/manual_seed`.
   In every module of `_CUDA_CALL_SITES` the module-global name `torch` is rebound to `_TorchOnCpu`, a proxy
   that forwards everything to torch except: `cuda.current_device()` -> `cpu`, `cuda.synchronize()` -> no-op,
   `cuda.get_rng_state/manual_seed` -> the CPU generator's, and factories (`zeros`, `empty`, `tensor`, ...)
   map `device="cuda"` to CPU (and drop `pin_memory=True`). Code outside those modules sees the real torch.
2. `Tensor.cuda()` (a method, so it can only be patched on the class): returns the tensor itself.
   On a CPU-only build it would raise anyway, so nothing that worked before changes.
3. The RNG tracker (`tensor_parallel/random.py`): the "device generator" becomes the CPU default generator.
   `_get_cuda_rng_state/_set_cuda_rng_state` read/write it and `CudaRNGStatesTracker.fork(name)` saves the
   CPU state, switches to the per-name state, and restores on exit. `model_parallel_cuda_manual_seed` then
   works unchanged (through 1.): the 'model-parallel-rng' state is seeded with seed + 2718 + tp_rank, so
   dropout inside TP regions differs per TP rank as Megatron intends.
4. `optimizer/clip_grads.py: clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'`:
   replaced (there and where `optimizer/optimizer.py` imported it) by the same scaling without the assert.

5. `optimizer/distrib_optimizer.py: DistributedOptimizer._build_model_and_main_param_groups` sorts parameters
   by `param.type()` against the `torch.cuda.*Tensor` names and rejects anything else: while it runs,
   `Tensor.type()` (no argument) reports CPU tensors under their CUDA names. Its collectives
   (reduce-scatter of grads, all-gather of params) run on gloo as they are.

Not covered (GPU-only features): CUDA streams (`overlap_grad_reduce`, activation offloading), CUDA graphs,
`enable_autocast`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch

_CPU = torch.device("cpu")

# Megatron module -> the functions in it that hard-code CUDA (patch 1).
_CUDA_CALL_SITES: dict[str, str] = {
    # Model construction and forward/backward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.__init__/forward: inv_freq",
    "megatron.core.models.common.embeddings.rope_utils": "get_pos_emb_on_this_cp_rank: pinned CP index",
    "megatron.core.models.gpt.gpt_model": "GPTModel._preprocess: sequence_len_offset (inference)",
    "megatron.core.transformer.dot_product_attention": "DotProductAttention.__init__: ALiBi/softmax buffers",
    "megatron.core.transformer.transformer_layer": "get_layer_static_inputs, get_zero_attention_mask",
    "megatron.core.transformer.module": "MegatronModule.get_layer_static_inputs",
    "megatron.core.transformer.attention": "Attention._allocate_memory (KV cache)",
    "megatron.core.transformer.utils": "get_default_causal_mask (softmax with attention_mask=None)",
    "megatron.core.tensor_parallel.layers": "*ParallelLinear/VocabParallelEmbedding.__init__, backward buffers",
    "megatron.core.tensor_parallel.mappings": "_gather_along_*_dim, _reduce_scatter_along_first_dim buffers",
    "megatron.core.tensor_parallel.utils": "split_tensor_into_1d_equal_chunks, gather_split_1d_tensor",
    "megatron.core.tensor_parallel.data": "broadcast_data: device='cuda' size/data buffers",
    "megatron.core.tensor_parallel.random": "CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed",
    "megatron.core.parallel_state": "update_pg_timeout: torch.cuda.synchronize()",
    # Pipeline schedules and point-to-point communication.
    "megatron.core.pipeline_parallel.schedules": "forward_backward_*: total_num_tokens device='cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "_communicate(_shapes): recv buffers, synchronize()",
    # DDP buffers, optimizer, grad norm.
    "megatron.core.distributed.param_and_grad_buffer": "_ParamAndGradBuffer.__init__: param/grad buffers",
    "megatron.core.distributed.distributed_data_parallel": "offload/restore_grad_buffers: synchronize()",
    "megatron.core.optimizer.optimizer": "MixedPrecisionOptimizer/FP32Optimizer: found_inf, _scale tensors",
    "megatron.core.optimizer.distrib_optimizer": "get_parameter_state_dp_zero (checkpoints): gather buffers",
    "megatron.core.optimizer.grad_scaler": "Constant/DynamicGradScaler: scale tensors device='cuda'",
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32, count_zeros_fp32: device='cuda'",
    "megatron.core.utils": "local_multi_tensor_l2_norm (grad norm without apex/TE): device='cuda'",
    "megatron.core.timers": "Timer.start/stop: synchronize()",
    # Distributed checkpointing (save/load on gloo).
    "megatron.core.dist_checkpointing.strategies.async_utils": "AsyncCallsQueue: is_alive/call_idx tensors",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "FileSystemWriterAsync: synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save_state_dict_async_plan: flags",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "FullyParallelLoadStrategyWrapper.load",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange_by_distribution: device='cuda' buffers",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "MCoreTensorAwareStateDict: synchronize()",
}

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like",
)  # fmt: skip

_applied = False


def _cpu_if_cuda(device: Any) -> Any:
    """`cuda`, `cuda:N`, torch.device('cuda') or a bare GPU index -> cpu; anything else unchanged."""
    if device is None or isinstance(device, bool):
        return device
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return _CPU
    return device


def _on_cpu(factory: Any) -> Any:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinned host memory needs an accelerator; it only speeds copies
        return factory(*args, **kwargs)

    return wrapper


class _CudaOnCpu(types.ModuleType):
    """Stands in for `torch.cuda` inside the patched Megatron modules."""

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda with CUDA calls mapped to CPU (calibrl cpu_shim)")
        self.current_device = lambda: _CPU
        self.synchronize = lambda device=None: None
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.manual_seed = lambda seed: torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for `torch` inside the patched Megatron modules (see module docstring, patch 1)."""

    def __init__(self) -> None:
        super().__init__("torch", "torch with CUDA hard-coding mapped to CPU (calibrl cpu_shim)")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups are plain attribute reads
        return value


def _tensor_cuda_on_cpu(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any):
    """Patch 2: `Tensor.cuda()` (language_module.setup_embeddings_and_output_layer, optimizer reload,
    grad_scaler.load_state_dict, dist_checkpointing.exchange_utils) keeps the tensor on CPU."""
    return self


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Patch 3: random._get_cuda_rng_state -> the CPU generator's state."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Patch 3: random._set_cuda_rng_state -> set the CPU generator's state."""
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _fork_cpu_rng(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
    """Patch 3: CudaRNGStatesTracker.fork on CPU. Same bookkeeping as Megatron's (nested forks of other
    names), without its 'CPU RNG state changed' warning, which on CPU fires on every random draw."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state, orig_name = torch.get_rng_state(), self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current rng state {self._current_state_name} is not the forked state {name}")
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(self.states_[orig_name] if orig_name != "default-rng" else orig_state)
        self._current_state_name = orig_name


def _clip_grad_by_total_norm_cpu(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Patch 4: clip_grads.clip_grad_by_total_norm_fp32 without its `torch.cuda.FloatTensor` assert."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(g).detach() for p in parameters if (g := getattr(p, attr, None)) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_TENSOR_TYPE = torch.Tensor.type


def _type_as_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """Patch 5: `Tensor.type()` of a CPU tensor -> its CUDA name ('torch.FloatTensor' -> 'torch.cuda.FloatTensor')."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cpu_params_look_like_cuda(build: Any) -> Any:
    """Patch 5: run DistributedOptimizer's parameter sorting with `Tensor.type()` reporting CUDA names."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.Tensor.type = _type_as_cuda
        try:
            return build(*args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE

    return staticmethod(wrapper)


def apply_cpu_shim() -> None:
    """Apply all five patches (idempotent). Call after nothing else; safe to call many times."""
    global _applied
    if _applied:
        return
    torch_on_cpu = _TorchOnCpu()
    for module_name in _CUDA_CALL_SITES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_shim: {module_name}.torch is not the torch module; Megatron changed?")
        module.torch = torch_on_cpu

    torch.Tensor.cuda = _tensor_cuda_on_cpu

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    mcore_random.CudaRNGStatesTracker.fork = _fork_cpu_rng

    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer._build_model_and_main_param_groups = _cpu_params_look_like_cuda(
        DistributedOptimizer._build_model_and_main_param_groups
    )
    _applied = True


def is_cpu_shim_applied() -> bool:
    """Whether `apply_cpu_shim` has run in this process."""
    return _applied


def maybe_apply_cpu_shim() -> bool:
    """Apply the shim only when CUDA is unavailable; return whether it is active. Never touches a GPU run."""
    if torch.cuda.is_available():
        return False
    apply_cpu_shim()
    return True

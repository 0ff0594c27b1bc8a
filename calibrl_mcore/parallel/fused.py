"""Which fused kernels the trainer runs on: Adam, the multi-tensor helpers and the norms, and why.

Megatron-Core 0.16 decides its Adam once, when `megatron.core.optimizer` is imported:

    1. `transformer_engine.pytorch.optimizers.FusedAdam`   if that module imports
    2. `apex.optimizers.FusedAdam`                          else, if that imports
    3. `torch.optim.AdamW` (Adam without decoupled decay)   else; Megatron passes neither `fused` nor
       `foreach`, so torch picks its multi-tensor `foreach` kernels on CUDA and a per-tensor loop on CPU.

Step 2 only checks the Python import, so NVIDIA apex built without `--cuda_ext` is still chosen and then
fails when the optimizer is built (its FusedAdam needs the `amp_C` extension). A different package that is
also named `apex` on PyPI (unrelated to NVIDIA) has no `apex.optimizers`: Megatron silently falls back to
torch. `megatron.core.optimizer.optimizer` picks `multi_tensor_applier` the same way (TE, then apex's
`amp_C`, then Megatron's local Python loop). Norms come from our layer specs (model_providers/specs.py),
never from what is installed: Megatron's apex `FusedLayerNorm` is LayerNorm-only and our specs do not use it.

    report = log_fused_backends()   # one log line; the lead calls this after building the policy
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from calibrl_mcore.terminal import hidden_note

__all__ = [
    "ApexStatus",
    "FusedBackends",
    "apex_status",
    "fused_backends",
    "log_fused_backends",
    "nvidia_apex_available",
]

logger = logging.getLogger(__name__)

ApexKind = Literal["absent", "nvidia", "nvidia-no-cuda-ext", "not-nvidia", "broken"]
SpecBackend = Literal["local", "sdpa", "te"]


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it failed). Broken extension builds raise more than ImportError."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # an undefined symbol in a .so can be an OSError or RuntimeError too
        return None, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ApexStatus:
    """What a module named `apex` is, if any.

    kind: absent | nvidia (FusedAdam + CUDA extensions) | nvidia-no-cuda-ext (Python-only build) |
    not-nvidia (some other package named apex, e.g. PyPI's) | broken (`import apex` itself fails)."""

    kind: ApexKind
    detail: str
    fused_adam: bool = False
    """`apex.optimizers.FusedAdam` imports."""
    amp_c: bool = False
    """`amp_C` imports (multi-tensor CUDA kernels, built by `--cuda_ext`; FusedAdam needs it)."""
    fused_layer_norm_cuda: bool = False
    """`fused_layer_norm_cuda` imports (apex's fused LayerNorm/RMSNorm kernels)."""

    @property
    def usable(self) -> bool:
        return self.kind == "nvidia"


def apex_status() -> ApexStatus:
    """Probe `apex` without trusting its name: NVIDIA apex has `apex.optimizers.FusedAdam`; its CUDA build also
    has the top-level extension modules `amp_C` and `fused_layer_norm_cuda`."""
    apex, err = _try_import("apex")
    if apex is None:
        if err and err.startswith("ModuleNotFoundError") and "'apex'" in err:
            return ApexStatus("absent", "no module named apex")
        return ApexStatus("broken", f"a module named apex is installed but does not import ({err})")
    where = getattr(apex, "__file__", None) or "?"
    optimizers, opt_err = _try_import("apex.optimizers")
    fused_adam = optimizers is not None and hasattr(optimizers, "FusedAdam")
    if not fused_adam:
        return ApexStatus(
            "not-nvidia",
            f"the module named apex at {where} is not NVIDIA apex (no apex.optimizers.FusedAdam: "
            f"{opt_err or 'attribute missing'}); probably the unrelated PyPI package `apex`. "
            "Uninstall it and build NVIDIA apex from source (see the Dockerfile)",
        )
    amp_c = _try_import("amp_C")[0] is not None
    fused_ln = _try_import("fused_layer_norm_cuda")[0] is not None
    if not amp_c:
        return ApexStatus(
            "nvidia-no-cuda-ext",
            f"NVIDIA apex at {where} without its CUDA extensions (amp_C missing): rebuild it with "
            "--cpp_ext --cuda_ext (Dockerfile)",
            fused_adam=True,
            fused_layer_norm_cuda=fused_ln,
        )
    return ApexStatus(
        "nvidia", f"NVIDIA apex at {where}", fused_adam=True, amp_c=True, fused_layer_norm_cuda=fused_ln
    )


def nvidia_apex_available() -> bool:
    """True only for NVIDIA apex with its CUDA extensions (FusedAdam + amp_C); see `apex_status` for why not."""
    return apex_status().usable


@dataclass(frozen=True)
class FusedBackends:
    """The fused kernels Megatron and our specs will use in this process, each with the reason."""

    adam: str
    adam_reason: str
    multi_tensor: str
    norm: str
    norm_reason: str
    apex: ApexStatus
    problems: tuple[str, ...] = ()
    spec: str = ""
    attention: str = ""

    def summary(self) -> str:
        """The trainer's start-up line: what runs and why. It stands for the fallback warnings the libraries
        print about the same facts, which `calibrl_mcore.terminal` holds back (and counts) by default."""
        line = f"kernels: spec={self.spec}, attention={self.attention}; "
        line += f"adam={self.adam} ({self.adam_reason}); multi_tensor={self.multi_tensor}; "
        line += f"norm={self.norm} ({self.norm_reason})" + (f"; apex={self.apex.kind}" if self.apex.kind != "absent" else "")
        return line + "".join(f"; PROBLEM: {p}" for p in self.problems) + hidden_note()


# The core attention each spec builds (model_providers/specs.py: core_attention_module).
ATTENTION: dict[str, str] = {
    "local": "Megatron DotProductAttention (unfused S x S scores)",
    "sdpa": "torch SDPA (flash / memory-efficient kernels on CUDA)",
    "te": "TE DotProductAttention (flash / cuDNN fused)",
}


def _torch_adamw(cuda: bool) -> str:
    return "torch.optim.AdamW (foreach)" if cuda else "torch.optim.AdamW (per-tensor loop)"


def _predict_adam(apex: ApexStatus, cuda: bool) -> tuple[str, str]:
    """Megatron's import chain (megatron/core/optimizer/__init__.py), replayed."""
    te_opt, te_err = _try_import("transformer_engine.pytorch.optimizers")
    if te_opt is not None and hasattr(te_opt, "FusedAdam"):
        return "te.FusedAdam", "transformer_engine imports; Megatron tries it first"
    if apex.fused_adam:
        why = "no Transformer Engine; apex.optimizers.FusedAdam imports"
        return "apex.FusedAdam", why if apex.usable else why + " but apex lacks amp_C"
    why = "no Transformer Engine or NVIDIA apex: Megatron's torch fallback, which does not ask for fused=True"
    if apex.kind == "not-nvidia":
        why += " (a non-NVIDIA `apex` is installed and ignored)"
    return _torch_adamw(cuda), why


def _bound_adam(cuda: bool) -> str | None:
    """The class `megatron.core.optimizer` bound as Adam, if that module was imported already (it decided
    then, whatever has become importable since)."""
    module = sys.modules.get("megatron.core.optimizer")
    if module is None or not hasattr(module, "Adam"):
        return None
    cls = module.Adam
    if getattr(module, "USING_PYTORCH_OPTIMIZER", False):
        return _torch_adamw(cuda)
    return "te.FusedAdam" if cls.__module__.startswith("transformer_engine") else "apex.FusedAdam"


def _multi_tensor(apex: ApexStatus) -> str:
    """megatron/core/optimizer/optimizer.py: TE's multi_tensor_applier, else apex's amp_C, else a Python loop."""
    if _try_import("transformer_engine.pytorch.optimizers")[0] is not None:
        return "te"
    if apex.amp_c and _try_import("apex.multi_tensor_apply")[0] is not None:
        return "apex amp_C"
    return "megatron local (Python loop)"


def _norm(spec_backend: SpecBackend, cuda: bool) -> tuple[str, str]:
    """The norm module our specs build for `spec_backend` (model_providers/specs.py: norm_module)."""
    if spec_backend == "te":
        return "TE fused norm", "spec 'te': TENorm, and layer norms fused into TE's LayerNormLinear"
    if not cuda:
        return "torch.nn.RMSNorm (CPU)", f"spec '{spec_backend}' on CPU"
    if spec_backend == "sdpa":
        return (
            "torch fused rms_norm",
            "spec 'sdpa': torch RMSNorm with weights in params_dtype -> aten fused kernel",
        )
    return "torch.nn.RMSNorm (fp32 weights)", "spec 'local': fused kernel only when activations are fp32 too"


def fused_backends(spec_backend: SpecBackend | None = None, cuda: bool | None = None) -> FusedBackends:
    """Report the Adam, multi-tensor and norm implementations in use, and anything that will break.

    `spec_backend`: the layer spec the model was built with (default: `model_providers.specs.resolve_backend()`,
    i.e. what spec='auto' picks on this machine). `cuda`: whether the optimizer's parameters live on CUDA
    (default: `torch.cuda.is_available()`)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if spec_backend is None:
        from model_providers.specs import resolve_backend

        spec_backend = resolve_backend("auto")
    apex = apex_status()
    problems = []
    if apex.kind in ("not-nvidia", "broken", "nvidia-no-cuda-ext"):
        problems.append(apex.detail)
    adam, adam_reason = _predict_adam(apex, cuda)
    bound = _bound_adam(cuda)
    if bound is not None and bound != adam:
        problems.append(
            f"megatron.core.optimizer was imported before the current packages were importable and bound "
            f"{bound} (the import chain now gives {adam}); this process runs {bound}"
        )
        adam, adam_reason = bound, "bound by megatron.core.optimizer when it was imported"
    if adam == "apex.FusedAdam" and not apex.usable:
        problems.append(
            "Megatron picks apex.optimizers.FusedAdam, which raises without amp_C when it is built"
        )
    norm, norm_reason = _norm(spec_backend, cuda)
    return FusedBackends(adam, adam_reason, _multi_tensor(apex), norm, norm_reason, apex, tuple(problems),
                         spec=spec_backend, attention=ATTENTION[spec_backend])


def log_fused_backends(spec_backend: SpecBackend | None = None, cuda: bool | None = None) -> FusedBackends:
    """Log `fused_backends(...)` as one line (WARNING when something will break, else INFO) and return it."""
    report = fused_backends(spec_backend, cuda)
    logger.log(logging.WARNING if report.problems else logging.INFO, report.summary())
    return report

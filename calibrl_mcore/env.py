"""`calibrl env`: the report to paste into a bug (in the spirit of `python -m torch.utils.collect_env` and
`vllm collect-env`): versions, GPUs, which layer spec / FP8 backend / fused kernels `auto` picks on this
machine and why, and whether the configured rollout servers answer.

    calibrl env [--config X.yaml] [rollout.urls=[http://host:port]] [--json]

Nothing optional is imported to find its version (installed metadata is read instead), so the report works
where a backend is broken too; the backends the choices depend on are probed the way the trainer probes them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

# What the report lists: distribution name -> what it is to us. Versions come from the installed metadata.
PACKAGES: dict[str, str] = {
    "calibrl-mcore": "this package",
    "torch": "required",
    "megatron-core": "required",
    "transformers": "required",
    "transformer-engine": "optional: te layer spec, FP8",
    "transformer_engine_torch": "optional: TE's PyTorch extension",
    "apex": "optional: fused Adam / norms (must be NVIDIA apex)",
    "sglang": "optional: rollout.engine=sglang",
    "vllm": "optional: rollout.engine=vllm",
    "nvidia-dali-cuda120": "optional: data.image_backend=dali",
    "nvidia-dali-cuda130": "optional: data.image_backend=dali",
    "torchao": "optional: float8 / low-precision kernels",
    "flash-attn": "optional: flash attention",
    "wandb": "optional: train.wandb",
}
# Minimum compute capability of FP8 tensor cores (Hopper sm_90; Ada sm_89).
FP8_MIN_CAPABILITY = (8, 9)


def package_versions() -> dict[str, str | None]:
    """Installed version of each of `PACKAGES` (None = not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        found.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                      "memory_gib": round(p.total_memory / 2**30, 1)})
    return found


def spec_choice(spec: str = "auto") -> dict[str, str]:
    """The layer spec `model.spec=<spec>` resolves to here, and why (model_providers.specs.resolve_backend)."""
    from model_providers.specs import resolve_backend, te_available

    cuda, te = torch.cuda.is_available(), te_available()
    try:
        backend = resolve_backend(spec)
    except (RuntimeError, ValueError) as exc:
        return {"spec": spec, "backend": "error", "why": str(exc)}
    if spec != "auto":
        why = f"model.spec={spec} asks for it"
    elif not cuda:
        why = "no CUDA device: pure PyTorch layers (sdpa under context parallelism or packed sequences)"
    elif te:
        why = "CUDA and Transformer Engine import: TE layers"
    else:
        why = "CUDA without Transformer Engine: Megatron layers with torch SDPA attention"
    return {"spec": spec, "backend": backend, "why": why}


def fp8_choice(backend: str) -> dict[str, str]:
    """Whether model.fp8 can run here: our FP8 path is Transformer Engine's (model_providers/vlm_base.apply_fp8)."""
    if not torch.cuda.is_available():
        return {"backend": "none", "why": "no CUDA device"}
    cap = torch.cuda.get_device_capability(0)
    if cap < FP8_MIN_CAPABILITY:
        return {"backend": "none", "why": f"GPU compute capability {cap[0]}.{cap[1]} < 8.9 (no FP8 tensor cores)"}
    if backend != "te":
        return {"backend": "none", "why": f"the {backend!r} spec: model.fp8 needs Transformer Engine layers"}
    return {"backend": "te", "why": "Transformer Engine layers on an FP8-capable GPU (model.fp8=tensorwise|...)"}


def rollout_servers(urls: Sequence[str], api_key: str = "") -> list[dict[str, Any]]:
    """For each URL: does /health answer, and the server's engine and version (`/get_model_info`, else SGLang's
    `/get_server_info`, else vLLM's `/version`)."""
    import httpx

    from rollout.client import RolloutClient

    out = []
    with RolloutClient(list(urls), api_key=api_key or None, timeout=5.0, max_retries=0) as client:
        for url, ok in client.health().items():
            entry: dict[str, Any] = {"url": url, "healthy": ok}
            if ok:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                for route, key in (("/get_model_info", "version"), ("/get_server_info", "version"),
                                   ("/version", "version")):
                    try:
                        response = httpx.get(url + route, timeout=5.0, headers=headers)
                        body = response.json() if response.status_code == 200 else {}
                    except (httpx.HTTPError, ValueError):
                        continue
                    if route == "/get_model_info":
                        entry.update({k: body[k] for k in ("engine", "model_path", "device") if k in body})
                    if body.get(key):
                        entry["version"] = str(body[key])
                        entry["version_from"] = route
                        break
            out.append(entry)
    return out


def collect_env(urls: Sequence[str] = (), *, spec: str = "auto", api_key: str = "") -> dict[str, Any]:
    """Everything `calibrl env` reports, as plain data."""
    from calibrl_mcore.parallel.fused import fused_backends

    chosen = spec_choice(spec)
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus(),
        "packages": package_versions(),
        "spec": chosen,
        "fp8": fp8_choice(chosen["backend"]),
    }
    if chosen["backend"] in ("local", "sdpa", "te"):
        fused = fused_backends(chosen["backend"])  # type: ignore[arg-type]
        report["kernels"] = {"attention": fused.attention, "norm": f"{fused.norm} ({fused.norm_reason})",
                             "adam": f"{fused.adam} ({fused.adam_reason})", "multi_tensor": fused.multi_tensor,
                             "apex": fused.apex.detail, "problems": list(fused.problems)}
    report["rollout_servers"] = rollout_servers(urls, api_key) if urls else "none configured (rollout.urls)"
    return report


def render_env(report: dict[str, Any]) -> str:
    """The report as aligned text."""
    lines = [f"python {report['python']} on {report['platform']}, {report['cpus']} CPUs",
             f"torch CUDA build {report['torch_cuda'] or 'none (CPU wheel)'}; CUDA available: "
             f"{report['cuda_available']}"]
    lines.append("gpus: " + ("" if report["gpus"] else "none seen"))
    for gpu in report["gpus"]:
        lines.append(f"  {gpu['index']}: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
    lines.append("packages:")
    width = max(len(n) for n in report["packages"])
    for name, version in report["packages"].items():
        lines.append(f"  {name.ljust(width)}  {version or 'not installed'}  [{PACKAGES[name]}]")
    spec, fp8 = report["spec"], report["fp8"]
    lines.append(f"layer spec: model.spec={spec['spec']} -> {spec['backend']} ({spec['why']})")
    lines.append(f"fp8: {fp8['backend']} ({fp8['why']})")
    if "kernels" in report:
        lines.append("kernels with that spec:")
    for name, value in report.get("kernels", {}).items():
        if name == "problems":
            lines += [f"  PROBLEM: {p}" for p in value]
        else:
            lines.append(f"  {name}: {value}")
    servers = report["rollout_servers"]
    if isinstance(servers, str):
        lines.append(f"rollout servers: {servers}")
    else:
        lines.append("rollout servers:")
        for s in servers:
            state = "answers" if s["healthy"] else "does NOT answer /health"
            extra = ", ".join(f"{k} {s[k]}" for k in ("engine", "version", "device") if k in s)
            lines.append(f"  {s['url']}: {state}" + (f" ({extra})" if extra else ""))
    return "\n".join(lines)

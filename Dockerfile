# syntax=docker/dockerfile:1.7
# calibrl-mcore GPU image: NGC PyTorch + Transformer Engine + apex (built here) + SGLang + DALI + this package.
#
#   docker build -t calibrl-mcore:gpu .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data/models:/models -v /data/calibrl:/data/calibrl -v /shared/runs:/workspace/calibrl/runs \
#       calibrl-mcore:gpu calibrl train --config configs/qwen2_5_vl_7b.yaml
#   (multi-node: docs/scaling.md)
#
# Versions (pinned; change them together, a test checks them against pyproject.toml's `gpu` extra):
# * nvcr.io/nvidia/pytorch:25.06-py3: Ubuntu 24.04, Python 3.12, CUDA 12.9.1, NCCL 2.27.3 and NVIDIA's own
#   torch build 2.8.0a0+5228986c39.nv25.06. It is a CUDA 12 image on purpose: the CUDA-12 wheels below
#   (transformer_engine_cu12, nvidia-dali-cuda120, SGLang's sgl-kernel / flashinfer) need a CUDA 12 runtime,
#   and its torch 2.8 is the torch that sglang 0.5.4.post3 and sgl-kernel 0.3.16.post4 were built for.
# * The image's torch is never replaced: every pip call runs under /opt/calibrl/constraints.txt (the image's
#   own /etc/pip/constraint.txt, minus the packages pinned below, plus `torch==<installed version>`), and
#   packages whose metadata pins PyPI's torch (sglang: torch==2.8.0, which pip does not consider satisfied
#   by the pre-release 2.8.0a0) are installed --no-deps with their other requirements listed explicitly.
# * transformer-engine[pytorch] 2.11.0: megatron-core 0.16.1 declares and is tested with TE >=2.9,<2.12 (NGC
#   25.06 ships 2.4, too old for it); prebuilt CUDA-12 core, PyTorch extension compiled against this image's
#   torch (--no-build-isolation). tests/te_standin mirrors this version's classes.
# * apex tag 25.04, compiled from source with --cpp_ext --cuda_ext against this image's torch and CUDA.
# * transformers 5.24.0: the version the CPU test suite runs; calibrl-mcore needs transformers 5
#   (`rope_parameters`). sglang 0.5.4.post3 pins transformers==4.57.1 and torch==2.8.0: here its torch pin
#   holds (the image's 2.8.0a0) and transformers is overridden. What calibrl relies on (SGLang's request
#   classes, sampling checks, weight-group join) runs under transformers 5 in tests/test_sglang_contract.py;
#   its model path under 5.x is not verified on a GPU: if it fails, run SGLang from its own image
#   (lmsysorg/sglang:v0.5.4.post3) and pass `rollout.urls=[...]`.
# Not installed from the `gpu` extra:
# * not installed: vllm (0.30.0, pyproject's pin: its wheels pin torch==2.13.0 and CUDA 13, this image has torch
#   2.8 and CUDA 12.9; calibrl drives it through rollout/vllm_adapter.py, text prompts only)
# * not installed: flash-attn (TE uses cuDNN fused attention, SGLang flashinfer; a source build is ~1 h)
FROM nvcr.io/nvidia/pytorch:25.06-py3

ARG TE_VERSION=2.11.0
ARG APEX_REF=25.04
ARG SGLANG_VERSION=0.5.4.post3
ARG DALI_VERSION=1.51.2
ARG TRANSFORMERS_VERSION=5.24.0
ARG MAX_JOBS=16
# H100/H200 (sm_90); add 8.0 for A100
ARG TORCH_CUDA_ARCH_LIST=9.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/calibrl/constraints.txt \
    MAX_JOBS=${MAX_JOBS} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    NVTE_FRAMEWORK=pytorch

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. Freeze the image's stack: its constraint file without the packages pinned here, plus its exact torch.
RUN mkdir -p /opt/calibrl \
    && { grep -viE '^(torch|transformer[-_]engine|apex|nvidia[-_]dali|transformers|tokenizers|huggingface[-_]hub|safetensors)([=<>!~ ;[]|$)' \
           /etc/pip/constraint.txt || true; \
         python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))"; \
       } > /opt/calibrl/constraints.txt \
    && grep -q '^torch==' /opt/calibrl/constraints.txt

# 2. Transformer Engine (PyTorch extension compiled against the image's torch).
RUN pip install --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}"

# 3. apex from source, with its C++ and CUDA extensions (APEX_*_EXT: the same switches for newer apex).
RUN git clone --filter=blob:none https://github.com/NVIDIA/apex.git /opt/apex \
    && git -C /opt/apex checkout "${APEX_REF}" \
    && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation \
         --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" /opt/apex \
    && rm -rf /opt/apex/build

# 4. NVIDIA DALI (GPU image decoding / resizing for the data pipeline).
RUN pip install --extra-index-url https://pypi.nvidia.com "nvidia-dali-cuda120==${DALI_VERSION}"

# 5. SGLang without its torch pins: the package itself, then its other requirements from its own metadata
#    (sgl-kernel, flashinfer, xgrammar, ... stay pinned exactly as sglang pins them), then transformers.
RUN <<'EOS'
set -euo pipefail
pip install --no-deps "sglang==${SGLANG_VERSION}"
python - > /opt/calibrl/sglang-requirements.txt <<'EOF'
import importlib.metadata as md
import re

skip = {"torch", "torchaudio", "torchvision", "torchcodec", "triton", "transformers"}
for req in md.requires("sglang") or []:
    name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
    if "extra ==" not in req and name not in skip:
        print(req)
EOF
pip install -r /opt/calibrl/sglang-requirements.txt "transformers==${TRANSFORMERS_VERSION}"
EOS

# 6. calibrl-mcore: its runtime requirements from pyproject.toml (minus torch: pyproject pins the CPU
#    wheel the CI uses), then the package itself, editable, so configs/ and tools/ sit next to it.
WORKDIR /workspace/calibrl
COPY pyproject.toml README.md ./
RUN <<'EOS'
set -euo pipefail
python - > /opt/calibrl/requirements.txt <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[\s;<>=!~\[(]", d, maxsplit=1)[0].lower() != "torch"))
EOF
pip install -r /opt/calibrl/requirements.txt
EOS

COPY . .
RUN pip install --no-deps --no-build-isolation -e .

# 7. The image's torch is still the one it shipped with; print what the image contains.
RUN <<'EOS'
set -euo pipefail
python - <<'EOF'
import importlib.metadata as m

frozen = open("/opt/calibrl/constraints.txt").read().split()
assert "torch==" + m.version("torch") in frozen, "torch was replaced"
for pkg in ("torch", "transformer-engine", "apex", "nvidia-dali-cuda120", "sglang", "sgl-kernel",
            "transformers", "megatron-core", "calibrl-mcore"):
    print(f"{pkg:22s} {m.version(pkg)}")
EOF
EOS

ENV PYTHONPATH=/workspace/calibrl
CMD ["calibrl", "--help"]

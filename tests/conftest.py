import os
import sys
from pathlib import Path

import pytest

# Tests run on 2 cores; keep every process (and its torchrun children) from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process Megatron world (TP = PP = 1), unless one is already up."""
    from megatron.core import parallel_state

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed

    owned = not parallel_state.model_parallel_is_initialized()
    if owned:
        init_distributed(ParallelConfig())
    elif parallel_state.get_model_parallel_group().size() != 1:
        pytest.skip("a model-parallel world is already initialised in this process")
    yield
    if owned:
        destroy_distributed()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny Qwen2.5-VL and InternVL checkpoints of tools/make_tiny_model.py, built once per session."""
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, seed=0) for arch in ("qwen2_5_vl", "internvl")}

import logging
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


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state: put the root handlers and levels back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from calibrl_mcore import terminal

    named = {n: logging.getLogger(n).level for n in (*terminal.OUR_LOGGERS, *terminal.THIRD_PARTY_LOGGERS)}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for n, lvl in named.items():
        logging.getLogger(n).setLevel(lvl)
    logging.captureWarnings(False)

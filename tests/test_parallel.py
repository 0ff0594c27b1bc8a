"""calibrl_mcore.parallel: config validation, the CPU shim, single-process init, and TP/PP parity.

The parity tests run tests/workers/gpt_parity_worker.py under torchrun (gloo) at TP=2, PP=2 and TP=2 x PP=2
and compare logits, loss, and grad norms (global and per parameter) with the TP=1 x PP=1 run.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from calibrl_mcore.parallel import (
    ParallelConfig,
    apply_cpu_shim,
    cpu_shim,
    destroy_distributed,
    get_dp_group,
    init_distributed,
    maybe_apply_cpu_shim,
)
from tests.torchrun_utils import WORKERS, run_torchrun

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def load_worker_module():
    spec = importlib.util.spec_from_file_location("gpt_parity_worker", WORKERS / "gpt_parity_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size must be an int >= 1, got 0"),
        ({"pipeline_model_parallel_size": -1}, "pipeline_model_parallel_size must be an int >= 1"),
        ({"virtual_pipeline_model_parallel_size": 2}, "needs pipeline_model_parallel_size > 1"),
        ({"backend": "mpi"}, "backend must be 'auto', 'gloo' or 'nccl', got 'mpi'"),
        ({"timeout_minutes": 0}, "timeout_minutes must be > 0"),
    ],
)
def test_parallel_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_parallel_config_defaults_are_valid():
    cfg = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert (cfg.tensor_model_parallel_size, cfg.context_parallel_size, cfg.seed) == (1, 1, 1234)


# ---------------------------------------------------------------------------------------------- shim


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is only applied without CUDA")
def test_cpu_shim_is_idempotent_and_scoped_to_megatron():
    import importlib as il

    assert maybe_apply_cpu_shim() is True
    modules = [il.import_module(name) for name in cpu_shim._CUDA_CALL_SITES]
    proxies, tensor_cuda = {id(m.torch) for m in modules}, torch.Tensor.cuda
    apply_cpu_shim()
    assert maybe_apply_cpu_shim() is True
    assert {id(m.torch) for m in modules} == proxies and len(proxies) == 1
    assert torch.Tensor.cuda is tensor_cuda
    assert all(m.torch is not torch for m in modules)
    # Outside Megatron, torch is untouched.
    assert torch.cuda.current_device.__module__ == "torch.cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is only applied without CUDA")
def test_cpu_shim_maps_cuda_calls_to_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    apply_cpu_shim()
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    shape = p2p_communication.torch.empty((3,), device=p2p_communication.torch.cuda.current_device())
    assert shape.device.type == "cpu"
    p2p_communication.torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA"
    t = torch.ones(2)
    assert t.cuda() is t


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is only applied without CUDA")
def test_cpu_rng_tracker_forks_per_name_and_per_tp_rank():
    from megatron.core import tensor_parallel

    apply_cpu_shim()

    def draws(tp_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tensor_parallel.model_parallel_cuda_manual_seed(99, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.rand(3)
        with tracker.fork():
            first = torch.rand(3)
        with tracker.fork():
            second = torch.rand(3)
        after = torch.rand(3)
        torch.manual_seed(99)
        no_fork = torch.rand(6)
        assert torch.equal(torch.cat([before, after]), no_fork), "fork must restore the default stream"
        return first, second, before

    first0, second0, before0 = draws(tp_rank=0)
    first1, _, before1 = draws(tp_rank=1)
    assert not torch.equal(first0, second0), "the forked state advances between forks"
    assert not torch.equal(first0, first1), "TP ranks draw different dropout masks"
    assert torch.equal(before0, before1), "the default (data-parallel) stream is shared by TP ranks"


def test_maybe_apply_cpu_shim_never_touches_a_gpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_shim, "apply_cpu_shim", lambda: pytest.fail("shim applied on GPU"))
    assert maybe_apply_cpu_shim() is False


# ---------------------------------------------------------------------------------------------- init


@pytest.fixture
def no_torchrun_env(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_init_distributed_single_process_runs_megatron_ddp_and_optimizer(no_torchrun_env):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    worker = load_worker_module()
    info = init_distributed(ParallelConfig())
    try:
        assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, "gloo")
        assert info.device == torch.device("cpu")
        assert (info.tp_size, info.pp_size, info.dp_size, info.cp_size) == (1, 1, 1, 1)
        assert dist.get_world_size(info.dp_group) == 1 and get_dp_group() is info.dp_group

        # DDP buffers, the optimizer, grad norm and clipping all construct and run under the shim.
        model = worker.build_model(tp=1, pp=1, pre_process=True, post_process=True)
        worker.load_reference_weights(model, tp_size=1, tp_rank=0, layer_offset=0)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [ddp])
        model.config.finalize_model_grads_func = finalize_model_grads

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            per_token = chunk(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])
            return per_token, lambda out: (out.mean(), {"loss": out.mean().detach().clone()})

        before = [p.detach().clone() for p in model.parameters()]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(worker.make_micro_batches()),
            model=[ddp],
            num_microbatches=worker.NUM_MICRO_BATCHES,
            seq_length=worker.SEQ,
            micro_batch_size=worker.MICRO_BATCH,
        )
        updated, grad_norm, _ = optimizer.step()
        assert updated and len(losses) == worker.NUM_MICRO_BATCHES
        assert grad_norm > 1.0  # so clip_grad=1.0 went through the (shimmed) clipping path
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    finally:
        destroy_distributed()
    assert not dist.is_initialized()


def test_init_distributed_rejects_a_world_not_divisible_by_the_layout(no_torchrun_env):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by TP x PP x CP = 2 x 1 x 1 = 2"):
        init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------- parity

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}  # name -> (TP, PP)
_runs: dict[str, list[dict]] = {}


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpt_parity")


def run_layout(name: str, parity_dir: Path) -> list[dict]:
    """Run the worker once per layout (cached for the module); attach each last stage's logits."""
    if name not in _runs:
        tp, pp = LAYOUTS[name]
        out = parity_dir / name
        results = run_torchrun("gpt_parity_worker.py", tp * pp, out, "--tp", str(tp), "--pp", str(pp))
        assert len(results) == tp * pp, f"{name}: expected {tp * pp} rank files, got {len(results)}"
        for r in results:
            if r["is_last_stage"]:
                r["logits"] = torch.load(out / f"logits_rank{r['rank']}.pt")
        _runs[name] = results
    return _runs[name]


def grad_sq_by_name(results: list[dict]) -> dict[str, float]:
    """Sum each global parameter's squared-grad contributions over ranks (TP shards, PP stages)."""
    total: dict[str, float] = {}
    for r in results:
        for name, sq in r["grad_sq"].items():
            total[name] = total.get(name, 0.0) + sq
    return total


@pytest.mark.distributed
def test_reference_run_is_not_degenerate(parity_dir):
    (ref,) = run_layout("tp1", parity_dir)
    assert abs(ref["loss"] - math.log(512)) < 0.5, ref["loss"]  # near-uniform prediction at random init
    assert ref["logits"].shape == (2, 32, 512) and ref["logits"].std() > 0.1
    assert ref["grad_norm"] > 0.1 and len(ref["grad_sq"]) == 4 * 12 + 4


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_layout_matches_single_process(layout, parity_dir):
    (ref,) = run_layout("tp1", parity_dir)
    results = run_layout(layout, parity_dir)
    last = [r for r in results if r["is_last_stage"]]
    assert len(last) == LAYOUTS[layout][0], "every TP rank of the last stage reports"

    for r in last:
        dlogits = (r["logits"] - ref["logits"]).abs().max().item()
        assert dlogits <= 1e-5, f"{layout} rank {r['rank']}: max |dlogits| = {dlogits:.3e}"
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    for r in results:
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5, abs=0), f"rank {r['rank']}"

    per_param, ref_per_param = grad_sq_by_name(results), grad_sq_by_name([ref])
    assert per_param.keys() == ref_per_param.keys()
    for name, sq in ref_per_param.items():
        assert per_param[name] == pytest.approx(sq, rel=1e-5, abs=1e-12), name

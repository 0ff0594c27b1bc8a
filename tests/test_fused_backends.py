"""calibrl_mcore/parallel/fused.py: telling NVIDIA apex from the PyPI package named `apex`, and reporting the
Adam / multi-tensor / norm implementations Megatron-Core will use. Fake packages go in through sys.modules."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from calibrl_mcore.parallel import fused


def _module(name: str, package: bool = False, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = f"/fake/site-packages/{name.replace('.', '/')}.py"
    if package:
        mod.__path__ = []  # a package, but no submodules on disk
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


@pytest.fixture
def no_te_no_bound_adam(monkeypatch):
    """No Transformer Engine, and Megatron's optimizer module not imported yet (so the import chain decides)."""
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.optimizers", None)
    monkeypatch.delitem(sys.modules, "megatron.core.optimizer", raising=False)


def test_this_cpu_machine_has_no_apex_and_uses_torch_adamw():
    if torch.cuda.is_available() or fused.apex_status().kind != "absent":
        pytest.skip("asserts the CPU CI machine's state (no CUDA, no apex)")
    assert not fused.nvidia_apex_available()
    report = fused.fused_backends(cuda=False)
    assert report.apex.kind == "absent"
    assert report.adam == "torch.optim.AdamW (per-tensor loop)"
    assert report.multi_tensor == "megatron local (Python loop)"
    assert report.norm == "torch.nn.RMSNorm (CPU)"
    assert report.problems == ()
    # What Megatron really bound in this process agrees with the report.
    import megatron.core.optimizer as mopt

    assert mopt.USING_PYTORCH_OPTIMIZER and mopt.Adam is torch.optim.AdamW


def test_pypi_apex_is_reported_as_not_nvidia(monkeypatch, no_te_no_bound_adam):
    # PyPI's `apex` is an unrelated (Pyramid) package: a plain module with no `optimizers`.
    monkeypatch.setitem(sys.modules, "apex", _module("apex", __version__="0.9.10dev"))
    status = fused.apex_status()
    assert status.kind == "not-nvidia" and not status.usable
    assert "not NVIDIA apex" in status.detail and "PyPI" in status.detail
    assert not fused.nvidia_apex_available()
    report = fused.fused_backends(spec_backend="local", cuda=True)
    assert report.adam == "torch.optim.AdamW (foreach)"
    assert "non-NVIDIA" in report.adam_reason
    assert any("not NVIDIA apex" in p for p in report.problems)


def _fake_nvidia_apex(monkeypatch, with_cuda_ext: bool) -> None:
    class FusedAdam(torch.optim.Optimizer):
        pass

    monkeypatch.setitem(sys.modules, "apex", _module("apex", package=True))
    monkeypatch.setitem(sys.modules, "apex.optimizers", _module("apex.optimizers", FusedAdam=FusedAdam))
    monkeypatch.setitem(sys.modules, "apex.multi_tensor_apply", _module("apex.multi_tensor_apply"))
    if with_cuda_ext:
        monkeypatch.setitem(sys.modules, "amp_C", _module("amp_C"))
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", _module("fused_layer_norm_cuda"))
    else:
        monkeypatch.setitem(sys.modules, "amp_C", None)
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)


def test_nvidia_apex_with_cuda_extensions_is_detected(monkeypatch, no_te_no_bound_adam):
    _fake_nvidia_apex(monkeypatch, with_cuda_ext=True)
    status = fused.apex_status()
    assert status.kind == "nvidia" and status.usable
    assert status.fused_adam and status.amp_c and status.fused_layer_norm_cuda
    assert fused.nvidia_apex_available()
    report = fused.fused_backends(spec_backend="sdpa", cuda=True)
    assert report.adam == "apex.FusedAdam"
    assert report.multi_tensor == "apex amp_C"
    assert report.norm == "torch fused rms_norm"
    assert report.problems == ()


def test_nvidia_apex_without_cuda_extensions_is_a_problem(monkeypatch, no_te_no_bound_adam):
    _fake_nvidia_apex(monkeypatch, with_cuda_ext=False)
    status = fused.apex_status()
    assert status.kind == "nvidia-no-cuda-ext" and not status.usable and "--cuda_ext" in status.detail
    report = fused.fused_backends(spec_backend="te", cuda=True)
    assert report.adam == "apex.FusedAdam"  # Megatron only checks the Python import ...
    assert any("raises without amp_C" in p for p in report.problems)  # ... and fails when building it
    assert report.multi_tensor == "megatron local (Python loop)"
    assert report.norm == "TE fused norm"


def test_bound_megatron_adam_wins_over_the_import_chain(monkeypatch, no_te_no_bound_adam):
    """Megatron decided when megatron.core.optimizer was imported; apex installed later does not change it."""
    _fake_nvidia_apex(monkeypatch, with_cuda_ext=True)
    bound = _module("megatron.core.optimizer", Adam=torch.optim.AdamW, USING_PYTORCH_OPTIMIZER=True)
    monkeypatch.setitem(sys.modules, "megatron.core.optimizer", bound)
    report = fused.fused_backends(spec_backend="local", cuda=True)
    assert report.adam == "torch.optim.AdamW (foreach)"
    assert any("this process runs torch.optim.AdamW" in p for p in report.problems)


def test_log_fused_backends_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger=fused.__name__):
        report = fused.log_fused_backends(spec_backend="local", cuda=False)
    records = [r for r in caplog.records if r.name == fused.__name__]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert records[0].getMessage() == report.summary()
    assert f"adam={report.adam}" in report.summary()

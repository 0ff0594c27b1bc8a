"""Chunked fused log-prob + entropy vs the unfused fp32 log-softmax path (values and gradients), the
derivative of the entropy against fp64 autograd, the no-full-fp32-copy property, and TP=2 (torchrun)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calibrl_mcore.algo.fused_logprob import chunked_logprobs_and_entropy
from tests.torchrun_utils import run_torchrun
from tests.workers.fused_logprob_worker import CASES, make_case


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, dtype=torch.float32):
    """The unfused path (objective.logprobs_and_entropy without TP): one log_softmax over the upcast logits."""
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # [..., V]
    logp = log_probs.gather(-1, labels[..., None]).squeeze(-1)
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def inputs(n: int, vocab: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return logits, labels, torch.randn(n, generator=g), torch.randn(n, generator=g)


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """fp32 agreement relative to the tensor's scale: 1e-6 of max(1, max |expected|), plus rtol 1e-6."""
    atol = 1e-6 * max(1.0, expected.abs().max().item()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")


def values_and_grad(fn, logits, w_logp, w_ent, entropy_grad: bool):
    """(logp, entropy, d loss / d logits) for loss = Σ w·logp (+ Σ w'·H when the entropy has a gradient)."""
    x = logits.clone().requires_grad_(True)
    logp, ent = fn(x)
    loss = (w_logp * logp).sum() + ((w_ent * ent).sum() if entropy_grad else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), x.grad


def fused(logits, labels, w_logp, w_ent, entropy_grad=True, **kw):
    def fn(x):
        return chunked_logprobs_and_entropy(x, labels, entropy_grad=entropy_grad, **kw)

    return values_and_grad(fn, logits, w_logp, w_ent, entropy_grad)


def unfused(logits, labels, w_logp, w_ent, entropy_grad=True, temperature=1.0, dtype=torch.float32):
    def fn(x):
        return reference(x, labels, temperature, dtype)

    return values_and_grad(fn, logits, w_logp, w_ent, entropy_grad)


@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 64])  # n = 13: divides, does not divide, whole, larger
@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_unfused_fp32(chunk, entropy_grad, temperature):
    logits, labels, w_logp, w_ent = inputs(13, 1000)
    ours = fused(logits, labels, w_logp, w_ent, entropy_grad, chunk_size=chunk, temperature=temperature)
    ref = unfused(logits, labels, w_logp, w_ent, entropy_grad, temperature)
    for a, b, what in zip(ours, ref, ("logp", "entropy", "grad")):
        assert a.dtype == torch.float32, what
        assert_close_fp32(a, b, what)


def test_entropy_derivative_against_fp64_autograd():
    """∂H/∂z = −p (log p + H) and ∂log p(y)/∂z = onehot − p, checked against fp64 autograd."""
    logits, labels, w_logp, w_ent = inputs(9, 257, seed=3)
    ours = fused(logits, labels, w_logp, w_ent, chunk_size=4)
    ref = unfused(logits.double(), labels, w_logp.double(), w_ent.double(), dtype=torch.float64)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 16])
def test_bf16_inputs_match_within_bf16_tolerance(chunk):
    logits, labels, w_logp, w_ent = inputs(11, 512, dtype=torch.bfloat16, seed=1)
    logp, ent, grad = fused(logits, labels, w_logp, w_ent, chunk_size=chunk)
    ref_logp, ref_ent, ref_grad = unfused(logits, labels, w_logp, w_ent)
    # Both upcast the same bf16 values: the fp32 outputs agree to fp32 precision.
    assert_close_fp32(logp, ref_logp)
    assert_close_fp32(ent, ref_ent)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad)  # bf16 default tolerance (both round an fp32 gradient)


def test_leading_dims_and_entropy_only_gradient():
    logits, labels, _, w_ent = inputs(12, 50, seed=2)
    x = logits.view(3, 4, 50).clone().requires_grad_(True)
    logp, ent = chunked_logprobs_and_entropy(x, labels.view(3, 4), chunk_size=5, entropy_grad=True)
    assert logp.shape == ent.shape == (3, 4)
    (w_ent.view(3, 4) * ent).sum().backward()  # log-probs unused: their gradient arrives as None
    y = logits.clone().requires_grad_(True)
    (w_ent * reference(y, labels)[1]).sum().backward()
    assert_close_fp32(x.grad.view(12, 50), y.grad)


def test_entropy_without_grad_is_a_metric():
    logits, labels, _, _ = inputs(6, 40)
    x = logits.clone().requires_grad_(True)
    logp, ent = chunked_logprobs_and_entropy(x, labels, chunk_size=4)
    assert logp.requires_grad and not ent.requires_grad
    with torch.no_grad():
        logp2, ent2 = chunked_logprobs_and_entropy(x, labels)
    assert not logp2.requires_grad
    torch.testing.assert_close(logp2, logp.detach())


def test_zero_tokens():
    x = torch.zeros(0, 32, requires_grad=True)
    logp, ent = chunked_logprobs_and_entropy(
        x, torch.zeros(0, dtype=torch.long), chunk_size=8, entropy_grad=True
    )
    assert logp.shape == ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 32)


def test_bad_inputs_name_the_problem():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="disagree"):
        chunked_logprobs_and_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs_and_entropy(x, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="floating"):
        chunked_logprobs_and_entropy(x.long(), torch.zeros(4, dtype=torch.long))


class LargestFp32(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def test_never_materialises_full_fp32_logits():
    n, vocab, chunk = 64, 300, 8
    logits, labels, w_logp, w_ent = inputs(n, vocab, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    with LargestFp32() as probe:
        logp, ent = chunked_logprobs_and_entropy(x, labels, chunk_size=chunk, entropy_grad=True)
        ((w_logp * logp).sum() + (w_ent * ent).sum()).backward()
    assert probe.numel <= chunk * vocab, (probe.numel, chunk * vocab)
    with LargestFp32() as probe:
        reference(x, labels)
    assert probe.numel == n * vocab  # the probe does see the unfused path's full copy


@pytest.mark.distributed
def test_tp2_vocab_sharded_equals_unsharded(tmp_path):
    results = run_torchrun("fused_logprob_worker.py", 2, tmp_path, timeout=300)
    assert [r["tp_rank"] for r in results] == [0, 1] and all(r["empty_ok"] for r in results)
    for name, dtype, chunk, entropy_grad, temperature in CASES:
        logits, labels, w_logp, w_ent = make_case(dtype)
        kw = dict(chunk_size=chunk, temperature=temperature)
        logp, ent, grad = fused(logits, labels, w_logp, w_ent, entropy_grad, **kw)
        ref_logp, ref_ent = reference(logits, labels, temperature)
        sharded_grad = torch.cat([torch.tensor(r["cases"][name]["grad_slice"]) for r in results], dim=1)
        for r in results:
            c = r["cases"][name]
            assert_close_fp32(torch.tensor(c["logp"]), logp)
            assert_close_fp32(torch.tensor(c["entropy"]), ent)
            assert_close_fp32(torch.tensor(c["logp"]), ref_logp)
            assert_close_fp32(torch.tensor(c["entropy"]), ref_ent)
            assert_close_fp32(torch.tensor(c["megatron_logp"]), ref_logp)
        # Each rank's gradient slice is exact given the global statistics (bf16: rounded the same way).
        assert_close_fp32(sharded_grad, grad.float(), name)

"""The CalibRL term's cache-blocked autograd function (`calibration.CalibrationTerm`) against the plain autograd
composition it replaces: the gradient bit for bit, the value to fp32 rounding (its rows are summed in fp32,
then added in fp64), the metric counts exactly; every aggregation mode, with and without the expert mask, α at 0, ½ and 1,
one block and many; and `aggregate_grad` against autograd's own chain through `aggregate`."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from calibrl_mcore.algo import calibration, losses
from calibrl_mcore.algo.aggregation import AGG_MODES, aggregate, aggregate_grad, compute_loss_normalizer


def _inputs(seed: int, b: int = 37, t: int = 53):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    adv = torch.randn(b, generator=g)
    adv[::5] = 0.0  # rows without a push
    return {
        "lp": old + 0.1 * torch.randn(b, t, generator=g), "old": old, "expert": -torch.rand(b, t, generator=g) * 3,
        "adv": adv, "passed": torch.rand(b, generator=g) < 0.4,
        "mask": torch.arange(t)[None] < torch.randint(0, t + 1, (b,), generator=g)[:, None],
        "expert_mask": torch.rand(b, t, generator=g) < 0.7,
    }


def _plain_calibration(lp, baseline, sw, expert_mask, mask, alpha, norm):
    """The term as the plain composition computes it (the implementation before the fused function): per-token
    LeakyReLU of (b − ℓ)·s·w, the slope −s·w / −α·s·w (full side where (b − ℓ)·s·w ≥ 0) times the incoming
    gradient, the expert mask, then `aggregate` over the response mask."""
    y = (baseline - lp.detach()) * sw
    slope = torch.where(y >= 0, -sw, -alpha * sw)  # [B, T]
    cal = F.leaky_relu(y, alpha) + (lp - lp.detach()) * slope  # value of the first term, gradient of the second
    if expert_mask is not None:
        cal = cal * expert_mask
    return aggregate(cal, mask, norm), y >= 0


CASES = list(itertools.product(AGG_MODES, (False, True), (0.0, 0.5, 1.0)))


@pytest.mark.parametrize("agg,use_expert_mask,alpha", CASES)
def test_blocked_calibration_matches_the_plain_composition(agg, use_expert_mask, alpha, monkeypatch):
    d = _inputs(seed=CASES.index((agg, use_expert_mask, alpha)))
    monkeypatch.setattr(calibration, "BLOCK_ELEMENTS", 5 * 53)  # 5 rows per block: 8 blocks, a short last one
    mask = d["mask"].float()
    em = d["expert_mask"].float() if use_expert_mask else None
    cal_mask = mask if em is None else mask * em
    norm = compute_loss_normalizer(d["mask"], agg)
    sw = ((d["passed"].float() * 2 - 1) * d["adv"].abs())[:, None]
    grads, values = [], []
    for blocked in (True, False):
        lp = d["lp"].clone().requires_grad_(True)
        if blocked:
            value, damped, row_tokens = calibration.CalibrationTerm.apply(
                lp, d["expert"], sw, cal_mask, mask, alpha, norm)
            assert torch.equal(row_tokens, cal_mask.sum(dim=-1))
        else:
            value, full = _plain_calibration(lp, d["expert"], sw, em, mask, alpha, norm)
            damped = (~full & cal_mask.bool()).sum().double()
        (value * 1.7).backward()
        values.append((value.detach(), damped))
        grads.append(lp.grad)
    torch.testing.assert_close(values[0][0], values[1][0], rtol=2e-6, atol=1e-7)
    assert torch.equal(values[0][1], values[1][1])
    assert torch.equal(grads[0], grads[1])


def test_calibrl_metrics_count_each_pushed_token_once():
    d = _inputs(seed=3)
    _, m = losses.calibrl_loss(d["lp"], d["old"], d["expert"], d["adv"], d["passed"], d["mask"], alpha=0.5)
    mask = d["mask"].float()
    y = (d["expert"] - d["lp"]) * ((d["passed"].float() * 2 - 1) * d["adv"].abs())[:, None]
    pushed = (d["adv"] != 0).float()[:, None]
    n = mask.sum()
    assert torch.equal(m["leaky_pos_frac"], ((y >= 0).float() * mask * pushed).sum() / n)
    assert torch.equal(m["leaky_neg_frac"], ((y < 0).float() * mask * pushed).sum() / n)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("row_tokens", [False, True])
def test_aggregate_grad_is_autograds_chain(agg, row_tokens):
    d = _inputs(seed=11)
    mask = d["mask"].float()
    norm = compute_loss_normalizer(d["mask"], agg)
    if row_tokens:  # context parallelism: whole-row counts larger than this part's
        norm = norm.for_rows(mask.sum(dim=-1) + 3)
    values = d["lp"].clone().requires_grad_(True)
    grad_out = torch.tensor(0.37)
    aggregate(values, mask, norm).backward(grad_out)
    assert torch.equal(values.grad, aggregate_grad(grad_out, mask, norm) * mask)

"""Loss families vs a per-token Python-loop reference (values and gradients, every agg mode).

The reference below is written from CALIBRL.md's formulas with scalar float64 autograd, one token at a
time; it never calls the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from calibrl_mcore.algo.aggregation import AGG_MODES, compute_loss_normalizer
from calibrl_mcore.algo.losses import calibrl_loss, dapo_loss, grpo_loss, luffy_loss, rlplus_loss

B, T = 7, 9


# ---------------------------------------------------------------------------------------------- reference


def ref_pg(lp, old, a, cl, ch, dc):
    ratio = torch.exp(lp - old)
    pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - cl, 1 + ch))
    if dc is not None and a < 0:
        pg = torch.min(pg, torch.tensor(-a * dc, dtype=torch.float64))
    return pg


def ref_cal(lp, b, a, passed, alpha):
    s = 1.0 if passed else -1.0
    x = -s * (lp - b)
    return abs(a) * (x if x >= 0 else alpha * x)


def ref_luffy_off(lp, a, gamma):
    p = torch.exp(lp)
    return -a * p / (p + gamma)


def ref_rlplus_off(lp, old, a, kappa):
    p = torch.exp(lp)
    p_old = math.exp(old)
    ratio = 2 * p / (p_old + 0.5 * (p_old + 1))
    return -a * (1 - p.item()) ** kappa * ratio


def ref_aggregate(values: dict, mask: torch.Tensor, agg: str):
    """values[(b, t)] -> scalar tensor; plain loops."""
    rows = {}
    for (b, _t), v in values.items():
        rows.setdefault(b, []).append(v)
    n_tok = sum(len(v) for v in rows.values())
    n_seq = len(rows)
    if n_tok == 0:
        return torch.zeros((), dtype=torch.float64)
    if agg == "token-mean":
        return sum(sum(v) for v in rows.values()) / n_tok
    if agg == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in rows.values()) / n_seq
    if agg == "seq-mean-token-sum":
        return sum(sum(v) for v in rows.values()) / n_seq
    return sum(sum(v) for v in rows.values()) / (n_seq * mask.shape[1])


def ref_loss(family, data, agg, params):
    """Total loss as float64 tensor + grad wrt logp, by per-token loop."""
    lp_all = data["logp"].detach().double().clone().requires_grad_(True)
    mask = data["mask"]
    pg_vals, cal_vals, off_vals = {}, {}, {}
    for b in range(B):
        a = float(data["adv"][b])
        for t in range(T):
            if not mask[b, t]:
                continue
            lp = lp_all[b, t]
            old = float(data["old"][b, t])
            if family in ("luffy", "rlplus") and data["is_expert"][b]:
                if family == "luffy":
                    off_vals[(b, t)] = ref_luffy_off(lp, a, params.get("gamma", 0.1))
                else:
                    off_vals[(b, t)] = ref_rlplus_off(lp, old, a, 0.5)
                continue
            pg_vals[(b, t)] = ref_pg(lp, old, a, params["cl"], params["ch"], params["dc"])
            if family == "calibrl":
                cal_vals[(b, t)] = ref_cal(lp, float(data["expert"][b, t]), a, bool(data["passed"][b]),
                                           params["alpha"])
    both = {**pg_vals, **off_vals}
    # pg and off-policy terms share one normaliser: aggregate their per-token sum.
    total_vals = {k: pg_vals.get(k, 0.0) + off_vals.get(k, 0.0) for k in both}
    loss = ref_aggregate(total_vals, mask, agg)
    if family == "calibrl":
        loss = loss + params["lam"] * ref_aggregate(cal_vals, mask, agg)
    loss.backward()
    return loss.detach(), lp_all.grad


# ---------------------------------------------------------------------------------------------- data


def make_data(seed: int, dtype=torch.float32, all_same_sign=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # ratios beyond the clips
    logp = logp.clamp(max=-1e-3)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0  # an empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[3] = 0.0  # all-pass / all-fail group: rarity 0
    if all_same_sign:
        adv = adv.abs()
    passed = torch.rand(B, generator=g) > 0.5
    expert = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    expert[:, T - 3:] = 0.0  # past the expert's length: b_t = 0
    is_expert = torch.zeros(B, dtype=torch.bool)
    is_expert[[1, 5]] = True
    return {
        "logp": logp.to(dtype), "old": old.to(dtype), "mask": mask, "adv": adv.to(dtype),
        "passed": passed, "expert": expert.to(dtype), "is_expert": is_expert,
    }


def call(family, data, agg, params):
    logp = data["logp"].clone().requires_grad_(True)
    common = dict(clip_low=params["cl"], clip_high=params["ch"], dual_clip=params["dc"], agg=agg)
    if family == "grpo":
        loss, m = grpo_loss(logp, data["old"], data["adv"], data["mask"], **common)
    elif family == "dapo":
        loss, m = dapo_loss(logp, data["old"], data["adv"], data["mask"], **common)
    elif family == "calibrl":
        loss, m = calibrl_loss(logp, data["old"], data["expert"], data["adv"], data["passed"], data["mask"],
                               alpha=params["alpha"], lam=params["lam"], **common)
    elif family == "luffy":
        loss, m = luffy_loss(logp, data["old"], data["adv"], data["mask"], data["is_expert"], **common)
    else:
        loss, m = rlplus_loss(logp, data["old"], data["adv"], data["mask"], data["is_expert"], **common)
    loss.backward()
    return loss.detach(), logp.grad, m


FAMILIES = ["grpo", "dapo", "calibrl", "luffy", "rlplus"]
PARAMS = {"cl": 0.2, "ch": 0.2, "dc": 3.0, "alpha": 0.5, "lam": 0.1}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_token_reference_fp32(family, agg, seed):
    params = dict(PARAMS, ch=0.28 if family == "dapo" else 0.2)
    data = make_data(seed)
    loss, grad, metrics = call(family, data, agg, params)
    ref, ref_grad = ref_loss(family, data, agg, params)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.isclose(metrics["loss"], ref, rtol=1e-5, atol=1e-6)
    assert grad[~data["mask"]].abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_bf16(family):
    params = dict(PARAMS, ch=0.28 if family == "dapo" else 0.2)
    data = make_data(3, dtype=torch.bfloat16)
    loss, grad, _ = call(family, data, "token-mean", params)
    assert grad.dtype == torch.bfloat16
    ref, ref_grad = ref_loss(family, data, "token-mean", params)  # reference on the same bf16 values
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)  # arithmetic is fp32 inside
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-3)  # grad stored in bf16


@pytest.mark.parametrize("agg", AGG_MODES)
def test_calibrl_params_and_no_dual_clip(agg):
    params = {"cl": 0.1, "ch": 0.3, "dc": None, "alpha": 0.2, "lam": 0.7}
    data = make_data(5, all_same_sign=True)
    loss, grad, _ = call("calibrl", data, agg, params)
    ref, ref_grad = ref_loss("calibrl", data, agg, params)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_calibrl_zero_rarity_rows_get_only_pg_gradient():
    data = make_data(7)
    data["adv"] = torch.zeros(B)
    loss, grad, m = call("calibrl", data, "token-mean", PARAMS)
    assert loss.item() == 0.0 and grad.abs().max() == 0
    assert m["cal_loss"].item() == 0.0


def test_calibrl_direction_pushes_pass_up_and_fail_down():
    # One passing and one failing row, identical tokens, equal |A|: gradient signs must differ.
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    expert = torch.full((2, 3), -1.5)
    adv = torch.tensor([0.5, -0.5])
    passed = torch.tensor([True, False])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, m = calibrl_loss(logp, logp.detach(), expert, adv, passed, mask, lam=1.0, dual_clip=None)
    loss.backward()
    # Row 0 is above the expert (ℓ > b) and passes: damped push up (−λ α |A| / N per token) plus PG.
    # Row 1 is above the expert and fails: full push down (+λ |A| / N) plus PG (−A·… = +0.5/N).
    n = 6
    torch.testing.assert_close(logp.grad[0], torch.full((3,), (-0.5 - 0.5 * 0.5) / n))
    torch.testing.assert_close(logp.grad[1], torch.full((3,), (0.5 + 0.5) / n))
    assert m["leaky_pos_frac"].item() == pytest.approx(0.5)
    assert m["leaky_neg_frac"].item() == pytest.approx(0.5)
    # calibration weight |A|·T by direction, per on-policy token: 0.5·3/6 up (row 0), the same down (row 1)
    assert (m["cal_mass_up"].item(), m["cal_mass_down"].item()) == (pytest.approx(0.25), pytest.approx(0.25))


def test_calibrl_masked_variant_drops_positions_past_expert():
    data = make_data(2)
    expert_mask = torch.ones(B, T, dtype=torch.bool)
    expert_mask[:, T - 3:] = False
    logp = data["logp"].clone().requires_grad_(True)
    loss, m = calibrl_loss(logp, data["old"], data["expert"], data["adv"], data["passed"], data["mask"],
                           expert_mask=expert_mask, lam=1.0)
    loss.backward()
    # Reference: the cal term summed only over positions inside the expert, normalised by all tokens.
    lp = data["logp"].double()
    cal = 0.0
    n = int(data["mask"].sum())
    for b in range(B):
        for t in range(T):
            if data["mask"][b, t] and expert_mask[b, t]:
                cal += ref_cal(lp[b, t].item(), data["expert"][b, t].item(), data["adv"][b].item(),
                               bool(data["passed"][b]), 0.5)
    assert m["cal_loss"].item() == pytest.approx(cal / n, rel=1e-5)


def test_entropy_and_kl_regularisers():
    data = make_data(4)
    entropy = torch.rand(B, T)
    ref_lp = data["logp"] - 0.3 * torch.rand(B, T)
    logp = data["logp"].clone().requires_grad_(True)
    loss, m = grpo_loss(logp, data["old"], data["adv"], data["mask"], entropy=entropy, entropy_coef=0.01,
                        ref_logp=ref_lp, kl_coef=0.05)
    base, _ = grpo_loss(data["logp"], data["old"], data["adv"], data["mask"])
    mask = data["mask"]
    ent_ref = entropy[mask].double().mean()
    d = (ref_lp - data["logp"]).double()[mask]
    kl_ref = (d.exp() - d - 1).mean()
    assert m["entropy"].item() == pytest.approx(ent_ref.item(), rel=1e-5)
    assert m["kl"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert loss.item() == pytest.approx(base.item() - 0.01 * ent_ref.item() + 0.05 * kl_ref.item(), rel=1e-5)


def test_clip_fraction_metrics_match_counts():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 5.0]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, m_pos = grpo_loss(logp, old, torch.tensor([1.0]), mask)
    assert m_pos["clip_frac_high"].item() == pytest.approx(0.5)  # ratios 1.5 and 5.0 above 1.2
    assert m_pos["clip_frac_low"].item() == 0.0
    _, m_neg = grpo_loss(logp, old, torch.tensor([-1.0]), mask)
    assert m_neg["clip_frac_low"].item() == pytest.approx(0.25)  # ratio 0.5 below 0.8
    assert m_neg["clip_frac_dual"].item() == pytest.approx(0.25)  # ratio 5.0 above dual clip 3


def test_microbatch_shares_sum_to_full_batch():
    data = make_data(6)
    full, _, _ = call("calibrl", data, "seq-mean-token-mean", PARAMS)
    halves = [slice(0, 3), slice(3, B)]
    norm = compute_loss_normalizer([data["mask"][h] for h in halves], "seq-mean-token-mean")
    total = 0.0
    for h in halves:
        loss, _ = calibrl_loss(data["logp"][h], data["old"][h], data["expert"][h], data["adv"][h],
                               data["passed"][h], data["mask"][h], agg="seq-mean-token-mean", normalizer=norm)
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    d = make_data(0)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(d["logp"], d["old"][:, :-1], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(d["logp"], d["old"], d["adv"][:-1], d["mask"])
    with pytest.raises(ValueError, match="response_mask"):
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"][:-1])
    with pytest.raises(ValueError, match="expert_logp"):
        calibrl_loss(d["logp"], d["old"], d["expert"][:, :2], d["adv"], d["passed"], d["mask"])
    with pytest.raises(ValueError, match="passed"):
        calibrl_loss(d["logp"], d["old"], d["expert"], d["adv"], d["passed"][:2], d["mask"])
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], agg="mean")
    with pytest.raises(ValueError, match="alpha"):
        calibrl_loss(d["logp"], d["old"], d["expert"], d["adv"], d["passed"], d["mask"], alpha=2.0)
    with pytest.raises(ValueError, match="is_expert"):
        luffy_loss(d["logp"], d["old"], d["adv"], d["mask"], d["is_expert"].long())
    with pytest.raises(ValueError, match="logp"):
        grpo_loss(d["logp"][0], d["old"], d["adv"], d["mask"])

"""Reward functions by name: the training reward (`calibrl`) and the validation reward (`acc_x_fmt`).

Configs name a reward (`reward: calibrl`) rather than import a function, so the rollout workers, the
trainer and the evaluation script agree on one definition and a typo fails loudly at start-up
(`get_reward_fn`) instead of silently scoring every rollout 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calibrl_mcore.rewards.answer import extract_answer, is_equivalent
from calibrl_mcore.rewards.format import format_reward

__all__ = [
    "FORMAT_WEIGHT",
    "PASS_THRESHOLD",
    "REWARD_FNS",
    "RewardFn",
    "RewardResult",
    "acc_x_fmt_reward",
    "accuracy_reward",
    "batch_compute_rewards",
    "compute_reward",
    "get_reward_fn",
]

FORMAT_WEIGHT = 0.1
"""Weight of the format term in r = acc + 0.1·fmt (CalibRL paper)."""

PASS_THRESHOLD = 0.1
"""A rollout passes iff reward > 0.1: with r = acc + 0.1·fmt only acc = 1 clears it, so a well
formatted wrong answer (r = 0.1) is a failure for the group pass-rate statistics."""


@dataclass(frozen=True)
class RewardResult:
    """Score of one rollout, with its parts kept for logging (accuracy and format rates per step)."""

    reward: float
    """Scalar the advantage is computed from."""
    acc: float
    """1.0 iff the extracted answer is equivalent to the gold one."""
    fmt: float
    """1.0 iff the rollout follows `<think>…</think><answer>…</answer>`."""
    extracted: str | None
    """Content of the last `<answer>` block (None if there is none), for debugging the grader."""

    @property
    def passed(self) -> bool:
        """Whether this rollout counts as a pass (`reward > PASS_THRESHOLD`)."""
        return self.reward > PASS_THRESHOLD


RewardFn = Callable[..., RewardResult]
"""`fn(response: str, gold: str, *, timeout_s: float = 2.0) -> RewardResult`."""


def _accuracy(extracted: str | None, gold: str, timeout_s: float) -> float:
    return float(extracted is not None and is_equivalent(extracted, gold, timeout_s=timeout_s))


def accuracy_reward(response: str, gold: str, *, timeout_s: float = 2.0) -> float:
    """1.0 iff the response's final `<answer>` is equivalent to `gold`, else 0.0 (never raises)."""
    return _accuracy(extract_answer(response), gold, timeout_s)


def _score_parts(response: str, gold: str, timeout_s: float) -> tuple[float, float, str | None]:
    extracted = extract_answer(response)
    return _accuracy(extracted, gold, timeout_s), format_reward(response), extracted


def compute_reward(
    response: str, gold: str, *, format_weight: float = FORMAT_WEIGHT, gate_on_format: bool = False,
    timeout_s: float = 2.0,
) -> RewardResult:
    """The CalibRL training reward r = acc + format_weight·fmt.

    The format term is a small bonus rather than a gate so that early in training, when few answers are
    right, the policy still gets a gradient towards the output protocol the accuracy check relies on. The
    price: a right answer in a broken format passes (r = 1 > 0.1), and a policy can drift into that.
    `gate_on_format` (config `rewards.gate_on_format`) closes it: r = acc·fmt + format_weight·fmt. `acc`
    and `fmt` are reported ungated either way, so the metrics can still count broken-format passes.
    """
    acc, fmt, extracted = _score_parts(response, gold, timeout_s)
    credited = acc * fmt if gate_on_format else acc
    return RewardResult(reward=credited + format_weight * fmt, acc=acc, fmt=fmt, extracted=extracted)


def acc_x_fmt_reward(response: str, gold: str, *, timeout_s: float = 2.0) -> RewardResult:
    """Validation reward r = acc·fmt: a right answer only counts when it was given in the protocol,
    which is the number reported as accuracy (a format bonus would inflate it by 0.1·fmt-rate)."""
    acc, fmt, extracted = _score_parts(response, gold, timeout_s)
    return RewardResult(reward=acc * fmt, acc=acc, fmt=fmt, extracted=extracted)


REWARD_FNS: dict[str, RewardFn] = {
    "calibrl": compute_reward,
    "acc_x_fmt": acc_x_fmt_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """Look a reward up by its config name; unknown names raise ValueError listing the valid ones."""
    try:
        return REWARD_FNS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward function {name!r}; valid names: {sorted(REWARD_FNS)}") from None


def batch_compute_rewards(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    reward_fn: str | RewardFn = "calibrl",
    timeout_s: float = 2.0,
) -> list[RewardResult]:
    """Score rollouts pairwise (`responses[i]` against `golds[i]`), in order.

    A group of G rollouts of one prompt passes the same gold G times. Sequential on purpose: sympy holds
    the GIL, so threads would not speed it up, and each call is already bounded by `timeout_s`.
    """
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers; they must pair up")
    fn = get_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
    return [fn(response, gold, timeout_s=timeout_s) for response, gold in zip(responses, golds)]

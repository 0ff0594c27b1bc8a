"""Verifiable rewards for CalibRL: r = acc + 0.1·fmt per rollout; a rollout passes iff r > 0.1.

- `answer`: `extract_answer` (last `<answer>` block) and `is_equivalent` (math-verify + our normalisation).
- `format`: `format_reward` (`<think>…</think>` then `<answer>…</answer>`, nothing else).
- `registry`: `compute_reward` / `RewardResult`, `batch_compute_rewards`, `REWARD_FNS` / `get_reward_fn`.

Equivalence rules (pinned by tests/test_rewards.py):
- Percent: "25%" ≡ "25" and "25%" ≡ "0.25", with the % on either side. That is math-verify's own rule;
  geometry datasets store "what percent" golds both ways and the two readings practically never collide.
- Units and degrees are stripped, never converted: "12 cm" ≡ "12", "30°" ≡ "30", but "60°" ≢ "π/3".
- Multiple choice: a gold that is one upper-case letter A–J ("B", "(B)", "B.", "Option B", "B) 12")
  needs a prediction naming the same letter in any case ("b) 12"); the option text is not checked.
- Numbers are compared the math-verify way (6 decimals): "1/3" ≡ "0.333333" but not "0.333".
- Timeout: one deadline `timeout_s` covers parse + verify. math-verify's own timeout is `signal.alarm`,
  which raises ValueError off the main thread (e.g. in an HTTP worker), so we always pass it
  `parsing_timeout=None` / `timeout_seconds=None` and guard the call ourselves: a SIGALRM interval
  timer in the main thread (interrupts the work); a watchdog daemon thread elsewhere (the caller gets
  False on time, the computation finishes in the background). Constants too big to evaluate
  (`10^{10^{10}}`) are refused up front, because big-int C loops hold the GIL and would starve the
  watchdog. math-verify logs once that its timeout is disabled: expected.
- Never raises: garbage input, sympy errors and timeouts are logged at debug level and give False.
"""

from calibrl_mcore.rewards.answer import MAX_ANSWER_CHARS, extract_answer, is_equivalent, normalize_answer
from calibrl_mcore.rewards.format import format_reward
from calibrl_mcore.rewards.registry import (
    FORMAT_WEIGHT,
    PASS_THRESHOLD,
    REWARD_FNS,
    RewardFn,
    RewardResult,
    acc_x_fmt_reward,
    accuracy_reward,
    batch_compute_rewards,
    compute_reward,
    get_reward_fn,
)

__all__ = [
    "FORMAT_WEIGHT",
    "MAX_ANSWER_CHARS",
    "PASS_THRESHOLD",
    "REWARD_FNS",
    "RewardFn",
    "RewardResult",
    "acc_x_fmt_reward",
    "accuracy_reward",
    "batch_compute_rewards",
    "compute_reward",
    "extract_answer",
    "format_reward",
    "get_reward_fn",
    "is_equivalent",
    "normalize_answer",
]

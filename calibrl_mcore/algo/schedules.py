"""Adaptive CalibRL coefficients: schedules for α and λ, an entropy feedback controller for λ, and α from
the group pass rate.

The paper's stated limitation is that α and λ need tuning. Two ways around it:
- time schedules (linear / cosine from the initial to a final value over the run);
- feedback: λ scales the exploration push; raising it keeps entropy up (the paper's observation is that
  CalibRL's entropy stays above GRPO's). The controller nudges λ multiplicatively to hold the policy's
  entropy inside a target band [low, high], clamped to [lam_min, lam_max].
- α from the pass rate: α damps the push past the expert baseline. When most rollouts already pass,
  pushing correct answers further above the expert mostly sharpens the policy (entropy collapse), so α
  shrinks; when few pass, α grows to keep pushing: α = α_max − (α_max − α_min) · pass_rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def time_schedule(kind: str, start: float, end: float, step: int, total: int) -> float:
    """Value at `step` (0-based) of `total` steps: constant | linear | cosine from start to end."""
    if kind == "constant" or total <= 1:
        return start
    frac = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"schedule {kind!r} is not one of constant, linear, cosine")


@dataclass
class EntropyController:
    """Multiplicative controller holding entropy in [low, high] by moving λ."""

    lam: float
    low: float
    high: float
    rate: float = 0.1
    lam_min: float = 0.0
    lam_max: float = 1.0

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"entropy band must have low <= high, got [{self.low}, {self.high}]")
        if self.rate <= 0:
            raise ValueError(f"controller rate must be > 0, got {self.rate}")

    def update(self, entropy: float) -> float:
        """Feed the last step's entropy; returns λ for the next step."""
        if entropy < self.low:
            self.lam *= 1.0 + self.rate
        elif entropy > self.high:
            self.lam /= 1.0 + self.rate
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])


def alpha_from_pass_rate(pass_rate: float, alpha_min: float, alpha_max: float) -> float:
    """α = α_max − (α_max − α_min) · pass_rate, clamped to [0, 1]."""
    p = min(max(pass_rate, 0.0), 1.0)
    return min(max(alpha_max - (alpha_max - alpha_min) * p, 0.0), 1.0)


class CoefficientSchedule:
    """α and λ for each step from the algorithm config (`alpha_schedule`, `lam_schedule`, ...)."""

    def __init__(self, cfg, total_steps: int) -> None:
        self.cfg, self.total = cfg, total_steps
        self.controller = None
        if cfg.lam_schedule == "entropy":
            self.controller = EntropyController(cfg.lam, cfg.entropy_target_low, cfg.entropy_target_high,
                                                cfg.lam_rate, cfg.lam_min, cfg.lam_max)

    def alpha(self, step: int, pass_rate: float | None = None) -> float:
        c = self.cfg
        if c.alpha_schedule == "pass_rate":
            return alpha_from_pass_rate(0.0 if pass_rate is None else pass_rate, c.alpha_min, c.alpha_max)
        return time_schedule(c.alpha_schedule, c.alpha, c.alpha_final, step, self.total)

    def lam(self, step: int) -> float:
        c = self.cfg
        if self.controller is not None:
            return self.controller.lam
        return time_schedule(c.lam_schedule, c.lam, c.lam_final, step, self.total)

    def observe(self, entropy: float | None) -> None:
        """After a step: feed the measured entropy to the controller (if any)."""
        if self.controller is not None and entropy is not None and math.isfinite(entropy):
            self.controller.update(entropy)

    def state_dict(self) -> dict:
        return self.controller.state_dict() if self.controller else {}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None and state:
            self.controller.load_state_dict(state)

"""Statistics behind every algorithm comparison the project prints: seeds, intervals, a computed verdict.

- `describe(xs)`: mean and sample sd over seeds.
- `paired_difference(a, b)`: a and b ran with the same seeds (same start, prompt order and rollout seeds),
  so each seed gives one difference a_s − b_s; the 95% interval is mean ± t(0.975, n−1) · sd / √n.
- `familywise_level(m)`: the per-comparison level that keeps the chance of any false verdict among m
  comparisons at 5% (Bonferroni): a study comparing 6 arms on 3 metrics would otherwise print about one
  spurious "higher"/"lower" by chance.
- `verdict(...)`: the one line a reader takes away, computed from that interval, never written by hand.
- `pass_at_k(n, c, k)`: the unbiased pass@k estimate from n samples of which c are right (Chen et al.
  2021, "Evaluating Large Language Models Trained on Code", eq. 1).

No SciPy: the Student-t quantile comes from the closed form of the t distribution for integer degrees of
freedom (Abramowitz & Stegun 26.7.3–26.7.4), inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer `df` ≥ 1 (A&S 26.7.3 for odd df, 26.7.4 for even)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sinθ · Σ_k Π_{i≤k} (2i−1)/(2i) · cos^{2k}θ, k = 0 .. (df−2)/2
        term = total = 1.0
        for i in range(1, df // 2):
            term *= (2 * i - 1) / (2 * i) * cos2
            total += term
        return math.sin(theta) * total
    # (2/π) · (θ + sinθ · Σ_k Π_{i≤k} (2i)/(2i+1) · cos^{2k+1}θ), k = 0 .. (df−3)/2
    series = 0.0
    if df > 1:
        term = series = math.cos(theta)
        for i in range(1, (df - 1) // 2):
            term *= (2 * i) / (2 * i + 1) * cos2
            series += term
    return 2.0 / math.pi * (theta + math.sin(theta) * series)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with integer `df` ≥ 1, to ~1e-10."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    target, lo, hi = 2.0 * p - 1.0, 0.0, 1.0
    while _t_central_mass(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_central_mass(mid, df) < target else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean and sample sd of one metric over n seeds (sd is nan for one seed)."""

    n: int
    mean: float
    sd: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f}" if self.n > 1 else f"{self.mean:.3f}"


@dataclass(frozen=True)
class PairedDifference:
    """a − b over n paired seeds: mean, sd of the differences, and the t-interval [lo, hi] at `level`."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    level: float = 0.95

    @property
    def covers_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.3f} (1 seed: no interval)"
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def describe(values: Sequence[float]) -> Summary:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("describe() needs at least one value")
    return Summary(len(xs), statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """a_s − b_s over the seeds both ran; `a` and `b` are aligned by seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(d), statistics.fmean(d)
    if n < 2:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan, level)
    sd = statistics.stdev(d)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return PairedDifference(n, mean, sd, mean - half, mean + half, level)


def familywise_level(comparisons: int, level: float = 0.95) -> float:
    """Bonferroni: each of `comparisons` intervals at 1 − (1 − level)/m, so all hold together with `level`."""
    return 1.0 - (1.0 - level) / max(comparisons, 1)


def level_name(level: float) -> str:
    """95% / 99.72% ...: enough digits to tell the level apart."""
    return f"{100 * level:.{0 if round(100 * level, 6).is_integer() else 2}f}%"


def verdict(diff: PairedDifference, a: str, b: str, metric: str) -> str:
    """One line computed from the interval of a − b: which is higher, or that the seeds cannot tell."""
    seeds = f"{diff.n} seed{'s' if diff.n != 1 else ''}"
    if diff.n < 2:
        return f"{metric}: {a} − {b} = {diff.mean:+.3f} from 1 seed: no interval, no verdict"
    ci = f"{a} − {b} = {diff.mean:+.3f}, {level_name(diff.level)} CI [{diff.lo:+.3f}, {diff.hi:+.3f}]"
    if diff.covers_zero:
        return f"{metric}: no significant difference at {seeds} ({ci})"
    return f"{metric}: {a} {'higher' if diff.mean > 0 else 'lower'} than {b} at {seeds} ({ci})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is right) from n samples with c right: 1 − C(n−c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_values(samples: int) -> list[int]:
    """The k reported for `samples` samples per prompt: 1, 2, 4, ... up to `samples` (and `samples` itself)."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if not ks or ks[-1] == samples else [*ks, samples]

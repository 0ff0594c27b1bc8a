"""Which data-parallel rank trains which row of the step: decided once, on the driver, before anything is sent.

    mini-batch m      the groups (prompts) of the step split into `train.mini_batches_per_step` runs of
                      consecutive group ids, as `Trainer.mini_batches` always did
    within m          the trained rows laid out group after group, cut into DP contiguous runs of about equal
                      tokens (prompt + response): a group is split only where a cut falls inside it, so at most
                      DP − 1 groups per mini-batch straddle two ranks, and those carry their group ids, which
                      keeps the DP-reduced advantages exact (`algo/advantages.py`)
    rows of a rank    its trained rows + the expert rows of its groups (their old log-probs are the CalibRL
                      baseline), nothing else: `rows_of(rank)`

Contiguous cuts keep the image work per replica near 1/DP (a prompt's images are encoded once per replica
that holds one of its rows) while the token balance is within one row's length per cut.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from calibrl_mcore.trainer.batch import Row

__all__ = ["RowPlan", "assign_rows", "group_mini_batches"]


def group_mini_batches(group_ids: Sequence[int], mini_batches: int) -> dict[int, int]:
    """{group id: mini-batch}: sorted group ids cut into `mini_batches` runs of ceil(G / k) groups."""
    groups = sorted(set(group_ids))
    per = max(1, -(-len(groups) // mini_batches))
    return {g: j // per for j, g in enumerate(groups)}


def _balanced_cuts(lengths: Sequence[int], parts: int) -> list[int]:
    """Cut positions 0 = c_0 <= c_1 <= ... <= c_parts = n such that the runs lengths[c_i:c_i+1] have about equal
    sums: each inner cut is the prefix position nearest to i/parts of the total. Every run is non-empty when
    n >= parts; with fewer rows the last runs are empty."""
    n = len(lengths)
    prefix = list(itertools.accumulate(lengths, initial=0))  # [n + 1]
    cuts = [0]
    for i in range(1, parts):
        lo, hi = (cuts[-1] + 1, n - (parts - i)) if n >= parts else (min(i, n), min(i, n))
        target = prefix[n] * i / parts
        p = min(max(bisect.bisect_left(prefix, target), lo), hi)  # first prefix >= target ...
        if p > lo and target - prefix[p - 1] <= prefix[p] - target:  # ... or the one before, if nearer
            p -= 1
        cuts.append(p)
    return cuts + [n]


@dataclass(frozen=True)
class RowPlan:
    """The step's rows (global indices into the driver's row list) per DP rank and mini-batch."""

    dp: int
    owner: tuple[int, ...]
    """per row: the DP rank that trains it, or −1 (forward-only expert rows, dropped groups)."""
    mini_batch: tuple[int, ...]
    """per row: its group's mini-batch."""
    num_mini_batches: int
    experts: dict[int, tuple[int, ...]]
    """group id -> its expert rows."""
    group_of: tuple[int, ...]
    """per row: its group id."""
    tokens: tuple[int, ...]
    """per DP rank: prompt + response tokens of its trained rows (all mini-batches)."""

    def trained(self, rank: int) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o == rank]

    def rows_of(self, rank: int) -> list[int]:
        """What DP rank `rank` receives: its trained rows and the expert rows of their groups, in row order."""
        trained = self.trained(rank)
        groups = {self.group_of[i] for i in trained}
        return sorted(set(trained).union(*(self.experts.get(g, ()) for g in groups)))

    @property
    def runnable(self) -> list[bool]:
        """per mini-batch: every DP rank trains rows of it (DDP's gradient all-reduce is collective)."""
        held = {(o, m) for o, m in zip(self.owner, self.mini_batch) if o >= 0}
        return [all((r, m) in held for r in range(self.dp)) for m in range(self.num_mini_batches)]

    @property
    def complete(self) -> bool:
        """Every DP rank trains at least one row this step."""
        return set(range(self.dp)) <= set(self.owner)

    @property
    def split_groups(self) -> int:
        """Groups whose trained rows are spread over more than one DP rank."""
        owners: dict[int, set[int]] = {}
        for g, o in zip(self.group_of, self.owner):
            if o >= 0:
                owners.setdefault(g, set()).add(o)
        return sum(len(o) > 1 for o in owners.values())

    @property
    def token_imbalance(self) -> float:
        """max over DP ranks of trained tokens / their mean (1.0 = perfectly balanced)."""
        mean = sum(self.tokens) / max(len(self.tokens), 1)
        return max(self.tokens) / mean if mean else 1.0


def assign_rows(rows: Sequence[Row], dp: int, mini_batches: int, *, trains_expert: bool) -> RowPlan:
    """Plan the step (see the module docstring). `trains_expert`: the loss has an off-policy expert term
    (LUFFY, RL-PLUS), so expert rows are trained rows like the others."""
    if dp < 1 or mini_batches < 1:
        raise ValueError(f"assign_rows: dp={dp} and mini_batches={mini_batches} must be >= 1")
    group_of = tuple(r.group_id for r in rows)
    which = group_mini_batches(group_of, mini_batches)
    order = {g: j for j, g in enumerate(sorted(which))}
    experts: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.is_expert:
            experts.setdefault(r.group_id, []).append(i)
    owner = [-1] * len(rows)
    tokens = [0] * dp
    for m in range(mini_batches):
        # [n_m] this mini-batch's trained rows, group after group (row order inside a group)
        run = sorted((i for i, r in enumerate(rows) if which[r.group_id] == m and (trains_expert or not r.is_expert)),
                     key=lambda i: (order[group_of[i]], i))
        lengths = [rows[i].length for i in run]
        cuts = _balanced_cuts(lengths, dp)
        for rank in range(dp):
            for i in run[cuts[rank] : cuts[rank + 1]]:
                owner[i] = rank
                tokens[rank] += rows[i].length
    return RowPlan(dp=dp, owner=tuple(owner), mini_batch=tuple(which[g] for g in group_of),
                   num_mini_batches=mini_batches, experts={g: tuple(v) for g, v in experts.items()},
                   group_of=group_of, tokens=tuple(tokens))

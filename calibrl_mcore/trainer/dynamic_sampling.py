"""DAPO's dynamic sampling on the trainer side: drop groups without signal and refill the step's batch.

A group whose on-policy samples all earn the same reward has zero advantage everywhere: it only shrinks
the loss of the others (token-mean) and costs a forward/backward. DAPO drops such groups and keeps
sampling fresh prompt batches until the step has `want` groups that carry signal (or a round limit is
reached), then trains on exactly `want` of them, in the order they were sampled.

The tensor form of the same test over data-parallel ranks is `calibrl_mcore.algo.dapo.dynamic_sampling_keep_mask`;
here rank 0 judges whole groups on the rows it collected, before anything is broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calibrl_mcore.trainer.batch import Row


def flat_groups(rows: Sequence[Row]) -> set[int]:
    """Group ids whose on-policy rows all have the same reward (expert rows do not count)."""
    rewards: dict[int, set[float]] = {}
    for r in rows:
        if not r.is_expert:
            rewards.setdefault(r.group_id, set()).add(r.reward)
    return {g for g, values in rewards.items() if len(values) == 1}


def informative_groups(rows: Sequence[Row]) -> list[int]:
    """Group ids with on-policy reward variance, in order of first appearance."""
    flat = flat_groups(rows)
    seen: dict[int, None] = {}
    for r in rows:
        if not r.is_expert and r.group_id not in flat:
            seen.setdefault(r.group_id)
    return list(seen)


@dataclass
class RefillResult:
    rows: list[Row]  # the groups to train on (all their rows, expert rows included)
    sampled: list[Row]  # every row sampled this step (reward metrics describe the policy, not the filter)
    rounds: int  # extra prompt batches sampled after the first
    groups: int  # informative groups kept (== want unless the rounds ran out)


def refill_informative_groups(
    rows: list[Row], want: int, sample_more: Callable[[int], list[Row]], max_rounds: int
) -> RefillResult:
    """Keep informative groups of `rows`; while fewer than `want`, call `sample_more(round)` (round = 1, 2, ...,
    at most `max_rounds`) for another batch of rows with fresh group ids. Returns the first `want` informative
    groups' rows."""
    if want < 1 or max_rounds < 0:
        raise ValueError(f"want={want} must be >= 1 and max_rounds={max_rounds} >= 0")
    sampled = list(rows)
    kept = informative_groups(rows)
    rounds = 0
    while len(kept) < want and rounds < max_rounds:
        rounds += 1
        more = sample_more(rounds)
        clash = {r.group_id for r in more} & {r.group_id for r in sampled}
        if clash:
            raise ValueError(f"refill round {rounds} reused group ids {sorted(clash)[:5]}: each round needs fresh ids")
        sampled += more
        kept += informative_groups(more)
    keep = set(kept[:want])
    return RefillResult([r for r in sampled if r.group_id in keep], sampled, rounds, len(keep))

"""DAPO dynamic sampling on the trainer side (`calibrl_mcore/trainer/dynamic_sampling.py`): flat groups are
found, the batch is refilled from further rounds up to the wanted number of informative groups, in sampling
order, and a round limit is respected."""

from __future__ import annotations

import pytest

from calibrl_mcore.trainer.batch import Row
from calibrl_mcore.trainer.dynamic_sampling import flat_groups, informative_groups, refill_informative_groups


def _group(gid: int, rewards: list[float]) -> list[Row]:
    rows = [Row(uid=f"p{gid}", group_id=gid, is_expert=False, prompt_ids=[1], response_ids=[2], reward=r)
            for r in rewards]
    return rows + [Row(uid=f"p{gid}", group_id=gid, is_expert=True, prompt_ids=[1], response_ids=[3], reward=1.0)]


def test_flat_and_informative_groups():
    rows = _group(0, [1, 1, 1]) + _group(1, [0, 1, 0]) + _group(2, [0, 0, 0]) + _group(3, [0.5, 0.2, 0.5])
    assert flat_groups(rows) == {0, 2}  # the expert's reward does not count
    assert informative_groups(rows) == [1, 3]


def test_refill_until_enough_informative_groups():
    first = _group(0, [1, 1]) + _group(1, [0, 1]) + _group(2, [0, 0])
    rounds = {1: _group(10, [1, 1]) + _group(11, [0, 0]), 2: _group(20, [0, 1]) + _group(21, [1, 0]) + _group(22, [0, 1])}
    calls = []

    def sample_more(round_index: int) -> list[Row]:
        calls.append(round_index)
        return rounds[round_index]

    result = refill_informative_groups(first, 3, sample_more, max_rounds=5)
    assert calls == [1, 2] and result.rounds == 2 and result.groups == 3
    assert sorted({r.group_id for r in result.rows}) == [1, 20, 21]  # the first three informative, in order
    assert sum(r.is_expert for r in result.rows) == 3  # their expert rows come along
    assert len(result.sampled) == len(first) + len(rounds[1]) + len(rounds[2])


def test_refill_stops_at_the_round_limit_and_rejects_reused_ids():
    first = _group(0, [1, 1]) + _group(1, [0, 1])
    result = refill_informative_groups(first, 4, lambda k: _group(100 + k, [0, 0]), max_rounds=2)
    assert result.rounds == 2 and result.groups == 1 and {r.group_id for r in result.rows} == {1}
    assert refill_informative_groups(first, 1, lambda k: [], max_rounds=0).rounds == 0
    with pytest.raises(ValueError, match="reused group ids"):
        refill_informative_groups(first, 2, lambda k: _group(0, [0, 1]), max_rounds=1)

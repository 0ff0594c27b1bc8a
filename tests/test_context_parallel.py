"""Context parallelism pieces that need no process group: the chunk layout, the padding rule, and the loss
aggregation over CP parts. The distributed checks live with the layouts they belong to:
tests/test_qwen2_5_vl_provider.py (CP=2, TP2xCP2, PP2xCP2 logits and grads vs transformers) and
tests/test_trainer_e2e.py (CP=2 first-step loss vs one process).
"""

from __future__ import annotations

import pytest
import torch

from calibrl_mcore.algo.aggregation import AGG_MODES, aggregate, compute_loss_normalizer
from model_providers.context_parallel import cp_pad_multiple, local_chunks, local_positions


def test_load_balanced_layout_covers_the_sequence_once():
    assert local_chunks(2, 0) == (0, 3) and local_chunks(2, 1) == (1, 2)
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        seen = torch.cat([local_positions(48, cp, r) for r in range(cp)])
        assert sorted(seen.tolist()) == list(range(48))


def test_padding_rule_and_error():
    assert cp_pad_multiple(1) == 1 and cp_pad_multiple(4) == 8
    assert cp_pad_multiple() == 1  # no parallel state: no CP
    with pytest.raises(ValueError, match="not a multiple of 2 x context_parallel_size = 4"):
        local_positions(10, 2, 0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_over_cp_parts_equals_whole(agg):
    """Each CP rank aggregates its part with the whole rows' token counts; the parts sum to the whole."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 16, generator=gen)
    mask = (torch.rand(3, 16, generator=gen) > 0.3).float()
    norm = compute_loss_normalizer(mask.bool(), agg)
    whole = aggregate(values, mask, norm)
    cp = 2
    parts = sum(
        aggregate(values[:, idx], mask[:, idx], norm.for_rows(mask.sum(dim=1)))
        for idx in (local_positions(16, cp, r) for r in range(cp))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_collate_pads_to_the_requested_multiple():
    from calibrl_mcore.trainer.batch import Row, collate

    rows = [Row(uid="a", group_id=0, is_expert=False, prompt_ids=[5, 6, 7], response_ids=[8, 9])]
    pos = lambda ids, grid, attn: torch.arange(ids.shape[1]).expand(3, *ids.shape)  # noqa: E731
    assert collate(rows, [0], pos).input_ids.shape == (1, 5)
    mb = collate(rows, [0], pos, pad_multiple=4)
    assert mb.input_ids.shape == (1, 8) and int(mb.seq_lengths[0]) == 5 and int(mb.loss_mask.sum()) == 2

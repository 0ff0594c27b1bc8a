"""Vocab-parallel log-probs / entropy and micro-batch collation vs plain references (single process)."""

from __future__ import annotations

import pytest
import torch

from calibrl_mcore.trainer.batch import Row, chunk_by_length, collate, padding_fraction
from calibrl_mcore.trainer.objective import token_logprobs, vocab_parallel_entropy


def test_logprobs_and_entropy_match_log_softmax(megatron_world):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits.double(), -1)
    lp = token_logprobs(logits, labels)
    torch.testing.assert_close(lp.double(), ref.gather(-1, labels[..., None])[..., 0], rtol=1e-6, atol=1e-6)
    ent = vocab_parallel_entropy(logits)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), rtol=1e-6, atol=1e-6)
    ent.sum().backward()  # differentiable (entropy bonus)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_collate_places_response_values_at_prediction_columns():
    rows = [Row(uid="a", group_id=1, is_expert=False, prompt_ids=[5, 6, 7], response_ids=[8, 9]),
            Row(uid="b", group_id=1, is_expert=False, prompt_ids=[5, 6, 7], response_ids=[3, 4, 2, 1])]
    pos = lambda ids, grid, attn: torch.arange(ids.shape[1]).expand_as(ids)  # noqa: E731
    mb = collate(rows, [0, 1], pos, {"old": lambda i: [float(10 * i + j) for j in range(len(rows[i].response_ids))]},
                 {"adv": lambda i: 0.5 - i}, pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 3, 4, 2, 1]]
    assert mb.labels.tolist() == [[6, 7, 8, 9, 0, 0, 0], [6, 7, 3, 4, 2, 1, 0]]
    # logits at column 2 predict the first response token (column 3 of input_ids)
    assert mb.loss_mask.tolist() == [[False, False, True, True, False, False, False],
                                     [False, False, True, True, True, True, False]]
    assert mb.extras["old"][1, 2:6].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert mb.extras["adv"].tolist() == [0.5, -0.5]
    assert mb.seq_lengths.tolist() == [5, 7]
    assert padding_fraction([mb]) == pytest.approx(2 / 14)


def test_chunks_are_length_sorted():
    rows = [Row(uid=str(i), group_id=0, is_expert=False, prompt_ids=[1] * n, response_ids=[2]) for i, n in
            enumerate([5, 1, 3, 2])]
    assert chunk_by_length(range(4), rows, 2) == [[1, 3], [2, 0]]


def test_token_budget_chunks():
    from calibrl_mcore.trainer.batch import chunk_by_tokens, micro_batch_chunks

    # lengths (prompt + 1 response token): 6, 2, 4, 3, 9, 2 -> sorted 2(1), 2(5), 3(3), 4(2), 6(0), 9(4)
    rows = [Row(uid=str(i), group_id=0, is_expert=False, prompt_ids=[1] * (n - 1), response_ids=[2]) for i, n in
            enumerate([6, 2, 4, 3, 9, 2])]
    # packed: sums of real lengths <= 8; the 9-token row exceeds the budget and goes alone
    assert chunk_by_tokens(range(6), rows, 8, packed=True) == [[1, 5, 3], [2], [0], [4]]
    # padded: rows x longest <= 8
    assert chunk_by_tokens(range(6), rows, 8, packed=False) == [[1, 5], [3, 2], [0], [4]]
    assert micro_batch_chunks(range(6), rows, 4) == chunk_by_length(range(6), rows, 4)
    chunks = micro_batch_chunks(range(6), rows, 4, 12, packed=True)
    assert sorted(i for c in chunks for i in c) == list(range(6))  # every row exactly once


def test_fused_logprobs_and_entropy_match_vocab_parallel_path(megatron_world):
    from calibrl_mcore.trainer.objective import logprobs_and_entropy

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 13, generator=g)
    labels = torch.randint(0, 13, (2, 4), generator=g)
    lp, ent = logprobs_and_entropy(logits, labels)
    torch.testing.assert_close(lp, token_logprobs(logits, labels), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, vocab_parallel_entropy(logits), rtol=1e-6, atol=1e-6)


def test_response_only_logprobs_equal_full_computation_on_the_mask(megatron_world):
    from calibrl_mcore.trainer.objective import logprobs_and_entropy, response_logprobs_and_entropy

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    lp, ent = response_logprobs_and_entropy(logits, labels, mask)
    full_lp, full_ent = logprobs_and_entropy(logits, labels)
    torch.testing.assert_close(lp, full_lp * mask)
    torch.testing.assert_close(ent, full_ent.detach() * mask)
    (lp * mask).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    (full_lp * mask).sum().backward()
    torch.testing.assert_close(grad, logits.grad)

"""Tests for calibrl_mcore.rewards: answer extraction, equivalence, format reward, registry.

Every expected value below is written out by hand (what a grader *should* say), never computed by the
code under test.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from calibrl_mcore.rewards import (
    PASS_THRESHOLD,
    REWARD_FNS,
    RewardResult,
    acc_x_fmt_reward,
    accuracy_reward,
    batch_compute_rewards,
    compute_reward,
    extract_answer,
    format_reward,
    get_reward_fn,
    is_equivalent,
)

# (pred, gold, expected)
EQUIVALENCE_TABLE = [
    # multiple choice
    ("B", "B", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("Option B", "B", True),
    ("b) 12", "B", True),
    ("\\text{(C)}", "C", True),
    ("B", "(B) 12", True),
    ("C", "B", False),
    ("12", "B", False),
    ("A + b", "A", False),
    # fractions and decimals
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("0.333333", "1/3", True),
    ("0.333", "\\frac{1}{3}", False),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("12.0", "12", True),
    ("2^{10}", "1024", True),
    # roots and pi
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("\\sqrt{50}", "5\\sqrt{2}", True),
    ("3\\sqrt{2}", "2\\sqrt{3}", False),
    ("2π", "2\\pi", True),
    ("\\pi", "3.14159", False),
    ("4\\pi", "4\\pi \\text{ cm}^2", True),
    # units
    ("12 cm", "12", True),
    ("5 \\text{ m}^2", "5", True),
    ("12 square units", "12", True),
    ("12\\,\\text{cm}", "12", True),
    ("13 cm", "12", False),
    # degrees
    ("30°", "30", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("30 degrees", "30", True),
    ("\\boxed{45^\\circ}", "45", True),
    ("60°", "\\frac{\\pi}{3}", False),
    # percent: "25%" is both 25 and 0.25
    ("25%", "25", True),
    ("25\\%", "0.25", True),
    ("0.25", "25\\%", True),
    ("25", "0.25", False),
    ("20%", "25", False),
    # separators, wrappers, punctuation, prose
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("$12$", "12", True),
    ("\\(12\\)", "12", True),
    ("\\text{12}", "12", True),
    ("12.", "12", True),
    ("The answer is 12", "12", True),
    ("12 or 13", "13", False),
    # algebra, equations, sets and intervals
    ("x = 3", "3", True),
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("x^2 + 1", "(x+1)^2", False),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("[1, 2)", "[1,2)", True),
    ("(1, 2]", "[1, 2)", False),
    ("\\infty", "\\infty", True),
    # garbage must be False, never an exception
    ("", "12", False),
    ("   ", "12", False),
    ("12", "", False),
    ("}}}{{", "12", False),
    ("\\frac{", "12", False),
    ("None", "12", False),
    ("NaN", "12", False),
    ("x" * 5000, "12", False),
    ("9" * 900, "12", False),
    ("10^{10^{10}}", "1", False),
    ("9^{9^{9^{9}}}", "1", False),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), EQUIVALENCE_TABLE)
def test_is_equivalent_table(pred: str, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold) is expected


@pytest.mark.parametrize("bad", [None, 12, 1.5, ["12"], b"12"])
def test_is_equivalent_non_string_input_is_false(bad: object) -> None:
    assert is_equivalent(bad, "12") is False  # type: ignore[arg-type]
    assert is_equivalent("12", bad) is False  # type: ignore[arg-type]


# --- timeout ---------------------------------------------------------------------------------------


def _run_in_thread(fn) -> list[object]:
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "is_equivalent hung in a worker thread"
    return out


def test_is_equivalent_from_worker_thread_returns_bool() -> None:
    # math-verify's signal-based timeout would raise ValueError here; ours must not.
    out = _run_in_thread(lambda: is_equivalent("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", timeout_s=10.0))
    assert out == [True]


def test_timeout_in_worker_thread_gives_false_on_time() -> None:
    start = time.monotonic()
    out = _run_in_thread(lambda: is_equivalent("\\sin^2(y) + \\cos^2(y)", "1", timeout_s=1e-4))
    assert out == [False]
    assert time.monotonic() - start < 5.0


def test_timeout_in_main_thread_gives_false_and_restores_signal_state() -> None:
    assert threading.current_thread() is threading.main_thread()
    handler_before = signal.getsignal(signal.SIGALRM)
    assert is_equivalent("\\sin^2(z) + \\cos^2(z) + 1", "2", timeout_s=1e-4) is False
    assert signal.getsignal(signal.SIGALRM) is handler_before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# --- extraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>r</think><answer>12</answer>", "12"),
        ("<answer>1</answer> wait, no. <answer>2</answer>", "2"),
        ("<answer>a <answer>b</answer>", "b"),
        ("<ANSWER> 12 </Answer>", "12"),
        ("< answer >12</ answer >", "12"),
        ("<answer>\n  x = 3\n</answer>", "x = 3"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("<answer>The answer is \\boxed{x^{2}}.</answer>", "x^{2}"),
        ("<answer>\\boxed{1} or \\boxed{\\sqrt{2}}</answer>", "\\sqrt{2}"),
        ("<answer>\\boxed{12</answer>", "\\boxed{12"),
        ("The answer is \\boxed{12}", None),
        ("<answer>12", None),
        ("<answer>   </answer>", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "degenerate",
    ["<answer>" * 4000, "</answer>" * 4000, "<answer>" + "\\boxed{" * 5000 + "</answer>", "<think>" * 4000],
)
def test_degenerate_rollouts_are_scored_quickly(degenerate: str) -> None:
    # Repetition loops are common early in RL; the grader must stay linear in the rollout length.
    start = time.monotonic()
    result = compute_reward(degenerate, "12")
    assert result.acc == 0.0 and result.fmt == 0.0
    assert time.monotonic() - start < 2.0


# --- format reward ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>reasoning</think><answer>12</answer>", 1.0),
        ("\n<think>\nstep 1\nstep 2\n</think>\n\n<answer> 12 </answer>\n", 1.0),
        ("<think>r</think><answer>12</answer><|im_end|>", 1.0),
        ("<Think>r</Think> <Answer>12</Answer>", 1.0),
        ("<answer>12</answer>", 0.0),  # missing think
        ("<answer>12</answer><think>r</think>", 0.0),  # answer before think
        ("<think>r</think><answer>12</answer><answer>13</answer>", 0.0),  # two answers
        ("<think>r</think><think>s</think><answer>12</answer>", 0.0),  # two thinks
        ("<think>r</think><answer>12</answer> Actually it is 13.", 0.0),  # trailing junk
        ("Sure! <think>r</think><answer>12</answer>", 0.0),  # leading junk
        ("<think>r</think> so <answer>12</answer>", 0.0),  # text between blocks
        ("<think></think><answer>12</answer>", 0.0),  # empty think
        ("<think>r</think><answer> </answer>", 0.0),  # empty answer
        ("<think>r<answer>12</answer>", 0.0),  # unclosed think
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(text: str, expected: float) -> None:
    assert format_reward(text) == expected


# --- rewards and registry --------------------------------------------------------------------------

GOOD = "<think>2 + 2 = 4</think><answer>4</answer>"
WRONG = "<think>2 + 2 = 5</think><answer>5</answer>"
UNFORMATTED_RIGHT = "I think <answer>4</answer>"


def test_compute_reward_parts() -> None:
    assert compute_reward(GOOD, "4") == RewardResult(reward=1.1, acc=1.0, fmt=1.0, extracted="4")
    assert compute_reward(WRONG, "4") == RewardResult(reward=0.1, acc=0.0, fmt=1.0, extracted="5")
    assert compute_reward(UNFORMATTED_RIGHT, "4") == RewardResult(reward=1.0, acc=1.0, fmt=0.0, extracted="4")
    assert compute_reward("no tags at all", "4") == RewardResult(reward=0.0, acc=0.0, fmt=0.0, extracted=None)
    assert compute_reward(GOOD, "4", format_weight=0.5).reward == 1.5


def test_pass_threshold_only_lets_correct_answers_pass() -> None:
    assert PASS_THRESHOLD == 0.1
    assert compute_reward(GOOD, "4").passed is True
    assert compute_reward(UNFORMATTED_RIGHT, "4").passed is True
    assert compute_reward(WRONG, "4").passed is False  # reward exactly 0.1 is not a pass


def test_gate_on_format_stops_broken_format_passes() -> None:
    """rewards.gate_on_format: r = acc·fmt + 0.1·fmt; acc and fmt stay ungated for the hacking metric."""
    gated = compute_reward(UNFORMATTED_RIGHT, "4", gate_on_format=True)
    assert gated == RewardResult(reward=0.0, acc=1.0, fmt=0.0, extracted="4")
    assert gated.passed is False
    assert compute_reward(GOOD, "4", gate_on_format=True) == compute_reward(GOOD, "4")
    assert compute_reward(WRONG, "4", gate_on_format=True) == compute_reward(WRONG, "4")


def test_accuracy_reward() -> None:
    assert accuracy_reward(GOOD, "4") == 1.0
    assert accuracy_reward(WRONG, "4") == 0.0
    assert accuracy_reward("4", "4") == 0.0  # no answer block


def test_acc_x_fmt_reward() -> None:
    assert acc_x_fmt_reward(GOOD, "4").reward == 1.0
    assert acc_x_fmt_reward(UNFORMATTED_RIGHT, "4").reward == 0.0
    assert acc_x_fmt_reward(WRONG, "4").reward == 0.0


def test_registry_names_and_lookup() -> None:
    assert set(REWARD_FNS) == {"calibrl", "acc_x_fmt"}
    assert get_reward_fn("calibrl") is compute_reward
    assert get_reward_fn("acc_x_fmt") is acc_x_fmt_reward


def test_registry_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="accuracy") as info:
        get_reward_fn("accuracy")
    assert "calibrl" in str(info.value) and "acc_x_fmt" in str(info.value)


def test_batch_compute_rewards() -> None:
    results = batch_compute_rewards([GOOD, WRONG, UNFORMATTED_RIGHT], ["4", "4", "4"])
    assert [r.reward for r in results] == [1.1, 0.1, 1.0]
    assert [r.passed for r in results] == [True, False, True]
    by_name = batch_compute_rewards([GOOD, UNFORMATTED_RIGHT], ["4", "4"], reward_fn="acc_x_fmt")
    assert [r.reward for r in by_name] == [1.0, 0.0]
    assert batch_compute_rewards([], []) == []


def test_batch_compute_rewards_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        batch_compute_rewards([GOOD, WRONG], ["4"])

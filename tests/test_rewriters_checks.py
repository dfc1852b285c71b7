"""The rewrite checks on hand-written cases: each failure says why, each near miss passes."""

from __future__ import annotations

import pytest

from thresher.rewriters.checks import (
    CHECKS,
    check_answer,
    check_code,
    check_length,
    check_scaffolding,
    final_answer,
    find_code,
    run_checks,
)

MATH = (
    "Natalia sold 48 clips in April and half as many in May, so 48 / 2 = 24 clips in May.\n"
    "Altogether she sold 48 + 24 = 72 clips.\n#### 72"
)
MATH_REWRITE = (
    "Analysis: we add April's sales to May's, which are half of April's.\n\n"
    "Step-by-step solution:\n1. May: 48 / 2 = 24 clips.\n2. Total: 48 + 24 = 72 clips.\n\n"
    "Result: Natalia sold 72 clips in April and May."
)


def test_a_rewrite_that_drops_the_number_fails_on_the_answer() -> None:
    dropped = MATH_REWRITE.replace("72 clips in April", "all those clips in April").replace("= 72", "= the total")
    why = check_answer(MATH, dropped)
    assert why == "the original's final answer '72' (after '####') is not in the rewrite"
    assert check_answer(MATH, MATH_REWRITE) is None
    assert run_checks(MATH, dropped) == ("answer", why)
    assert run_checks(MATH, MATH_REWRITE) is None


def test_a_rewrite_that_adds_code_fails_on_code() -> None:
    original = "To reverse a list in Python, call its reverse() method, or slice it with a step of -1."
    rewrite = (
        "There are two ways to reverse a list in Python:\n\n```python\nitems.reverse()\nreversed_items = items[::-1]\n"
        "```\n\nThe first changes the list in place; the second, a slice with a step of -1, makes a new one."
    )
    assert check_code(original, rewrite) == "the rewrite adds code (a fenced code block) that the original does not have"
    assert check_code(rewrite, original) == "the original has code (a fenced code block) and the rewrite has none"
    assert check_code(rewrite, rewrite) is None and check_code(original, original) is None
    # unfenced code counts too; prose with a semicolon does not
    bare = "def add(a, b):\n    return a + b\nprint(add(1, 2))"
    assert find_code(bare) is not None
    assert find_code("It rained; we stayed in. Then the sun came out.") is None


def test_a_rewrite_that_halves_the_length_fails_on_length() -> None:
    original = " ".join(f"word{i}" for i in range(40))
    half_minus_one = " ".join(f"word{i}" for i in range(19))
    assert check_length(original, half_minus_one) == "the rewrite has 19 tokens, under 0.5 of the original's 40"
    assert check_length(original, " ".join(f"word{i}" for i in range(20))) is None  # exactly half passes
    assert run_checks(original, half_minus_one)[0] == "length"
    # Chinese: a CJK character is a token
    assert check_length("这是一个很长的中文回答内容", "中文") == "the rewrite has 2 tokens, under 0.5 of the original's 13"


def test_a_rewrite_that_leaks_revised_response_fails_on_scaffolding() -> None:
    original = "The Eiffel Tower is 330 metres tall."
    leaked = "Reasoning: the answer should be short.\nRevised response: The Eiffel Tower is 330 metres tall."
    assert check_scaffolding(original, leaked) == "the rewrite holds prompt scaffolding 'revised response:'"
    assert run_checks(original, leaked) == ("scaffolding", "the rewrite holds prompt scaffolding 'revised response:'")
    assert check_scaffolding(original, "修改后的回答：埃菲尔铁塔高330米。") is not None  # full-width colon too
    assert check_scaffolding(original, "Here is the rewritten response: it is 330 m tall.") is not None
    assert check_scaffolding(original, "[Format start] it is 330 m") is not None
    # our own template markers, given by the step
    assert check_scaffolding(original, "### Response to rewrite\nIt is 330 m.", markers=["### Response to rewrite"])
    # a label the original had already is no leak
    assert check_scaffolding("Reasoning: tall things are tall.", "Reasoning: tall things are tall, indeed.") is None


@pytest.mark.parametrize(
    ("original", "kept", "lost"),
    [
        ("(B) Paris, because it is the capital.", "The correct option is (B): Paris is the capital.",
         "Paris is the capital, so option C."),
        ("B. 1914", "Answer: B. The war began in 1914.", "The war began in 1914; see option A."),
        ("The answer is C.", "After weighing them all, the answer is C.", "The answer is D."),
        ("True. Water boils at 100 degrees Celsius at sea level.", "This statement is true: at sea level water "
         "boils at 100 °C.", "This is false: water boils at 100 degrees Celsius at sea level."),
        ("No, the moon does not make its own light.", "No. The moon reflects sunlight; it has no light of its own.",
         "Yes, in a sense the moon shines at night."),
        ("是的，地球绕太阳转。", "是的。地球围绕太阳公转。", "不对，地球不绕太阳转。"),
        ("否。鲸鱼不是鱼。", "不是，鲸鱼是哺乳动物。", "是的，鲸鱼是鱼。"),
        ("The population was about 1,200 people in 1850.", "In 1850 roughly 1200 people lived there.",
         "Roughly a thousand people lived there back then."),
        ("So the probability is \\boxed{0.50}.", "The probability is 0.5.", "The probability is one half."),
        ("答案是：42", "经过计算，答案为42。", "答案是43。"),
    ],
)  # fmt: skip
def test_final_answers_of_each_kind(original: str, kept: str, lost: str) -> None:
    assert check_answer(original, kept) is None, final_answer(original)
    why = check_answer(original, lost)
    assert why is not None and why.startswith("the original's final answer")


def test_list_numbers_are_not_the_final_answer() -> None:
    original = "Three tips:\n1. Sleep 8 hours.\n2. Drink water.\n3. Walk daily."
    assert final_answer(original).shown == "8"
    assert final_answer("It depends on the weather and your plans.") is None
    assert check_answer("It depends.", "Anything at all.") is None


def test_run_checks_in_order_and_by_name() -> None:
    original = "The answer is 7."
    assert run_checks(original, "Reasoning: hmm") == ("answer", "the original's final answer '7' (after 'the answer is') "
                                                     "is not in the rewrite")  # fmt: skip
    assert run_checks(original, "Reasoning: hmm", checks=("scaffolding",))[0] == "scaffolding"
    assert CHECKS == ("length", "code", "answer", "scaffolding")
    with pytest.raises(ValueError, match="unknown check 'tone'; valid"):
        run_checks(original, original, checks=("tone",))

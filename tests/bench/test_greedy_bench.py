"""The greedy-agreement definitions of bench/greedy_bench.py on hand-made continuations (the
measurement itself runs in tests/compiler/test_optimum_dirs.py)."""

import pytest

from lowbit.bench.greedy_bench import FLOORS, NEW_TOKENS, PROMPTS, agreement


def test_token_and_prefix_agreement():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = [[1, 2, 9, 4], [0, 6, 7, 8]]  # diverges at 2 (re-aligns at 3); diverges at 0
    a = agreement(ref, got)
    assert a.token == pytest.approx(6 / 8)  # every position counts, also after a divergence
    assert a.prefix == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert a.per_prompt == ((3, 2), (3, 0))
    assert agreement(ref, ref).token == agreement(ref, ref).prefix == 1.0


def test_unequal_lengths_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        agreement([[1, 2]], [[1]])
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])


def test_fixed_protocol():
    assert len(PROMPTS) == 5 and NEW_TOKENS == 20
    assert 0 < FLOORS["token"] < FLOORS["teacher_forced"] < 1

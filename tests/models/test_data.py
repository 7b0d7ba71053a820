"""The pydoc calibration/evaluation split and the token windows."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.models import data


class CharTokenizer:
    """Stand-in tokenizer: one token per character (its code point)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False  # windows must not contain BOS/EOS markers
        return {"input_ids": [ord(c) for c in text]}


def test_split_is_disjoint_complete_and_alternating():
    from pydoc_data.topics import topics

    calib, evaluation = data.split_topics()
    keys = sorted(topics)
    assert set(calib).isdisjoint(evaluation)
    assert sorted(calib + evaluation) == keys
    assert calib == keys[0::2] and evaluation == keys[1::2]
    assert (len(calib), len(evaluation)) == ((len(keys) + 1) // 2, len(keys) // 2)


def test_split_text_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    a, b = data.split_text("calibration"), data.split_text("evaluation")
    assert a == data.split_text("calibration") and b == data.split_text("evaluation")
    calib, evaluation = data.split_topics()
    assert a.startswith(topics[calib[0]]) and b.startswith(topics[evaluation[0]])
    # every topic's text sits in exactly its own split
    for key in evaluation[:10]:
        assert topics[key] in b
    # the two texts are exactly all topics, each once, joined by blank lines
    assert len(a) + len(b) == sum(map(len, topics.values())) + 2 * (len(calib) - 1 + len(evaluation) - 1)


def test_windows_are_consecutive_and_non_overlapping():
    tok = CharTokenizer()
    text = data.split_text("evaluation")
    w = data.evaluation_windows(tok, 64, 5)
    assert w.shape == (5, 64) and w.dtype == np.int64
    assert np.array_equal(w.reshape(-1), np.array([ord(c) for c in text[: 5 * 64]]))
    everything = data.token_windows(tok, text, 1000, None)
    assert everything.shape == (len(text) // 1000, 1000)


def test_user_text_file(tmp_path):
    f = tmp_path / "my.txt"
    f.write_text("abcdefghij" * 3, encoding="utf-8")
    w = data.calibration_windows(CharTokenizer(), 10, None, text_file=f)
    assert w.shape == (3, 10)
    assert "".join(map(chr, w[1])) == "abcdefghij"
    assert data.text_samples("evaluation", 1, min_chars=5, text_file=f) == ["abcdefghij" * 3]


@pytest.mark.parametrize(
    "content, message",
    [("", "empty"), ("short text", "windows of 10, 5 needed")],
)
def test_bad_text_raises(tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(LowbitError, match=message):
        data.evaluation_windows(CharTokenizer(), 10, 5, text_file=f)


def test_missing_text_file_raises(tmp_path):
    with pytest.raises(LowbitError, match="no such text file"):
        data.calibration_windows(CharTokenizer(), 8, 1, text_file=tmp_path / "nope.txt")


def test_text_samples_are_paragraphs_in_order():
    samples = data.text_samples("evaluation", 20)
    assert len(samples) == 20 and len(set(samples)) == 20
    assert all(40 <= len(s) <= 400 and "\n" not in s for s in samples)
    assert set(samples).isdisjoint(data.text_samples("calibration", 200))


@pytest.mark.slow
def test_smollm2_split_token_counts(smollm2_tokenizer):
    # Measured with the SmolLM2 tokenizer (matches FACTS.md: 61,785 / 51,322 tokens).
    def count(split):
        return len(smollm2_tokenizer(data.split_text(split), add_special_tokens=False)["input_ids"])

    assert (count("calibration"), count("evaluation")) == (61785, 51322)
    calib = data.calibration_windows(smollm2_tokenizer, 512, None)
    evaluation = data.evaluation_windows(smollm2_tokenizer, 512, None)
    assert calib.shape == (61785 // 512, 512) and evaluation.shape == (51322 // 512, 512)

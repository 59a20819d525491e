"""Tokenizer training (`gmlp.train.tokenizer`): normalisation as documented, the vocabulary size, the corpus
argument. Its use by the text pipelines is tested in test_text_pipelines.py."""

from __future__ import annotations

import warnings

import pytest

_TEXTS = ["Café au lait, naïve résumé. The quick brown fox jumps over the lazy dog."] * 20
_TEXTS += ["École élève"] * 10


def test_unigram_lowercase_strips_accents_as_documented() -> None:
    from gmlp.train.tokenizer import train_tokenizer

    tok = train_tokenizer(_TEXTS, kind="unigram", vocab_size=60)
    assert tok.backend_tokenizer.normalizer.normalize_str("Café ÉCOLE 한국어") == "cafe ecole 한국어"
    cased = train_tokenizer(_TEXTS, kind="unigram", vocab_size=60, lowercase=False)
    assert cased.backend_tokenizer.normalizer.normalize_str("Café") == "Café"


def test_vocabulary_too_small_for_the_alphabet() -> None:
    from gmlp.train.tokenizer import train_tokenizer

    texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"] * 5
    with pytest.raises(ValueError, match="vocab_size=20 is too small"):
        train_tokenizer(texts, kind="unigram", vocab_size=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_tokenizer(texts, kind="wordpiece", vocab_size=20, min_frequency=1)
    assert len(tok) > 20
    assert any("more than vocab_size=20" in str(w.message) for w in caught)


def test_single_string_corpus_is_refused() -> None:
    from gmlp.train.tokenizer import train_tokenizer

    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("the whale and the ship " * 10, vocab_size=50)

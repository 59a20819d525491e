"""Tokenizer training (`gmlp.train.tokenizer`): normalisation as documented, the vocabulary size, the corpus
argument. Its use by the text pipelines is tested in test_text_pipelines.py."""

from __future__ import annotations

import warnings
from pathlib import Path

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


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_a_corpus_of_blank_texts_is_refused(kind: str) -> None:
    """Blank texts only (empty lines of a text file, say) trained a tokenizer of the special tokens alone,
    silently; an empty corpus is refused, and so is this one."""
    from gmlp.train.tokenizer import train_tokenizer

    for corpus in ([], ["", "   ", "\n", "\t"]):
        with pytest.raises(ValueError, match="empty corpus"):
            train_tokenizer(corpus, kind=kind, vocab_size=50)


_TIED = [f"{text} {i}" for i in range(40) for text in (
    "Café au lait, naïve résumé.", "The quick brown fox 🦊 jumps over the lazy dog.",
    "東京は日本の首都です。", "the whale and the ship sailed on the sea", "a b c abc abcd")]


def test_unigram_ids_do_not_depend_on_hash_order() -> None:
    """The Unigram trainer breaks score ties (and the last-digit noise of its sums) in hash-map order, which
    changes from run to run: trainings on this corpus gave the same pieces under other ids each time."""
    from gmlp.train.tokenizer import SPECIAL_TOKENS, train_tokenizer

    vocabs = [train_tokenizer(_TIED, kind="unigram", vocab_size=120).get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert [vocabs[0][t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_saved_tokenizer_loads_back_with_the_same_encodings(kind: str, tmp_path: Path) -> None:
    """What ``gmlp tokenizer`` saves loads back, through transformers and through the loader of the text
    commands, with the same special ids and the same encodings of single texts and pairs (unicode too)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from gmlp.train.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(_TIED, kind=kind, vocab_size=120, min_frequency=1, model_max_length=64)
    tok.save_pretrained(str(tmp_path))
    texts = ["Café 東京 🦊 the fox", "", "zz unseen ÿ ☃"]
    for loaded in (PreTrainedTokenizerFast.from_pretrained(str(tmp_path)),
                   AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        assert loaded.model_max_length == 64
        assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id, loaded.sep_token_id,
                loaded.mask_token_id] == [0, 1, 2, 3, 4]
        assert loaded(texts, texts[::-1]).data == tok(texts, texts[::-1]).data
        pair = loaded("the fox", "the dog")
        assert pair["input_ids"][0] == 2 and pair["input_ids"][-1] == 3
        assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0


def test_an_output_that_is_a_file_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gmlp tokenizer -o FILE`` trained on the whole corpus, then failed (a FileExistsError traceback)."""
    from gmlp.data import text
    from gmlp.train.recipe import ConfigError
    from gmlp.train.tokenizer import train_tokenizer_command

    monkeypatch.setattr(text, "load_text_splits", lambda *a, **k: pytest.fail("read the corpus"))
    (tmp_path / "tok").write_text("")
    with pytest.raises(ConfigError, match=r"--output '.*tok' is a file; give a folder"):
        train_tokenizer_command(tmp_path / "tok", corpus=["offline"], vocab_size=50)


def test_a_too_small_unigram_vocabulary_is_a_usage_error_of_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gmlp tokenizer --kind unigram --vocab-size 20`` printed a traceback (exit status 1); now one
    ``gmlp tokenizer: error:`` line naming --vocab-size, exit status 2."""
    from gmlp.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4"] * 5))
    argv = ["tokenizer", "--kind", "unigram", "--vocab-size", "20", "--corpus", str(corpus),
            "--valid-fraction", "0", "-o", str(tmp_path / "tok")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gmlp tokenizer: error: vocab_size=20 is too small"), err
    assert "--vocab-size" in err[-1]
    assert not any("Traceback" in line for line in err)

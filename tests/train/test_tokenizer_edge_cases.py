"""Edge cases of the trained tokenizers (`gmlp.train.tokenizer`, `gmlp tokenizer`): what a user loading the
saved folder with ``AutoTokenizer`` gets for unusual text (decomposed accents, whitespace runs, control
characters, ``[MASK]`` in the text, empty text), saving over an older tokenizer, very long runs without a
space in the corpus, and the command's report of the size it trained."""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_WORDS = ["café", "résumé", "naïve", "École", "élève", "the", "whale", "ship", "東京", "日本", "🦊", "fox",
          "Ωmega", "straße", "x"]
_CORPUS = [" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(9)) + f"\n{i}\tend" for i in range(60)]
_CONFIGS = [("wordpiece", True), ("wordpiece", False), ("unigram", True), ("unigram", False)]
_TOKS: dict[tuple[str, bool], Any] = {}


def _tok(kind: str, lowercase: bool) -> Any:
    from gmlp.train.tokenizer import train_tokenizer

    if (kind, lowercase) not in _TOKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _TOKS[kind, lowercase] = train_tokenizer(
                _CORPUS, kind=kind, vocab_size=120, lowercase=lowercase, min_frequency=1, model_max_length=32
            )
    return _TOKS[kind, lowercase]


_word = st.sampled_from(_WORDS)
_space = st.sampled_from([" ", "  ", "\t", "\n", "\n\n", "\r\n", " \t\n ", "\u3000"])


@pytest.mark.parametrize(("kind", "lowercase"), _CONFIGS)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(words=st.lists(_word, min_size=1, max_size=6))
def test_decomposed_accents_get_the_ids_of_the_composed_form(
    kind: str, lowercase: bool, words: list[str]
) -> None:
    """A cased WordPiece tokenizer gave "résumé" written decomposed ("e" + U+0301, as macOS file names and
    some corpora have it) [UNK] for the whole word: it had no NFC step. Every kind now encodes NFC and NFD
    alike."""
    tok = _tok(kind, lowercase)
    text = " ".join(words)
    assert tok(unicodedata.normalize("NFD", text))["input_ids"] == tok(unicodedata.normalize("NFC", text))[
        "input_ids"
    ]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(words=st.lists(_word, min_size=1, max_size=6), spaces=st.lists(_space, min_size=7, max_size=7),
       junk=st.sampled_from(["", "\x00", "\x07", "\u200b", "\ufeff", "\x7f"]))
def test_unigram_whitespace_runs_are_one_space_and_controls_are_dropped(
    words: list[str], spaces: list[str], junk: str
) -> None:
    """SentencePiece-style as documented: a newline, a tab or a run of spaces is one word boundary, control
    and format characters are dropped (as BERT's normaliser does for WordPiece). Before, "a\\nb" glued the
    newline into pieces ("and\\n") with no "▁" start for the next word, "a   b" gave lone "▁" tokens and a
    NUL or a zero-width space was [UNK]."""
    for lowercase in (True, False):
        tok = _tok("unigram", lowercase)
        seps = spaces[1 : len(words) + 1]
        messy = spaces[0] + "".join(w[:1] + junk + w[1:] + s for w, s in zip(words, seps, strict=True))
        assert tok(messy)["input_ids"] == tok(" ".join(words))["input_ids"], repr(messy)
    assert not [piece for piece in tok.get_vocab() if re.search(r"\s", piece)]


@pytest.mark.parametrize(("kind", "lowercase"), _CONFIGS)
def test_saved_tokenizer_loads_back_with_the_same_ids_for_unusual_text(
    kind: str, lowercase: bool, tmp_path: Path
) -> None:
    """``AutoTokenizer.from_pretrained(folder)`` of what ``save_tokenizer`` wrote encodes as the trained
    object does; ``[MASK]`` written in a text is the one mask token (as BERT's); blank text is ``[CLS]
    [SEP]``; pairs get token types 0/1, padding on the right with [PAD] = 0 and truncation to
    ``model_max_length``."""
    from transformers import AutoTokenizer

    from gmlp.train.tokenizer import save_tokenizer

    tok = _tok(kind, lowercase)
    save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    texts = ["Café 東京 🦊 ÿ ☃ " + "z" * 150, "a\x00b\x1b\u200bc", "", "  \t\n ", "the [MASK] fox",
             unicodedata.normalize("NFD", "Élève résumé"), "ﬁ Ⅻ ①", "fox " * 40]
    assert loaded(texts, texts[::-1]).data == tok(texts, texts[::-1]).data
    for t in ("", "  \t\n "):
        assert loaded(t)["input_ids"] == [2, 3]
    ids = loaded("the [MASK] fox")["input_ids"]
    assert ids.count(4) == 1 and ids[0] == 2 and ids[-1] == 3
    assert loaded.decode(loaded("the whale ship")["input_ids"], skip_special_tokens=True).lower() == (
        "the whale ship"
    )
    batch = loaded(["fox " * 40, "fox"], ["the whale", "ship"], truncation=True, padding=True)
    assert [len(row) for row in batch["input_ids"]] == [32, 32]
    short = batch["input_ids"][1]
    n = sum(batch["attention_mask"][1])
    assert short[n:] == [0] * (32 - n) and short[n - 1] == 3
    assert batch["attention_mask"][1][n:] == [0] * (32 - n)
    types = batch["token_type_ids"][1][:n]
    assert types == sorted(types) and types[0] == 0 and types[-1] == 1


@pytest.mark.parametrize("foreign", [False, True])
def test_saving_over_an_older_tokenizer_drops_its_stale_files(foreign: bool, tmp_path: Path) -> None:
    """An output folder holding an older tokenizer (transformers 4 also wrote special_tokens_map.json; another
    tokenizer may have an added_tokens.json, a vocab.txt) kept those files, and transformers read them with
    the new one: [PAD] loaded as id 1, [MASK] as [SEP], an extra token appeared. A folder holding other files
    too (``foreign``) keeps those."""
    from transformers import AutoTokenizer

    from gmlp.train.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer

    tok = _tok("wordpiece", True)
    out = tmp_path / "tok"
    out.mkdir()
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[UNK]", "mask_token": "[SEP]"}))
    (out / "added_tokens.json").write_text(json.dumps({"<extra>": 999}))
    (out / "vocab.txt").write_text("a\nb\n")
    if foreign:
        (out / "notes.txt").write_text("mine")
    save_tokenizer(tok, out)
    fresh = tmp_path / "fresh"
    tok.save_pretrained(str(fresh))  # (what this transformers writes: 4.x adds special_tokens_map.json)
    expected = {p.name for p in fresh.iterdir()} | ({"notes.txt"} if foreign else set())
    assert {p.name for p in out.iterdir()} == expected
    for loaded in (AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)):
        assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
        assert [loaded.pad_token_id, loaded.mask_token_id] == [0, 4]
        assert len(loaded) == len(tok)
        assert loaded("the <extra> fox")["input_ids"] == tok("the <extra> fox")["input_ids"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(parts=st.lists(st.one_of(st.sampled_from([" ", "\n", "\t ", "ab", "東"]),
                                st.integers(1, 9000).map(lambda n: "x" * n)), max_size=5))
def test_long_runs_without_a_space_are_cut_for_training_only(parts: list[str]) -> None:
    """A corpus text with a very long run of non-space characters (text without spaces, base64): the Unigram
    trainer ran for minutes and, at 2M characters, crashed the process (a segmentation fault); the trainers
    now see it cut into runs of at most ``_MAX_TRAINING_RUN``, and nothing else of the text changes."""
    from gmlp.train.tokenizer import _MAX_TRAINING_RUN, _cut_long_runs

    text = "".join(parts)
    cut = _cut_long_runs(text)
    n = _MAX_TRAINING_RUN
    assert max(map(len, cut.split()), default=0) <= n
    assert cut.split() == [w[i : i + n] for w in text.split() for i in range(0, len(w), n)]
    assert len(cut) - len(text) == sum((len(w) - 1) // n for w in text.split())  # only the cuts' spaces
    assert cut.replace(" ", "") == text.replace(" ", "")
    if "x" * (n + 1) not in text:
        assert cut == text


def test_a_long_run_yields_no_piece_longer_than_the_cut() -> None:
    """The trainers see the cut runs: WordPiece learned the whole 5000-character run as one piece before (a
    dead piece: words over 100 characters encode as [UNK])."""
    from gmlp.train.tokenizer import _MAX_TRAINING_RUN, train_tokenizer

    tok = train_tokenizer(["a" * 5000 + " b c"], kind="wordpiece", vocab_size=60, min_frequency=1)
    assert max(len(piece.removeprefix("##")) for piece in tok.get_vocab()) <= _MAX_TRAINING_RUN


def test_the_command_says_when_the_corpus_fills_fewer_tokens_than_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--vocab-size 1000`` on a tiny corpus saved 23 tokens and said only the count; a model built on the
    tokenizer gets its size, so the command now says it is fewer than asked."""
    from gmlp.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n\nsecond doc here\n")
    argv = ["tokenizer", "--corpus", str(corpus), "--valid-fraction", "0", "--vocab-size", "1000",
            "-o", str(tmp_path / "tok")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"saved a wordpiece tokenizer with \d+ tokens \(fewer than --vocab-size 1000", out), out


_NOT_INTS = [("vocab_size", "100"), ("vocab_size", 100.0), ("vocab_size", True), ("min_frequency", 1.5),
             ("model_max_length", 64.0), ("model_max_length", None)]


@pytest.mark.parametrize(("name", "value"), _NOT_INTS)
def test_a_count_that_is_not_an_int_is_a_type_error_naming_it(name: str, value: object) -> None:
    """``vocab_size="100"`` failed comparing a str to an int, ``100.0`` in the trainer ("'float' object cannot
    be interpreted as an integer"), neither naming the argument; ``model_max_length=64.0`` was saved."""
    from gmlp.train.tokenizer import train_tokenizer

    with pytest.raises(TypeError, match=rf"^{name} must be an int, got {re.escape(repr(value))}"):
        train_tokenizer(["the whale and the ship"] * 5, **{name: value})  # type: ignore[arg-type]


def test_numpy_counts_are_accepted() -> None:
    import numpy as np

    from gmlp.train.tokenizer import train_tokenizer

    texts = ["the whale and the ship"] * 5
    tok = train_tokenizer(texts, vocab_size=np.int64(40), model_max_length=np.int32(16))
    assert tok.model_max_length == 16 and type(tok.model_max_length) is int

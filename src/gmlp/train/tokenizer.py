"""Train a WordPiece or Unigram tokenizer (HF ``tokenizers``) and save it as a ``PreTrainedTokenizerFast``.

The special tokens are ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4 (the ids
:class:`gmlp.models.text.GMLPConfig` assumes by default), and the post-processor is BERT's:
``[CLS] A [SEP]`` for one text and ``[CLS] A [SEP] B [SEP]`` with token types 0/1 for pairs.
"""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .recipe import ConfigError

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "check_corpus_options",
    "load_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
    "train_tokenizer_command",
]

#: Special tokens in id order.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_KINDS: tuple[str, ...] = ("wordpiece", "unigram")

#: Control and format characters a Unigram tokenizer drops (BERT's normaliser drops them for WordPiece), but
#: not whitespace nor the zero-width (non-)joiners U+200C/U+200D of emoji sequences and Persian/Indic text.
_CONTROL = r"[\p{Cc}\p{Cf}&&[^\s\x{200C}\x{200D}]]"
#: The longest run of non-space characters the trainers see: longer ones (text without spaces, base64, a
#: minified line) are cut into runs of this length for training only (the Unigram trainer crashed the process
#: with a segmentation fault on a 2M-character run, WordPiece's took minutes; SentencePiece skips sentences
#: over 4192 bytes). Encoding is not affected.
_MAX_TRAINING_RUN = 4096
_LONG_RUN = re.compile(rf"\S{{{_MAX_TRAINING_RUN + 1},}}")


def _cut_long_runs(text: str) -> str:
    """``text`` with every run of more than :data:`_MAX_TRAINING_RUN` non-space characters cut by spaces."""
    if not isinstance(text, str) or len(text) <= _MAX_TRAINING_RUN:
        return text
    n = _MAX_TRAINING_RUN
    return _LONG_RUN.sub(lambda m: " ".join(m[0][i : i + n] for i in range(0, len(m[0]), n)), text)


def check_corpus_options(*, valid_fraction: float, max_documents: int | None, max_chars: int | None) -> None:
    """Raise :class:`~gmlp.train.recipe.ConfigError` naming the flag (``--valid-fraction``,
    ``--max-documents``, ``--max-chars``) of the first bad corpus option (shared by ``gmlp tokenizer``
    and ``gmlp pretrain``)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    for flag, value in (("--max-documents", max_documents), ("--max-chars", max_chars)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (leave it out for no limit), got {value}")


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


#: Decimals a trained Unigram score keeps. The trainer sums its EM statistics in hash-map and thread order, so
#: the same corpus gives scores that differ in their last digits from run to run (up to 4e-11 seen): rounded,
#: they are the same unless one falls within that noise of a rounding boundary (about 1 training in 1,000 on
#: 1.5 M characters and 4,000 pieces). A score kept to 1e-5 changes no segmentation but near-exact ties.
_UNIGRAM_SCORE_DECIMALS = 5
#: The step between the scores the Unigram trainer gives the characters it appends to the vocabulary (those
#: its EM dropped): the lowest score, plus 0.0001 for each one before, in hash-map order.
_UNIGRAM_PENALTY_STEP = 1e-4

#: Python's ``str.split()`` splits at these characters, which BERT's normaliser deletes instead (controls).
_BERT_DELETED_SPACES = str.maketrans(dict.fromkeys("\x0b\x0c\x1c\x1d\x1e\x1f\x85"))


def _canonical_unigram(tok: Any) -> Any:
    """The trained Unigram model in a canonical form: scores rounded to :data:`_UNIGRAM_SCORE_DECIMALS`,
    pieces in id order by score, ties by the piece itself, after the special tokens, and the characters the
    trainer appends with penalty scores given those scores in the characters' order. The trainer orders pieces
    by score, but breaks ties, sums its EM statistics and hands out the penalty scores in hash-map and thread
    order, which change between runs: the same corpus gave the same pieces under other ids and scores that
    differed in their last digits (another ``tokenizer.json``, so another token-cache key)."""
    import json

    from tokenizers import models

    model = json.loads(tok.to_str())["model"]
    vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    n = len(SPECIAL_TOKENS)
    rest = vocab[n:]
    if rest:  # the appended characters: one character each, scores lowest + k * 0.0001 for k = 0, 1, ...
        lowest = min(score for _, score in rest)
        steps = {i: (score - lowest) / _UNIGRAM_PENALTY_STEP for i, (piece, score) in enumerate(rest)
                 if len(piece) == 1}
        steps = {i: round(k) for i, k in steps.items() if abs(k - round(k)) < 1e-6}
        by_step = sorted(steps, key=steps.__getitem__)
        if [steps[i] for i in by_step] == list(range(len(by_step))) and len(by_step) > 1:
            scores = [rest[i][1] for i in by_step]  # the lowest first, given to the characters in their order
            for i, score in zip(sorted(by_step, key=lambda i: rest[i][0]), scores, strict=True):
                rest[i] = (rest[i][0], score)
    rest = [(piece, round(score, _UNIGRAM_SCORE_DECIMALS) + 0.0) for piece, score in rest]
    rest.sort(key=lambda entry: (-entry[1], entry[0]))
    return models.Unigram(vocab[:n] + rest, model["unk_id"], model.get("byte_fallback", False))


def _wordpiece_continuations(texts: Sequence[str], tok: Any) -> list[str]:
    """The continuation pieces (``##`` + one character) the WordPiece trainer makes of ``texts``, sorted.

    The trainer numbers them in hash-map order, which changes between runs, and breaks ties between merges of
    equal count by those numbers: the same corpus gave other pieces. Given as special tokens, they are
    numbered in the given order instead. Found by the trainer itself (so by its rules) on the distinct
    whitespace-separated chunks of ``texts``, which a BERT normaliser and pre-tokeniser treat as they treat
    them in their text: about a fifth of the time of the training."""
    from tokenizers import Tokenizer, models, trainers

    chunks: set[str] = set()
    for text in texts:
        if isinstance(text, str):
            chunks.update(text.translate(_BERT_DELETED_SPACES).split())
    probe = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    probe.normalizer, probe.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=1, min_frequency=0, show_progress=False)
    probe.train_from_iterator(_batches(list(chunks)), trainer=trainer)  # (any order: a set)
    return sorted(t for t in probe.get_vocab() if t.startswith("##") and len(t) == 3)


def _canonical_wordpiece(tok: Any, continuations: Sequence[str]) -> Any:
    """``tok`` trained with :data:`SPECIAL_TOKENS` + ``continuations`` as its special tokens, as if it had
    been trained with :data:`SPECIAL_TOKENS` alone: the continuations are ordinary pieces again (after the
    single characters, as the trainer places them) and not added tokens."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tok.to_str())
    vocab = sorted(state["model"]["vocab"], key=state["model"]["vocab"].__getitem__)
    n, k = len(SPECIAL_TOKENS), len(continuations)
    if vocab[n : n + k] != list(continuations):
        raise RuntimeError("the WordPiece trainer did not number its continuation pieces as given")
    rest = vocab[n + k :]
    chars = [t for t in rest if len(t) == 1]  # (the trainer's alphabet, first; merged pieces are longer)
    order = vocab[:n] + chars + list(continuations) + [t for t in rest if len(t) != 1]
    state["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    state["added_tokens"] = [a for a in state["added_tokens"] if a["content"] in SPECIAL_TOKENS]
    return Tokenizer.from_str(json.dumps(state, ensure_ascii=False))


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: str = "wordpiece",
    vocab_size: int = 8192,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 512,
    length: int | None = None,
    show_progress: bool = False,
) -> Any:
    """Train a tokenizer on ``texts`` and wrap it in a ``transformers.PreTrainedTokenizerFast``.

    Args:
        texts: training texts (any iterable; consumed once).
        kind: ``"wordpiece"`` (BERT normaliser and pre-tokeniser, ``##`` continuation pieces; NFC first when
            cased) or ``"unigram"`` (SentencePiece-style, ``▁`` word starts, as the paper's 32K vocabulary:
            NFKC, control and format characters dropped, each whitespace run one space, none at the ends).
            Runs of more than 4096 characters without a space are cut for training only.
        vocab_size: target vocabulary size, special tokens included (a small corpus may give fewer; a
            WordPiece vocabulary keeps every character of the corpus, so one with more distinct characters
            gives more, with a warning).
        lowercase: lowercase (and strip accents) before tokenising.
        min_frequency: WordPiece: the least frequency of a merged piece.
        model_max_length: recorded in the tokenizer (the model's ``max_position_embeddings``).
        length: number of texts, for the progress bar only.
        show_progress: show the trainer's progress bar.

    Raises:
        TypeError: ``texts`` is a single string (it would be read one character per text), or
            ``vocab_size``, ``min_frequency`` or ``model_max_length`` is not an int.
        ValueError: unknown ``kind``, a vocabulary smaller than the special tokens (or, for Unigram, than
            the corpus's distinct characters), a negative ``min_frequency``, a ``model_max_length`` below 1,
            or an empty corpus.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of texts (e.g. a list of str), not a single string")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")
    for name, value in (("vocab_size", vocab_size), ("min_frequency", min_frequency),
                        ("model_max_length", model_max_length)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # ("8192" compared to an int,
            # 8192.0 failed in the trainer, neither naming the argument; 512.0 was saved as a float)
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    vocab_size, min_frequency, model_max_length = int(vocab_size), int(min_frequency), int(model_max_length)
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    specials = list(SPECIAL_TOKENS)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        bert = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=lowercase)
        # cased: NFC first, so decomposed input ("e" + U+0301, as macOS file names and some corpora write
        # "é") gets the ids of the composed form, not [UNK] (lowercasing decomposes and drops the marks)
        tok.normalizer = bert if lowercase else normalizers.Sequence([normalizers.NFC(), bert])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        texts = [_cut_long_runs(text) for text in texts]  # (read twice)
        continuations = _wordpiece_continuations(texts, tok)
        trainer: Any = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials + continuations,  # (numbered in this order: see _wordpiece_continuations)
            show_progress=show_progress,
        )
    else:
        tok = Tokenizer(models.Unigram())
        # lowercase also strips accents, as BERT's normaliser does for WordPiece (NFD, drop the marks, NFC)
        strip = [normalizers.Lowercase(), normalizers.NFD(), normalizers.StripAccents(), normalizers.NFC()]
        # as SentencePiece's nmt_nfkc with remove_extra_whitespaces: control and format characters dropped
        # (zero-width joiners kept: emoji sequences, Persian), each whitespace run (newlines, tabs) one space,
        # none at either end (newlines were glued into pieces, "and\n", and space runs gave lone "▁" tokens)
        clean = [
            normalizers.Replace(Regex(_CONTROL), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
        steps = [normalizers.NFKC(), *clean] + (strip if lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="[UNK]", show_progress=show_progress
        )
    seen = 0  # texts that are not blank

    def counted() -> Iterator[list[str]]:
        nonlocal seen
        for batch in _batches(texts):
            seen += sum(1 for text in batch if not isinstance(text, str) or text.strip())
            yield [_cut_long_runs(text) for text in batch]

    try:
        tok.train_from_iterator(counted(), trainer=trainer, length=length)
    except Exception as err:  # tokenizers raises a bare Exception
        if "not large enough to contain all chars" not in str(err):
            raise
        raise ConfigError(  # (a ValueError: a usage error of the commands, naming --vocab-size)
            f"vocab_size={vocab_size} is too small for this corpus: a Unigram vocabulary must hold every "
            f"distinct character of the corpus besides the {len(specials)} special tokens; raise vocab_size "
            f"(--vocab-size)"
        ) from err
    if seen == 0:
        raise ConfigError("cannot train a tokenizer on an empty corpus (it holds no text that is not blank)")
    if kind == "unigram":
        tok.model = _canonical_unigram(tok)
    else:
        tok = _canonical_wordpiece(tok, continuations)
    if tok.get_vocab_size() > vocab_size:
        warnings.warn(
            f"the {kind} vocabulary has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}: it "
            f"keeps every distinct character of the corpus; raise vocab_size for any merged pieces",
            stacklevel=2,
        )
    ids = {t: tok.token_to_id(t) for t in specials}
    if [ids[t] for t in specials] != list(range(len(specials))):
        raise RuntimeError(f"special tokens got unexpected ids: {ids}")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer saved with ``save_pretrained`` (a local folder; nothing is downloaded). Custom code a
    folder names (``auto_map`` in its ``tokenizer_config.json``) is never run: the standard files load.

    Raises:
        FileNotFoundError: the folder does not exist or holds no tokenizer.
        ConfigError: the tokenizer does not load (its files are incomplete or corrupt); a ``ValueError``.
        ValueError: the tokenizer lacks one of the special tokens MLM and classification need.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r} (expected tokenizer.json from save_pretrained)"
        )
    try:
        # (a tokenizer_config.json's auto_map names Python files of the folder: never run; the tokenizer
        # loads from its standard files, as a folder without them)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # a truncated tokenizer.json (a JSONDecodeError, or the tokenizers library's
        # bare Exception), a folder with tokenizer_config.json alone (a ValueError), ...; a library bug
        # (AttributeError, TypeError, ...), an OSError or an ImportError keeps its own traceback
        if not isinstance(err, (ValueError, KeyError)) and type(err) is not Exception:
            raise
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"the tokenizer in {str(path)!r} does not load: it is incomplete or corrupt "
            f"({type(err).__name__}: {first_line}); save it again (e.g. with gmlp tokenizer)"
        ) from err
    missing = [
        n for n in ("cls_token", "sep_token", "pad_token", "mask_token") if getattr(tok, n, None) is None
    ]
    if missing:
        raise ValueError(f"tokenizer in {str(path)!r} has no {', '.join(missing)}")
    return tok


def train_tokenizer_command(
    output: str | Path,
    *,
    corpus: Sequence[str] | str | None = None,
    kind: str = "wordpiece",
    vocab_size: int = 8192,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 512,
    valid_fraction: float = 0.01,
    max_documents: int | None = None,
    max_chars: int | None = None,
    text_column: str = "text",
) -> Any:
    """Train a tokenizer on the training split of a corpus and ``save_pretrained`` it to ``output``.

    Only the training split is used, so the held-out perplexity of a model using it stays honest.
    Returns the tokenizer.

    Raises:
        ConfigError: a bad option (a ``ValueError``), named by its ``gmlp tokenizer`` flag, or an ``output``
            that is a file, before any text is read.
    """
    from ..data.text import load_text_splits

    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(
            f"--vocab-size must be > {len(SPECIAL_TOKENS)} (the special tokens {' '.join(SPECIAL_TOKENS)}), "
            f"got {vocab_size}"
        )
    if min_frequency < 0:
        raise ConfigError(f"--min-frequency must be >= 0, got {min_frequency}")
    if kind == "unigram" and min_frequency != 2:  # (the Unigram trainer has none: it was ignored)
        raise ConfigError(f"--min-frequency sets WordPiece's least count of a merged piece and must be left "
                          f"out with --kind unigram, got {min_frequency}")
    if model_max_length < 1:
        raise ConfigError(f"--model-max-length must be >= 1, got {model_max_length}")
    check_corpus_options(valid_fraction=valid_fraction, max_documents=max_documents, max_chars=max_chars)
    if Path(output).exists() and not Path(output).is_dir():
        raise ConfigError(f"--output {str(output)!r} is a file; give a folder to save the tokenizer in")

    splits = load_text_splits(
        corpus,
        valid_fraction=valid_fraction,
        max_documents=max_documents,
        max_chars=max_chars,
        text_column=text_column,
    )
    tok = train_tokenizer(
        splits.train,
        kind=kind,
        vocab_size=vocab_size,
        lowercase=lowercase,
        min_frequency=min_frequency,
        model_max_length=model_max_length,
        length=len(splits.train),
    )
    save_tokenizer(tok, output)
    return tok


#: Files transformers reads as (part of) a tokenizer. Those of an earlier tokenizer in the output folder that
#: a new save does not write are removed: a stale ``special_tokens_map.json`` (transformers 4 wrote one) set
#: the loaded tokenizer's special tokens, a stale ``added_tokens.json`` added tokens.
_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
})


def save_tokenizer(tok: Any, output: str | Path) -> None:
    """``tok.save_pretrained(output)`` such that a process killed at any moment never leaves a partial
    tokenizer in ``output`` that a later ``--tokenizer output`` would load: the files are written to a
    temporary folder beside it, then the folder is renamed into place (an existing ``output`` that holds only
    tokenizer files is swapped whole; one with other files gets each tokenizer file replaced atomically,
    ``tokenizer.json``, which loaders read first, last, and loses the files of an earlier tokenizer that the
    new one does not write, such as ``special_tokens_map.json`` or ``added_tokens.json``, which transformers
    would read with it)."""
    import os

    from ..utils.io import _remove_entry, naming_write_errors, replace_dir

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp"
    _remove_entry(tmp)  # (what a killed run left; a symbolic link itself, not what it points to)
    tmp.mkdir()
    try:
        with naming_write_errors(tmp, output):  # a full disk: the tokenizers library's OSError names no file
            tok.save_pretrained(str(tmp))
            names = {p.name for p in tmp.iterdir()}
            if not output.exists() or {p.name for p in output.iterdir()} <= names | _TOKENIZER_FILES:
                replace_dir(tmp, output)  # none, or a tokenizer (stale files of an older one go with it)
            else:
                for name in sorted(names, key=lambda n: n == "tokenizer.json"):
                    if name == "tokenizer.json":  # (stale files first: they would be read with the new one)
                        for stale in sorted(_TOKENIZER_FILES - names):
                            if (output / stale).is_file() or (output / stale).is_symlink():
                                (output / stale).unlink()
                    os.replace(tmp / name, output / name)
    finally:
        _remove_entry(tmp)

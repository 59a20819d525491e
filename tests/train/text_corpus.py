"""The tiny English corpus the text-pipeline tests train on (imported by those test modules)."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The whale swam past the ship and the sailors watched it go.",
    "Emma walked to the village with her father in the morning.",
    "A spatial gating unit mixes tokens with a learned matrix.",
    "The captain hunted the white whale across the wide ocean.",
    "Her sister wrote long letters about the dance and the weather.",
    "Python functions take arguments and return values to callers.",
]


def documents() -> list[str]:
    """Twelve documents, each all six sentences in a rotated order."""
    return [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES) * 2)]


def write_corpus(path: Path) -> Path:
    """:func:`documents` as a plain-text corpus (blank lines between documents) at ``path``."""
    path.write_text("\n\n".join(documents()))
    return path


def corpus_and_tokenizer(root: Path) -> tuple[Path, Path]:
    """``(corpus, tokenizer folder)`` in ``root``: :func:`write_corpus` and a WordPiece tokenizer of 150 ids
    trained on :func:`documents` (trained once per test; training is reproducible since the twenty-seventh
    session)."""
    from gmlp.train.tokenizer import train_tokenizer

    corpus = write_corpus(root / "corpus.txt")
    tok = root / "tok"
    train_tokenizer(documents(), vocab_size=150, model_max_length=32).save_pretrained(str(tok))
    return corpus, tok

"""Shared by the tests that call ``finetune`` again and again: a tiny tokenizer and a labelled CSV."""

from __future__ import annotations

from pathlib import Path

SENTENCES = ["the whale swam past the ship", "emma walked to the village", "a gating unit mixes tokens",
             "the captain hunted the whale"]


def tiny_classification_files(root: Path) -> tuple[Path, Path]:
    """``(tokenizer folder, CSV)`` under ``root``: an 80-piece WordPiece tokenizer of 16 tokens and 8 labelled
    sentences (labels 0/1)."""
    from gmlp.train.tokenizer import train_tokenizer

    tok = root / "tok"
    train_tokenizer(SENTENCES * 3, vocab_size=80, model_max_length=16).save_pretrained(str(tok))
    data = root / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    return tok, data

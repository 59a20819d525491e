"""A tokenizer trained twice on the same corpus is the same, byte for byte (twenty-seventh session: new).

HF ``tokenizers`` numbers WordPiece's ``##`` continuation pieces in hash-map order and breaks ties between
merges of equal count by those numbers, and the Unigram trainer sums its EM statistics and hands out the
penalty scores of appended characters in hash-map and thread order: two trainings (other processes, other
``RAYON_NUM_THREADS``) gave other ``tokenizer.json`` files (other pieces, other ids, other last digits), so a
``gmlp pretrain`` that trains its own tokenizer never hit the token cache of an earlier run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from text_corpus import SENTENCES, documents, write_corpus

from gmlp.cli import main
from gmlp.train import text as pipelines
from gmlp.train.tokenizer import SPECIAL_TOKENS, _canonical_unigram, train_tokenizer

_TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from text_corpus import documents
from gmlp.train.tokenizer import save_tokenizer, train_tokenizer
docs = documents() + [{extra!r}]
for kind in ("wordpiece", "unigram"):
    tok = train_tokenizer(docs, kind=kind, vocab_size=160, model_max_length=32)
    save_tokenizer(tok, sys.argv[1] + "/" + kind)
"""
#: Words with equal counts (merge ties) and a few characters seen once (Unigram's rare characters).
_EXTRA = "Ålesund ørsted ﬁnal naïve 東京 x² ж-ф ц ш ünïcödé pasta basta casta vasta"


def _files(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_trainings_in_other_processes_and_thread_counts_save_the_same_bytes(tmp_path: Path) -> None:
    script = _TRAIN.format(tests=str(Path(__file__).parent), extra=_EXTRA)
    outs = []
    for seed, threads in (("1", "1"), ("2", "2")):
        out = tmp_path / f"run{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, timeout=120)
        outs.append(_files(out))
    assert {name.split("/")[0] for name in outs[0]} == {"wordpiece", "unigram"}
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], f"{name} differs between the two trainings"


def test_wordpiece_continuation_pieces_are_ordinary_pieces_in_canonical_order() -> None:
    tok = train_tokenizer(documents(), vocab_size=150, model_max_length=32)
    assert set(tok.all_special_tokens) == set(SPECIAL_TOKENS)
    state = json.loads(tok.backend_tokenizer.to_str())
    assert [a["content"] for a in state["added_tokens"]] == list(SPECIAL_TOKENS)
    vocab = sorted(state["model"]["vocab"], key=state["model"]["vocab"].__getitem__)
    assert list(state["model"]["vocab"].values()) == list(range(len(vocab)))
    n = len(SPECIAL_TOKENS)
    chars = [t for t in vocab[n:] if len(t) == 1]
    conts = [t for t in vocab[n:] if t.startswith("##") and len(t) == 3]
    assert vocab[n : n + len(chars)] == chars == sorted(chars)  # the alphabet, by code point
    assert vocab[n + len(chars) : n + len(chars) + len(conts)] == conts == sorted(conts)
    # every character seen inside a word has its continuation piece; none seen only first is invented
    words = {w for s in SENTENCES for w in re.findall(r"\w+", s.lower())}
    assert {c for w in words for c in w[1:]} == {t[2:] for t in conts}
    enc = tok("The whale swam past the ship", add_special_tokens=False)["input_ids"]
    assert 1 not in enc and tok.decode(enc) == "the whale swam past the ship"
    assert tok("whale [MASK]")["input_ids"][-2] == 4  # the special tokens are still special


def _unigram_tok(vocab: list[tuple[str, float]]) -> Any:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.Unigram([(t, 0.0) for t in SPECIAL_TOKENS] + vocab, 1, False))


@pytest.mark.parametrize("seed", range(4))
def test_canonical_unigram_ignores_the_trainers_hash_order_and_last_digits(seed: int) -> None:
    import random

    from tokenizers import Tokenizer

    rng = random.Random(seed)
    pieces = [("▁the", -2.5), ("▁whale", -4.0), ("ale", -4.0), ("a", -3.1), ("b", -6.25), ("th", -5.0)]
    lowest = -9.123456789
    rare = ["ж", "ф", "ц", "ш"]  # appended characters: lowest + k * 0.0001, handed out in hash-map order
    reference = _canonical_unigram(_unigram_tok(
        pieces + [(c, lowest + k * 1e-4) for k, c in enumerate(rare)]
    ))
    shuffled = rare[:]
    rng.shuffle(shuffled)
    noisy = [(p, s + rng.uniform(-4e-11, 4e-11)) for p, s in pieces]
    rng.shuffle(noisy)
    model = _canonical_unigram(_unigram_tok(noisy + [(c, lowest + k * 1e-4) for k, c in enumerate(shuffled)]))
    got = json.loads(Tokenizer(model).to_str())["model"]["vocab"]
    want = json.loads(Tokenizer(reference).to_str())["model"]["vocab"]
    assert got == want
    order = ["▁the", "a", "ale", "▁whale", "th", "b", "ш", "ц", "ф", "ж"]  # ties by the piece (▁ is U+2581)
    assert [p for p, _ in got[len(SPECIAL_TOKENS):]] == order
    assert got[-1] == ["ж", round(lowest, 5)]  # the lowest penalty score to the first character


def test_pretrain_that_trains_its_tokenizer_hits_another_runs_token_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    cache = tmp_path / "cache"
    arch = "gmlp" if pipelines.gmlp_available() else "bert"

    def run(out: Path) -> str:
        args = ["pretrain", "--corpus", str(corpus), "--arch", arch, "--layers", "1", "--hidden", "16",
                "--ffn", "32", "--seq-len", "32", "--no-progress", "--steps", "1", "--log-every", "1",
                "--eval-every", "1", "--eval-batches", "1", "--valid-fraction", "0.2", "--batch-size", "2",
                "--vocab-size", "150", "--token-cache", str(cache), "--output", str(out)]
        assert main(args) == 0
        return capsys.readouterr().err

    assert "token cache built" in run(tmp_path / "a")
    assert "token cache hit" in run(tmp_path / "b")
    assert _files(tmp_path / "a" / "tokenizer") == _files(tmp_path / "b" / "tokenizer")

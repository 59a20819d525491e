"""``gmlp pretrain`` with the token cache, end to end (twenty-sixth session: new).

Every start (``--resume`` too) read, tokenized and packed the whole corpus, in every process. Now the first
start writes the packed blocks to ``OUTPUT/cache`` (or ``--token-cache DIR``), and a later start with the
same inputs reads them back without reading the corpus, and trains to the same metrics and weights as a run
without the cache (``--no-token-cache``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import corpus_and_tokenizer

from gmlp.cli import main
from gmlp.train import text as pipelines

ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
TIMINGS = ("steps_per_s", "tokens_per_s", "seconds", "elapsed_s")


def _args(corpus: Path, tok: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--corpus", str(corpus), "--tokenizer", str(tok), "--arch", ARCH, "--layers", "2",
            "--hidden", "32", "--ffn", "64", "--seq-len", "32", "--no-progress", "--steps", "2",
            "--log-every", "1", "--eval-every", "1", "--eval-batches", "2", "--save-every", "1",
            "--valid-fraction", "0.2", "--batch-size", "4", "--output", str(out), *extra]


def _records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_file(str(r / "final" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_second_start_hits_the_cache_reads_no_corpus_and_trains_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, tok = corpus_and_tokenizer(tmp_path)
    first, plain, other = tmp_path / "first", tmp_path / "plain", tmp_path / "other"

    assert main(_args(corpus, tok, first, "--stop-after-steps", "1")) == 0
    err = capsys.readouterr().err
    built = rf"^\[gmlp\] token cache built in .*: {re.escape(str(first / 'cache'))}/tokens-"
    assert re.search(built, err, re.M), err
    (entry,) = (first / "cache").iterdir()

    def no_corpus(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the corpus was read on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(pipelines, "load_text_splits", no_corpus)
        assert main(_args(corpus, tok, first, "--resume")) == 0  # the default OUTPUT/cache
        hit = rf"^\[gmlp\] token cache hit: {re.escape(str(entry))}$"
        assert re.search(hit, capsys.readouterr().err, re.M)
        assert main(_args(corpus, tok, other, "--token-cache", str(first / "cache"))) == 0  # another run's
        err = capsys.readouterr().err
        assert "token cache hit" in err and re.search(r"documents -> \d+ / [1-9]\d* blocks of 32 tokens", err)
    assert not (other / "cache").exists()

    assert main(_args(corpus, tok, plain, "--no-token-cache")) == 0  # reads and tokenizes, as before
    assert "token cache" not in capsys.readouterr().err and not (plain / "cache").exists()
    for run in (first, other):
        assert _records(run) == _records(plain)
        _same_weights(run, plain)
    assert [r["step"] for r in _records(plain) if r["split"] == "validation"] == [1, 2]
    assert list((first / "cache").iterdir()) == [entry]

    # a changed corpus is another entry (built, not the stale one read); the run's own cache keeps one
    corpus.write_text(corpus.read_text() + "\n\nOne more document about the whale.")
    assert main(_args(corpus, tok, first, "--overwrite")) == 0
    assert "token cache built" in capsys.readouterr().err
    (new_entry,) = (first / "cache").iterdir()
    assert new_entry != entry


def test_token_cache_and_no_token_cache_are_refused_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "--token-cache", str(tmp_path / "c"), "--no-token-cache", "--output",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^gmlp pretrain: error: --token-cache names a cache folder and --no-token-cache .*, "
                     r"got --token-cache .*c$", err, re.M), err
    (tmp_path / "f").write_text("")
    assert main(["pretrain", "--token-cache", str(tmp_path / "f"), "--output", str(tmp_path / "run")]) == 2
    assert "--token-cache must name a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

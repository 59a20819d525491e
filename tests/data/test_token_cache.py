"""The token cache of MLM pretraining (gmlp.data.token_cache; twenty-sixth session: new).

The key changes with every input that decides the packed blocks and with nothing else (not the corpus's
path or modification time); a hit gives the blocks a fresh build gives, as read-only memory maps that the
training loop's batching reads like the in-memory blocks; a corrupt, truncated or half-written entry is
rebuilt with one warning line, never read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forked_pair import run_two_forked
from gmlp.data import text as T
from gmlp.data import token_cache as C
from gmlp.train import text as pipelines
from gmlp.train.tokenizer import train_tokenizer

SENTENCES = [
    "The whale swam past the ship and the sailors watched it go.",
    "Emma walked to the village with her father in the morning.",
    "A spatial gating unit mixes tokens with a learned matrix.",
    "Python functions take arguments and return values to callers.",
]
DOCS = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))] * 3


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """Two tokenizers that differ only in lower-casing (saved and loaded, as a run uses them)."""
    from gmlp.train.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tok")
    out = []
    for lowercase in (True, False):
        train_tokenizer(DOCS, vocab_size=120, model_max_length=16, lowercase=lowercase).save_pretrained(
            str(root / str(lowercase))
        )
        out.append(load_tokenizer(root / str(lowercase)))
    return out[0], out[1]


def _corpus(root: Path) -> Path:
    folder = root / "corpus"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n\n".join(DOCS[:6]))
    (folder / "sub" / "b.md").write_text("\n\n".join(DOCS[6:]))
    return folder


SPECIAL = {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "unk": 1}
BASE = dict(seq_len=16, valid_fraction=0.2, max_documents=None, max_chars=None, text_column="text")


def _key(corpus: Path | str, tokenizer: Any, **changes: Any) -> str:
    opts = {**BASE, "special_ids": SPECIAL, **changes}
    fingerprint = C.corpus_fingerprint([str(corpus)])
    assert fingerprint is not None
    return C.cache_key(corpus=fingerprint, tokenizer=tokenizer, **opts)[0]


def _build(corpus: Path, tokenizer: Any, seq_len: int = 16) -> C.TokenBlocks:
    splits = T.load_text_splits([str(corpus)], valid_fraction=0.2)
    return pipelines._pack_blocks(tokenizer, SPECIAL, seq_len, splits)


# --- the key -------------------------------------------------------------------------------------------


SETTING_CHANGES = [
    {"seq_len": 17},
    {"valid_fraction": 0.3},
    {"max_documents": 5},
    {"max_chars": 100},
    {"text_column": "body"},
    {"special_ids": {**SPECIAL, "cls": 5}},
    {"special_ids": {**SPECIAL, "sep": 5}},
    {"special_ids": {**SPECIAL, "pad": 5}},
]


@pytest.mark.parametrize("change", SETTING_CHANGES, ids=lambda c: ",".join(c))
def test_the_key_changes_with_every_setting(
    tmp_path: Path, tokenizers: tuple[Any, Any], change: dict
) -> None:
    corpus = _corpus(tmp_path)
    assert _key(corpus, tokenizers[0], **change) != _key(corpus, tokenizers[0])


def test_the_key_changes_with_the_tokenizer_and_the_format(
    tmp_path: Path, tokenizers: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = _corpus(tmp_path)
    key = _key(corpus, tokenizers[0])
    assert _key(corpus, tokenizers[1]) != key  # (only the normalizer's lower-casing differs)
    monkeypatch.setattr(C, "FORMAT_VERSION", C.FORMAT_VERSION + 1)
    assert _key(corpus, tokenizers[0]) != key
    monkeypatch.undo()
    monkeypatch.setattr(C, "_code_digest", lambda: "another reader")
    assert _key(corpus, tokenizers[0]) != key


EDITS = ["append", "flip 0", "flip 77", "flip -1", "add file", "rename", "remove file", "hidden file",
         "touch", "move folder"]


@pytest.mark.parametrize("edit", EDITS)
def test_the_key_follows_the_corpus_contents_and_order_only(
    tmp_path_factory: pytest.TempPathFactory, tokenizers: tuple[Any, Any], edit: str
) -> None:
    """Every edit that can change the documents (a byte, a file more or less, the files' order) changes the
    key; what cannot (a hidden file, which is not read; a new mtime; the corpus moved elsewhere) keeps it."""
    root = tmp_path_factory.mktemp("corpus")
    corpus = _corpus(root)
    key = _key(corpus, tokenizers[0])
    a = corpus / "a.txt"
    if edit == "append":
        a.write_text(a.read_text() + " more")
    elif edit.startswith("flip"):
        data = bytearray(a.read_bytes())
        data[int(edit.split()[1])] ^= 0x01
        a.write_bytes(bytes(data))
    elif edit == "add file":
        (corpus / "c.txt").write_text("A new document.")
    elif edit == "rename":  # (the folder is read in sorted order: b.md now comes first)
        a.rename(corpus / "z.txt")
    elif edit == "remove file":
        (corpus / "sub" / "b.md").unlink()
    elif edit == "hidden file":
        (corpus / ".c.txt").write_text("never read")
    elif edit == "touch":
        os.utime(a, (1e9, 1e9))
    else:
        corpus = corpus.rename(root / "elsewhere")
    same = edit in ("hidden file", "touch", "move folder")
    assert (_key(corpus, tokenizers[0]) == key) == same, edit
    if same:
        assert T.load_text_splits([str(corpus)], valid_fraction=0.2).train == T.load_text_splits(
            [str(_corpus(tmp_path_factory.mktemp("again")))], valid_fraction=0.2
        ).train


def test_a_source_that_is_missing_is_named_and_hf_sources_are_not_cached(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text source .*nope.* is neither a known corpus"):
        C.corpus_fingerprint([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TextDataError, match="holds no text files"):
        C.corpus_fingerprint([str(tmp_path / "empty")])
    assert C.corpus_fingerprint(["hf:imdb"]) is None
    (tmp_path / "t.csv").write_text("text\nhello\n")
    assert T.source_files(str(tmp_path / "t.csv")) == ("table:csv", tmp_path, [tmp_path / "t.csv"])


# --- entries -------------------------------------------------------------------------------------------


def test_a_hit_gives_the_fresh_build_as_read_only_memory_maps(
    tmp_path: Path, tokenizers: tuple[Any, Any]
) -> None:
    corpus = _corpus(tmp_path)
    key = _key(corpus, tokenizers[0])
    fresh = _build(corpus, tokenizers[0])
    built, hit = C.load_or_build(tmp_path / "cache", key, lambda: _build(corpus, tokenizers[0]))
    assert not hit

    def no_build() -> C.TokenBlocks:
        raise AssertionError("built again")

    cached, hit = C.load_or_build(tmp_path / "cache", key, no_build)
    assert hit
    for blocks in (built, cached):
        for split in ("train", "validation"):
            got, want = getattr(blocks, split), getattr(fresh, split)
            assert isinstance(got, np.memmap) and not got.flags.writeable and got.dtype == np.int32
            np.testing.assert_array_equal(got, want)
        assert (blocks.train_documents, blocks.validation_documents) == (
            fresh.train_documents, fresh.validation_documents)
    assert len(fresh.validation) > 0 and fresh.train_documents + fresh.validation_documents == len(DOCS)
    assert not [p for p in (tmp_path / "cache").rglob(".*")]  # no temporaries


def test_an_empty_split_is_stored_and_read(tmp_path: Path) -> None:
    blocks = C.TokenBlocks(np.arange(12, dtype=np.int64).reshape(3, 4), np.zeros((0, 4), np.int64), 2, 0)
    C.write_entry(tmp_path, "k" * 64, blocks)
    read = C.read_entry(tmp_path, "k" * 64)
    assert read is not None and read.validation.shape == (0, 4)
    np.testing.assert_array_equal(read.train, blocks.train)
    assert C.read_entry(tmp_path, "j" * 64) is None  # (no entry: a miss, no warning)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped train": lambda e: _flip(e / "train.npy"),
    "truncated validation": lambda e: _truncate(e / "validation.npy"),
    "train gone": lambda e: (e / "train.npy").unlink(),
    "meta not JSON": lambda e: (e / "meta.json").write_text('{"format": 1, "ke'),
    "meta of another key": lambda e: (e / "meta.json").write_text(
        json.dumps({**json.loads((e / "meta.json").read_text()), "key": "0" * 64})),
    "wrong shape": lambda e: np.save(e / "train.npy", np.zeros((1, 16), np.int32)),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_entry_is_rebuilt_with_one_warning(
    tmp_path: Path, corruption: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = C.TokenBlocks(np.arange(64, dtype=np.int64).reshape(4, 16), np.ones((2, 16), np.int64), 3, 1)
    key = "ab" * 32
    C.load_or_build(tmp_path, key, lambda: blocks)
    CORRUPTIONS[corruption](C.entry_dir(tmp_path, key))
    capsys.readouterr()
    builds = []
    got, hit = C.load_or_build(tmp_path, key, lambda: builds.append(1) or blocks)
    err = capsys.readouterr().err.strip().splitlines()
    assert not hit and builds == [1]
    assert len(err) == 1 and err[0].startswith("[gmlp] warning: token cache ") and "rebuilding it" in err[0]
    np.testing.assert_array_equal(got.train, blocks.train)
    again, hit = C.load_or_build(tmp_path, key, lambda: pytest.fail("built a third time"))
    assert hit and capsys.readouterr().err == ""


def test_an_entry_without_its_meta_is_a_miss_and_a_truncated_file_is_never_mapped(tmp_path: Path) -> None:
    """A writer killed before meta.json (written last) leaves no entry that reads; without verification a
    truncated array is still an error, not a memory map of less data."""
    blocks = C.TokenBlocks(np.arange(64, dtype=np.int64).reshape(4, 16), np.ones((2, 16), np.int64), 3, 1)
    entry = C.write_entry(tmp_path, "cd" * 32, blocks)
    (entry / "train.npy").write_bytes((entry / "train.npy").read_bytes()[:-16])
    with pytest.raises(C.TokenCacheError):
        C.read_entry(tmp_path, "cd" * 32, verify=False)
    (entry / "meta.json").unlink()
    assert C.read_entry(tmp_path, "cd" * 32) is None


def test_an_unwritable_cache_keeps_the_blocks_in_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    blocks = C.TokenBlocks(np.ones((2, 4), np.int64), np.ones((1, 4), np.int64), 1, 1)
    got, hit = C.load_or_build(tmp_path / "file" / "cache", "ef" * 32, lambda: blocks)
    assert got is blocks and not hit
    assert "not written" in capsys.readouterr().err


def test_prune_removes_the_other_entries_only(tmp_path: Path) -> None:
    blocks = C.TokenBlocks(np.ones((2, 4), np.int64), np.ones((1, 4), np.int64), 1, 1)
    C.load_or_build(tmp_path, "11" * 32, lambda: blocks)
    (tmp_path / "mine.txt").write_text("kept")
    C.load_or_build(tmp_path, "22" * 32, lambda: blocks)
    assert C.entry_dir(tmp_path, "11" * 32).is_dir()  # (a shared folder: nothing removed)
    entry = C.entry_dir(tmp_path, "33" * 32)
    entry.mkdir()
    (entry / ".train.npy.0a1b2c3d.tmp").write_bytes(b"a writer killed mid-file")
    C.load_or_build(tmp_path, "33" * 32, lambda: blocks, prune=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", entry.name]
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train.npy", "validation.npy"]


# --- the training loop reads memory maps as it read the tensors ----------------------------------------


@settings(max_examples=10, deadline=None, derandomize=True)
@given(rows=st.lists(st.integers(0, 5), min_size=1, max_size=6), start=st.integers(0, 5),
       stop=st.integers(0, 6))
def test_batches_of_a_read_only_memory_map_equal_those_of_the_tensor(
    tmp_path_factory: pytest.TempPathFactory, rows: list[int], start: int, stop: int
) -> None:
    """``_rows`` (what ``pretrain``'s micro-batches and evaluation index the blocks with) gives the same
    writable int64 tensor from the in-memory int64 blocks and from the cache's read-only int32 memory map,
    without a warning (torch warns about non-writable arrays), and the masking leaves the map as it was."""
    gen = torch.Generator().manual_seed(len(rows) * 7 + start)
    tensor = torch.randint(5, 100, (6, 16), generator=gen)
    tensor[:, 0], tensor[:, -1] = 2, 3
    root = tmp_path_factory.mktemp("rows")
    C.write_entry(root, "aa" * 32, C.TokenBlocks(tensor.numpy(), tensor[:2].numpy(), 6, 2))
    mapped = C.read_entry(root, "aa" * 32)
    assert mapped is not None and not mapped.train.flags.writeable
    before = np.array(mapped.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for idx in (rows, range(start, max(start, stop))):
            a, b = pipelines._rows(tensor.numpy(), idx), pipelines._rows(mapped.train, idx)
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
            assert torch.equal(a, tensor[list(idx)])
            masking = dict(mask_token_id=4, vocab_size=100, special_ids=[0, 1, 2, 3, 4], mlm_probability=0.5,
                           seeds=list(range(len(b))))
            inputs, labels = pipelines.mask_tokens(b, **masking)
            ref_inputs, ref_labels = pipelines.mask_tokens(tensor[list(idx)], **masking)
            assert torch.equal(inputs, ref_inputs) and torch.equal(labels, ref_labels)
    np.testing.assert_array_equal(mapped.train, before)
    shutil.rmtree(root)


# --- several processes: process 0 works, the others wait and hear of its result or its error ------------


def _two_processes(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    accelerator = SimpleNamespace(num_processes=2, is_main_process=rank == 0)
    out: dict[str, Any] = {}
    ran: list[int] = []
    out["ok"] = pipelines._main_process_first(
        accelerator, "x", lambda: ran.append(rank) or "built", lambda result: f"{result}, shared"
    )
    out["ran"] = ran
    try:
        pipelines._main_process_first(accelerator, "the token blocks", lambda: 1 / 0)
    except Exception as err:  # noqa: BLE001  (the test compares the errors)
        out["error"] = [type(err).__name__, str(err)]

    def bad_corpus() -> None:
        raise T.TextDataError("corpus 'typo.txt' does not exist")

    try:  # a usage error: the same type in every process (the CLI's one line, exit 2, not a traceback)
        pipelines._main_process_first(accelerator, "the token blocks", bad_corpus)
    except Exception as err:  # noqa: BLE001
        out["usage"] = [type(err).__name__, str(err)]
    dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(out))


def test_an_error_of_process_0_is_raised_in_every_process(tmp_path: Path) -> None:
    """The token blocks (and a trained tokenizer) are made by process 0 while the others wait: a failure
    there (a corpus that does not read, a tokenizer that does not train) left the others waiting in a
    barrier (``main_process_first``) until the launcher stopped them; now each raises, naming the error."""
    run_two_forked(_two_processes, (str(tmp_path / "init"), str(tmp_path)))
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0]["ok"] == ["built", "built, shared"] and got[1]["ok"] == [None, "built, shared"]
    assert got[0]["ran"] == [0] and got[1]["ran"] == []
    assert got[0]["error"] == ["ZeroDivisionError", "division by zero"]
    want = "process 0 failed to prepare the token blocks: ZeroDivisionError: division by zero"
    assert got[1]["error"] == ["RuntimeError", want]
    assert got[0]["usage"] == got[1]["usage"] == ["TextDataError", "corpus 'typo.txt' does not exist"]


def test_a_write_cut_short_leaves_no_entry_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the second array is written: the first (train.npy, the large one) was left in the
    cache, taking the space the run's checkpoints need; now the entry folder goes, the run keeps its blocks
    in memory with one warning."""
    blocks = C.TokenBlocks(np.arange(32).reshape(4, 8), np.arange(16).reshape(2, 8), 4, 2)
    real, calls = C._compact, []

    def compact(array: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(array)

    monkeypatch.setattr(C, "_compact", compact)
    warned: list[str] = []
    got, hit = C.load_or_build(tmp_path, "bb" * 32, lambda: blocks, prune=True, warn=warned.append)
    assert not hit and got is blocks and len(warned) == 1 and "not written" in warned[0]
    assert not C.entry_dir(tmp_path, "bb" * 32).exists()
    # a shared folder (no pruning): the entry may be another run's, finished meanwhile; left, and an entry
    # without its meta.json is no entry to a reader
    calls.clear()
    got, hit = C.load_or_build(tmp_path / "shared", "bb" * 32, lambda: blocks, warn=warned.append)
    assert not hit and got is blocks and len(warned) == 2
    assert C.read_entry(tmp_path / "shared", "bb" * 32) is None

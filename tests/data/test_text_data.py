"""Text corpora (gmlp.data.text): local files, R lazy-load parsing, held-out split, packing, offline data."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.data import text as T

OFFLINE_MISSING = T.missing_offline_sources()
needs_offline = pytest.mark.skipif(
    bool(OFFLINE_MISSING),
    reason=f"offline text data absent ({', '.join(OFFLINE_MISSING)}); run scripts/fetch_text_data.sh",
)


# --- local files -----------------------------------------------------------------------------------------


def test_text_file_is_split_into_paragraphs(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("\ufeffFirst paragraph\nstill first.\n\n\n  Second one.\r\n\r\nThird.\n")
    docs = list(T.iter_text_path(f))
    assert [d.text for d in docs] == ["First paragraph\nstill first.", "Second one.", "Third."]


def test_folder_is_read_recursively_in_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    assert [d.text for d in T.iter_text_path(tmp_path)] == ["bee", "ay"]


@pytest.mark.parametrize("content", [b"", b"  \n\n\t "])
def test_empty_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(T.TextDataError, match=r"empty\.txt.*empty"):
        T.load_text_splits(str(f))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(T.TextDataError, match=r"latin\.txt.*not valid UTF-8.*0xe9"):
        T.load_text_splits(str(f))


def test_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        T.load_text_splits(str(tmp_path / "nowhere"))
    with pytest.raises(T.TextDataError, match="holds no text files"):
        T.load_text_splits(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        T.read_text_file(tmp_path / "nope.txt")


def test_aliases_and_comma_lists() -> None:
    assert T.resolve_sources(None) == list(T.OFFLINE_SOURCES)
    assert T.resolve_sources("books,wordnet") == ["austen", "mobydick", "wordnet"]
    with pytest.raises(T.TextDataError):
        T.resolve_sources([" , "])


def test_table_file_through_datasets(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text('{"body": "one two"}\n{"body": "three"}\n')
    assert [d.text for d in T.iter_documents(str(f), text_column="body")] == ["one two", "three"]
    with pytest.raises(T.TextDataError, match=r"no column 'text'; available columns: body"):
        list(T.iter_documents(str(f)))


# --- held-out split, packing ------------------------------------------------------------------------------


def test_heldout_split_is_deterministic_and_order_free() -> None:
    docs = [f"document number {i}" for i in range(2000)]
    train, valid = T.split_documents(docs, 0.1)
    assert 120 < len(valid) < 280 and len(train) + len(valid) == 2000
    train2, valid2 = T.split_documents(list(reversed(docs)), 0.1)
    assert set(valid2) == set(valid) and set(train2) == set(train)
    assert T.split_documents(docs, 0.0) == (docs, [])


def test_heldout_split_never_empty_with_two_documents() -> None:
    train, valid = T.split_documents(["alpha", "beta"], 0.001)
    assert len(valid) == 1 and len(train) == 1
    with pytest.raises(ValueError):
        T.split_documents(["a"], 1.5)


def test_max_documents_and_chars(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(f"paragraph {i} " * 3 for i in range(50)))
    s = T.load_text_splits(str(f), max_documents=10, valid_fraction=0.2)
    assert len(s.train) + len(s.validation) == 10
    s = T.load_text_splits(str(f), max_chars=100)
    assert 2 <= len(s.train) + len(s.validation) <= 4


def test_pack_sequences() -> None:
    ids, mask = T.pack_sequences([[10, 11, 12], [], [13, 14, 15, 16]], 6, cls_id=2, sep_id=3, pad_id=0)
    # stream: 10 11 12 [SEP] 13 14 15 16 -> bodies of 4: [10 11 12 3] [13 14 15 16]
    assert ids.tolist() == [[2, 10, 11, 12, 3, 3], [2, 13, 14, 15, 16, 3]]
    assert mask.all()
    ids, mask = T.pack_sequences([[5] * 5], 5, cls_id=2, sep_id=3, pad_id=0)
    assert ids.tolist() == [[2, 5, 5, 5, 3], [2, 5, 5, 3, 0]]
    assert mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    ids, _ = T.pack_sequences([[5] * 5], 5, cls_id=2, sep_id=3, pad_id=0, drop_last=True)
    assert ids.shape == (1, 5) and ids.dtype == torch.long
    with pytest.raises(ValueError):
        T.pack_sequences([[1]], 2, cls_id=2, sep_id=3, pad_id=0)


# --- R lazy-load databases (synthetic, written with rdata) -----------------------------------------------


def _write_lazyload(folder: Path, objects: dict[str, np.ndarray]) -> None:
    import rdata

    def serialize(obj: object) -> bytes:
        tmp = folder / "obj.rds"
        rdata.write_rds(tmp, obj, compression="gzip")
        data = gzip.decompress(tmp.read_bytes())
        tmp.unlink()
        return data

    rdb, variables = b"", {}
    for name, obj in objects.items():
        body = serialize(obj)
        record = struct.pack(">I", len(body)) + zlib.compress(body)
        variables[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    (folder / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    (folder / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))


def test_r_lazyload_and_chapters(tmp_path: Path) -> None:
    lines = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome.", "", "CHAPTER II", "", "Mr. Weston."]
    _write_lazyload(tmp_path, {"emma": np.array(lines), "persuasion": np.array(["Chapter 1", "Sir Walter."])})
    objs = T.read_r_lazyload(tmp_path / "Rdata.rdx")
    assert list(objs["emma"]) == lines
    docs = list(T.iter_austen(tmp_path))
    assert [d.name for d in docs] == [
        "austen:emma:000",
        "austen:emma:001",
        "austen:emma:002",
        "austen:persuasion:000",
    ]
    assert docs[1].text == "CHAPTER I\n\nEmma Woodhouse, handsome."


def test_moby_dick_gutenberg_frame_removed(tmp_path: Path) -> None:
    book = (
        "\ufeffHeader\r\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\nETYMOLOGY.\r\n\r\n"
        "CHAPTER 1. Loomings."
        "\r\n\r\nCall me Ishmael.\r\n\r\nEpilogue\r\n\r\nThe drama's done.\r\n*** END OF THIS ***\r\nLicence"
    )
    _write_lazyload(tmp_path, {"mobydick": np.array([book])})
    docs = list(T.iter_moby_dick(tmp_path))
    assert [d.text for d in docs] == [
        "ETYMOLOGY.",
        "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
        "Epilogue\n\nThe drama's done.",
    ]


def test_missing_offline_source_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GMLP_DATA", str(tmp_path))
    assert "austen" in T.missing_offline_sources()
    with pytest.raises(FileNotFoundError, match="fetch_text_data.sh"):
        list(T.iter_documents("austen"))


# --- the real offline corpora ----------------------------------------------------------------------------


@needs_offline
def test_offline_wordnet_and_pydocs_counts() -> None:
    glosses = sum(1 for _ in T.iter_wordnet_glosses())
    assert glosses == 117_659
    first = next(T.iter_wordnet_glosses())
    assert first.text.startswith("that which is perceived")
    assert sum(1 for _ in T.iter_python_docs()) == 497


@needs_offline
def test_offline_books() -> None:
    austen = list(T.iter_austen())
    books = {d.name.split(":")[1] for d in austen}
    assert books == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }
    assert 3.5e6 < sum(len(d.text) for d in austen) < 4.5e6
    moby = list(T.iter_moby_dick())
    assert len(moby) == 137 and moby[1].text.startswith("CHAPTER 1. Loomings.")
    assert not any("Gutenberg" in d.text for d in moby[1:-1])
    s = T.load_text_splits("books", valid_fraction=0.05)
    assert 5 <= len(s.validation) <= 40 and s == T.load_text_splits("books", valid_fraction=0.05)


def test_split_fallback_holds_out_every_copy_of_a_text() -> None:
    # nothing falls below 1%: the fallback holds out the smallest-bucket text, "* * *", which appears twice
    docs = ["alpha paragraph", "* * *", "beta paragraph", "* * *", "gamma"]
    assert min(map(T.heldout_bucket, docs)) == T.heldout_bucket("* * *") > 0.01
    train, valid = T.split_documents(docs, 0.01)
    assert valid == ["* * *", "* * *"] and not set(train) & set(valid)
    assert sorted(train + valid) == sorted(docs)
    assert T.split_documents(["same", "same"], 0.01) == (["same", "same"], [])  # one text: none held out


def test_split_never_holds_out_every_document() -> None:
    docs = ["* * *", "hello world"]
    assert all(T.heldout_bucket(d) < 0.9 for d in docs)
    train, valid = T.split_documents(docs, 0.9)
    assert train == ["hello world"] and valid == ["* * *"]  # the largest bucket stays for training


# --- audit: path objects, table files, packing arguments ----------------------------------------------------


def test_sources_may_be_path_objects(tmp_path: Path) -> None:
    """A pathlib.Path (as read_text_file and iter_text_path take) was iterated: PosixPath not iterable."""
    f = tmp_path / "c.txt"
    f.write_text("one\n\ntwo\n\nthree")
    assert T.resolve_sources(f) == [str(f)]
    assert T.resolve_sources([f, "books"]) == [str(f), "austen", "mobydick"]
    s = T.load_text_splits(f, valid_fraction=0.0)
    assert s.train == ["one", "two", "three"] and s.sources == [str(f)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"data file '.*empty\.jsonl' is empty"),
        ("empty.parquet", "", r"data file '.*empty\.parquet' is empty"),
        ("blank.jsonl", " \n\n", r"'.*blank\.jsonl' holds no rows"),
        ("header.csv", "text\n", r"'.*header\.csv' holds no rows"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', r"cannot read '.*broken\.jsonl' as json: .*JSON"),
    ],
)
def test_bad_table_files_are_named(tmp_path: Path, name: str, content: str, message: str) -> None:
    """docs/text_training.md: bad inputs fail early with the file named (HF datasets said only 'An error
    occurred while generating the dataset' or 'Instruction "train" corresponds to no data!')."""
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(T.TextDataError, match=message):
        T.load_text_splits(str(f))


def test_pack_sequences_loses_nothing() -> None:
    """Random documents: every block has seq_len tokens, [CLS] first; the non-pad tokens between [CLS] and
    the block's last [SEP], joined, are the documents joined by [SEP]; only the last block is padded."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        docs = [rng.integers(5, 50, size=rng.integers(0, 12)).tolist() for _ in range(rng.integers(0, 6))]
        seq_len = int(rng.integers(3, 10))
        ids, mask = T.pack_sequences(docs, seq_len, cls_id=1, sep_id=2, pad_id=0)
        stream = [t for d in [d for d in docs if d] for t in (*d, 2)][:-1]
        assert ids.shape == mask.shape and ids.shape[1] == seq_len
        got = []
        for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
            n = sum(m)
            assert m == [1] * n + [0] * (seq_len - n) and row[0] == 1 and row[n - 1] == 2
            assert row[n:] == [0] * (seq_len - n)
            got += row[1 : n - 1]
        assert got == stream
        assert (mask == 0).sum() < seq_len  # only the last block is padded


@pytest.mark.parametrize(
    ("token_ids", "seq_len", "message"),
    [
        ([1, 2, 3], 8, r"token_ids: document 0 has shape \(\); .*one flat sequence"),
        ([[1, 2], np.array([[3, 4]])], 8, r"token_ids: document 1 has shape \(1, 2\)"),
        ([[1, 2]], 8.0, r"seq_len must be an int >= 3.*got 8\.0"),
        ([[1, 2]], True, r"seq_len must be an int >= 3.*got True"),
    ],
)
def test_pack_sequences_bad_arguments_are_named(token_ids: list, seq_len: object, message: str) -> None:
    """A flat list of ids or a [1, n] batch row failed deep inside numpy (no len() of an int, dimension
    mismatch in concatenate); a float seq_len inside torch.full."""
    with pytest.raises(ValueError, match=message):
        T.pack_sequences(token_ids, seq_len, cls_id=1, sep_id=2, pad_id=0)  # type: ignore[arg-type]
    ids, _ = T.pack_sequences([torch.tensor([4, 5]), np.array([6], dtype=np.int32)], np.int64(5), cls_id=1,
                              sep_id=2, pad_id=0)
    assert ids.tolist() == [[1, 4, 5, 2, 2], [1, 6, 2, 0, 0]]

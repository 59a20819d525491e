"""Data preparation at scale: memory and work that grow with the corpus only as they must.

Counted, not timed: the scratch memory numpy allocates (``tracemalloc`` sees numpy's buffers) and the
comparisons made; wall-clock timings on a shared machine are meaningless.
"""

from __future__ import annotations

import contextlib
import json
import os
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.data import sentiment as S
from gmlp.data import text as T


def _reference_pack(docs: list[list[int]], seq_len: int, drop_last: bool) -> tuple[list, list]:
    """The documents joined by [SEP] (2), cut into bodies of seq_len - 2, each as [CLS] body [SEP] (1 ... 2),
    the last one right-padded with 0 (or dropped)."""
    stream = [t for d in (d for d in docs if d) for t in (2, *d)][1:]
    body = seq_len - 2
    ids, mask = [], []
    for start in range(0, len(stream), body):
        piece = stream[start : start + body]
        if len(piece) < body and drop_last:
            break
        row = [1, *piece, 2]
        ids.append(row + [0] * (seq_len - len(row)))
        mask.append([1] * len(row) + [0] * (seq_len - len(row)))
    return ids, mask


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=8),
    seq_len=st.integers(3, 12),
    drop_last=st.booleans(),
    kind=st.sampled_from(["list", "int32", "int64", "tensor"]),
)
def test_pack_sequences_matches_the_joined_stream(
    lengths: list[int], seq_len: int, drop_last: bool, kind: str
) -> None:
    """Documents spanning several blocks, starting mid-block or ending on a block's end, empty ones, every
    input kind: the blocks are those of the joined stream (pack_sequences writes each document straight
    into its blocks instead of concatenating a copy of the corpus first)."""
    rng = np.random.default_rng(sum(lengths) * 31 + seq_len)
    docs = [rng.integers(5, 30_000, size=n).tolist() for n in lengths]
    given_docs = {
        "list": docs,
        "int32": [np.asarray(d, dtype=np.int32) for d in docs],
        "int64": [np.asarray(d, dtype=np.int64) for d in docs],
        "tensor": [torch.tensor(d, dtype=torch.long) for d in docs],
    }[kind]
    ids, mask = T.pack_sequences(iter(given_docs), seq_len, cls_id=1, sep_id=2, pad_id=0, drop_last=drop_last)
    want_ids, want_mask = _reference_pack(docs, seq_len, drop_last)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(want_ids), seq_len) == mask.shape
    assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_pack_sequences_makes_no_copy_of_the_corpus() -> None:
    """int32 documents (what pretraining's tokenizer step gives) were each copied to int64 and then
    concatenated into a third copy before the blocks were filled: 36 bytes per token at the peak (the
    measured 100 MB corpus, 40.5 M tokens: 2.24 GB peak RSS, 1.58 GB without the copies). Now numpy
    allocates nothing per token (the outputs are torch's, which tracemalloc does not see)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 1000, size=int(rng.integers(1, 1000)), dtype=np.int32) for _ in range(200)]
    n_tokens = sum(map(len, docs))
    tracemalloc.start()
    try:
        ids, _ = T.pack_sequences(docs, 64, cls_id=1, sep_id=2, pad_id=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n_tokens  # under 1 byte per token (the old code: 16)
    assert ids[0, 1:-1].tolist()[: len(docs[0])] == docs[0].tolist()[:62]


class _CountingName(str):
    """A label name that counts the comparisons made with it."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        type(self).comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_label_names_are_looked_up_not_scanned(tmp_path: Path) -> None:
    """Each record's label name was found by scanning the list of names twice (``in``, ``index``): 4.4 s
    for 80k records and 2,000 names, growing with records x names. A dict lookup makes about one
    comparison per record; the ids are still the names' places (the first, for a repeated name)."""
    rng = np.random.default_rng(0)
    names = [_CountingName(f"class{i:03d}") for i in range(300)] + [_CountingName("class007")]
    labels = [f"class{int(i):03d}" for i in rng.integers(0, 300, size=400)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"sentence": f"text {k}", "label": lab}) + "\n"
                             for k, lab in enumerate(labels)))
    _CountingName.comparisons = 0
    data = S.load_classification_files(train, train, train, text_column="sentence", label_names=names,
                                       num_labels=len(names))
    assert _CountingName.comparisons <= 4 * 3 * len(labels)  # (the list scans made ~100 per record)
    assert [e.label for e in data.train] == [int(lab[5:]) for lab in labels]
    with pytest.raises(S.TextDataError, match="unknown label 'nope'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"sentence": "x", "label": "nope"}) + "\n")
        S.load_classification_files(train, bad, train, text_column="sentence", label_names=names,
                                    num_labels=len(names))


def _image_tree(root: Path, per_class: int) -> None:
    from PIL import Image

    (root / "train").mkdir(parents=True)
    png = root / "one.png"
    Image.new("RGB", (4, 4), (10, 200, 30)).save(png)
    for c in range(3):
        folder = root / "train" / f"class{c}"
        folder.mkdir()
        for i in range(per_class):
            (folder / f"img{i:03d}.png").write_bytes(png.read_bytes())


def test_folder_source_holds_no_object_per_image(tmp_path: Path) -> None:
    """The ImageFolder source kept a list of (path, label) tuples: a forked DataLoader worker copies the
    memory page of every Python object it reads (reference counts), 166 bytes per image measured (50k
    files: 9.4 MB more private memory per worker after one pass; about 230 MB per worker for ImageNet).
    The paths are now one bytes object: no tuple per image stays alive, and ``samples``, ``describe`` and
    ``load`` give what they gave."""
    import gc

    from gmlp.data import folders

    _image_tree(tmp_path, 20)
    odd = tmp_path / "train" / "class1"
    with contextlib.suppress(OSError), open(os.fsencode(odd) + b"/\xff-odd.png", "wb") as f:
        f.write((odd / "img000.png").read_bytes())  # a name that is not UTF-8 (os.walk: surrogate escapes)
    source = folders.image_folder_source(tmp_path, "train")
    root, seen, todo, paths = str(tmp_path), set(), [source], 0
    while todo:  # the objects the source reaches (not through classes and modules)
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        paths += type(obj) is str and obj.startswith(root)
        todo.extend(gc.get_referents(obj))
    assert paths < 5  # (the root Path holds its string; one per image was 61 here)
    expected = [(os.path.join(top, f), label) for label, c in enumerate(source.classes)
                for top, _, files in os.walk(tmp_path / "train" / c) for f in sorted(files)]
    assert source.samples == expected and len(source) == len(expected)
    assert [source.describe(i) for i in (0, -1)] == [repr(expected[0][0]), repr(expected[-1][0])]
    for i in range(len(source)):
        assert source.load(i).size == (4, 4)
    with pytest.raises(IndexError):
        source.path(len(source))


def test_load_text_splits_keeps_texts_not_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_text_splits held every TextDocument (with its own name string, ``file:paragraph``) until the
    split: 1M one-line paragraphs (53 MB) peaked at 409 MB above the start, 227 MB with the texts only.
    When the split starts, (almost) no document object is alive; the split is the same."""
    import weakref

    alive: list[weakref.ref] = []

    def documents(names: object, *, text_column: str) -> object:
        for k in range(500):
            doc = T.TextDocument("src", f"file.txt:{k}", f"paragraph number {k}")
            alive.append(weakref.ref(doc))
            yield doc

    seen: list[int] = []
    split = T.split_documents

    def counting_split(docs: list, valid_fraction: float) -> tuple[list[str], list[str]]:
        seen.append(sum(r() is not None for r in alive))
        return split(docs, valid_fraction)

    monkeypatch.setattr(T, "iter_documents", documents)
    monkeypatch.setattr(T, "split_documents", counting_split)
    got = T.load_text_splits("anything", valid_fraction=0.1, max_documents=400)
    assert seen[0] <= 2  # (the generator's last one; 400 before)
    want = split([f"paragraph number {k}" for k in range(400)], 0.1)
    assert (got.train, got.validation) == want

"""Users' own data files at the edges: EXIF-rotated and odd-mode images, hidden and binary files in text
folders, bad bytes, gzip, CSV quirks, label spellings and numbering, SQuAD offsets and ids."""

from __future__ import annotations

import gc
import gzip
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.data import text as T
from gmlp.data.folders import CorruptImageError, TransformedImages, hf_source, image_folder_source
from gmlp.data.sentiment import load_classification_files, load_qa, load_squad_json, read_records
from gmlp.data.text import TextDataError

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageOps  # noqa: E402

ORIENTATION = 0x0112


def _photo(orientation: int) -> Image.Image:
    """A 6x4 (w x h) RGB image whose corners differ, tagged with an EXIF ``orientation``."""
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0], arr[0, -1], arr[-1, 0] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.info["exif"] = exif.tobytes()
    return img


def _png_bytes(orientation: int) -> bytes:
    buf = io.BytesIO()
    img = _photo(orientation)
    img.save(buf, format="PNG", exif=img.info["exif"])
    return buf.getvalue()


# --- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_folder_and_hf_images_are_turned_upright_like_datasets_decodes_them(
    tmp_path: Path, orientation: int
) -> None:
    """A phone photo is stored sideways with an EXIF Orientation tag. HF ``datasets`` decodes it upright
    (``exif_transpose``), but ``hf_source`` decoded the bytes itself and gave it sideways, so a model saw
    other pixels than the dataset shows (and an ImageFolder copy of the same files did too)."""
    datasets = pytest.importorskip("datasets")
    data = _png_bytes(orientation)
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "train" / "a" / "x.png").write_bytes(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))

    folder = TransformedImages(image_folder_source(tmp_path / "tree", "train"), np.asarray, "RGB")
    np.testing.assert_array_equal(folder[0][0], expected)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}], "label": [0]},
                                    features=features)
    shown = np.asarray(ds[0]["image"].convert("RGB"))  # what `datasets` itself decodes
    np.testing.assert_array_equal(shown, expected)
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = TransformedImages(hf_source(str(tmp_path / "hf"), None), np.asarray, "RGB")
    np.testing.assert_array_equal(hf[0][0], shown)


def test_unreadable_exif_keeps_the_image(tmp_path: Path) -> None:
    """An image whose orientation cannot be applied is used as stored, not skipped as corrupt."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    _photo(1).save(tmp_path / "train" / "a" / "x.png")
    bad = _photo(1)
    exif = Image.Exif()
    exif[ORIENTATION] = 99  # no such orientation
    bad.save(tmp_path / "train" / "a" / "y.png", exif=exif.tobytes())
    ds = TransformedImages(image_folder_source(tmp_path, "train"), np.asarray, "RGB", strict=True)
    assert ds[0][0].shape == ds[1][0].shape == (4, 6, 3)


def test_strict_error_for_a_float_image_names_the_file(tmp_path: Path) -> None:
    """A mode-F image is refused as unreadable; with ``strict`` the message named no file."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).random((4, 4)).astype(np.float32)).save(
        tmp_path / "train" / "a" / "depth map.tif"
    )
    ds = TransformedImages(image_folder_source(tmp_path, "train"), np.asarray, "RGB", strict=True)
    with pytest.raises(CorruptImageError, match=r"depth map\.tif.*PIL mode F"):
        ds[0]
    assert TransformedImages(ds.source, np.asarray, "RGB")[0] is None  # skipped without strict


def test_a_skipped_corrupt_file_is_closed(tmp_path: Path) -> None:
    """A truncated file is skipped; its handle was left open until garbage collection (ResourceWarning;
    thousands of corrupt files in a crawl could exhaust the descriptors of a worker)."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="JPEG")
    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = TransformedImages(image_folder_source(tmp_path, "train"), np.asarray, "RGB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[0] is None
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_image_modes_convert_to_either_channel_count(tmp_path: Path) -> None:
    """L, LA, P with transparency, RGBA, CMYK, 1-bit, 16-bit and WebP files all load as L or RGB of their size
    (upper-case extensions, spaces and non-ASCII names included)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (5, 7, 3), np.uint8))
    d = tmp_path / "train" / "clé 1"
    d.mkdir(parents=True)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    files = {"l.PNG": rgb.convert("L"), "la.png": rgb.convert("LA"), "p.png": palette,
             "rgba.png": rgb.convert("RGBA"), "cmyk.JPEG": rgb.convert("CMYK"), "one.bmp": rgb.convert("1"),
             "i16.tif": Image.fromarray(rng.integers(0, 65535, (5, 7), np.uint16)), "w.webp": rgb}
    for name, img in files.items():
        img.save(d / name)
    source = image_folder_source(tmp_path, "train")
    assert len(source) == len(files)
    for mode, shape in (("L", (5, 7)), ("RGB", (5, 7, 3))):
        ds = TransformedImages(source, np.asarray, mode, strict=True)
        assert all(ds[i][0].shape == shape for i in range(len(ds)))


def test_hf_labels_must_be_whole_numbers(tmp_path: Path) -> None:
    """A float label column: 1.0 is class 1, but 1.5 was silently cut to class 1."""
    datasets = pytest.importorskip("datasets")
    img = {"bytes": _png_bytes(1), "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32")})
    datasets.Dataset.from_dict({"image": [img] * 2, "label": [0.0, 1.0]}, features=features).save_to_disk(
        str(tmp_path / "ok")
    )
    assert hf_source(str(tmp_path / "ok"), None).labels == [0, 1]
    datasets.Dataset.from_dict({"image": [img] * 2, "label": [0.0, 1.5]}, features=features).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(ValueError, match=r"row 1 holds 1\.5"):
        hf_source(str(tmp_path / "bad"), None)


# --- pretraining text --------------------------------------------------------------------------------------


def test_text_folder_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    """A folder copied from a Mac holds ``._x.txt`` resource forks (binary: the whole corpus was refused as
    not UTF-8), and a notebook folder ``.ipynb_checkpoints`` copies (read twice)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "._a.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe\x00")
    (tmp_path / "sub" / "b.MD").write_text("gamma")
    docs = list(T.iter_text_path(tmp_path))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt:0", "alpha"), ("a.txt:1", "beta"), ("sub/b.MD:0", "gamma")
    ]


def test_gzip_text_file_is_named_as_such(tmp_path: Path) -> None:
    """A gzip'd corpus (not a documented format) was reported as 'not valid UTF-8 ... iconv -f latin1'."""
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"hello\n\nworld\n"))
    with pytest.raises(TextDataError, match=r"corpus\.txt\.gz.*gzip-compressed.*gunzip"):
        list(T.iter_documents([str(path)]))


def test_compressed_json_and_csv_corpora_are_read_by_datasets(tmp_path: Path) -> None:
    """HF ``datasets`` unpacks a ``.jsonl.gz`` / ``.csv.gz`` data file itself: the UTF-8 check before it must
    not refuse one as a gzip'd text file."""
    pytest.importorskip("datasets")
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "hello there"}\n{"text": "general kenobi"}\n'))
    docs = list(T.iter_hf_text("json", data_files=str(path), text_column="text"))
    assert [d.text for d in docs] == ["hello there", "general kenobi"]


def _reference_position(raw: bytes) -> tuple[int, int, int] | None:
    """(offset, line, column) of the first byte that is not UTF-8, found by decoding prefixes."""
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        start = err.start
    line = raw[:start].count(b"\n") + 1
    return start, line, start - (raw.rfind(b"\n", 0, start) + 1) + 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    pieces=st.lists(st.sampled_from(["a", "\n", "é", "€", "😀", "\r\n", "x" * 7]), max_size=30),
    bad=st.sampled_from([b"\xe9", b"\xff", b"\xc3", b"\xe2\x82", b"\x80"]),
    where=st.integers(0, 30),
    tail=st.sampled_from(["", "ok", "\n", "é"]),
    chunk=st.integers(1, 9),
    bom=st.booleans(),
)
def test_utf8_errors_name_offset_line_and_column_whatever_the_chunking(
    tmp_path_factory: pytest.TempPathFactory,
    pieces: list[str],
    bad: bytes,
    where: int,
    tail: str,
    chunk: int,
    bom: bool,
) -> None:
    """``decode_utf8`` (whole files) and the chunked check of table files agree with decoding the bytes (the
    offset was counted after a BOM: 3 bytes short)."""
    head = b"\xef\xbb\xbf" * bom + "".join(pieces[:where]).encode()
    raw = head + bad + ("".join(pieces[where:]) + tail).encode()
    path = tmp_path_factory.mktemp("u") / "f.jsonl"
    path.write_bytes(raw)
    expected = _reference_position(raw)
    assert expected is not None
    offset, line, column = expected
    message = f"byte 0x{raw[offset]:02x} at offset {offset}, line {line}, column {column}"
    with pytest.raises(TextDataError, match=rf"f\.jsonl.*{message}"):
        T.decode_utf8(path, raw)
    with pytest.raises(TextDataError, match=rf"f\.jsonl.*{message}"):
        T._check_utf8_file(path, chunk_size=chunk)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bad_bytes_in_a_table_corpus_name_file_and_line(tmp_path: Path, suffix: str) -> None:
    """HF ``datasets`` reads JSON/CSV text unchecked: a latin-1 byte gave a bare ``UnicodeDecodeError``
    traceback from pyarrow (JSON lines) while iterating the rows, naming no file."""
    path = tmp_path / f"corpus{suffix}"
    rows = ['{"text": "fine"}', '{"text": "caf\xe9"}'] if suffix == ".jsonl" else ["text", "fine", "caf\xe9"]
    path.write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(TextDataError, match=rf"corpus\{suffix}.*not valid UTF-8.*line {line}"):
        list(T.iter_documents([str(path)]))


def test_json_corpus_with_a_top_level_data_list(tmp_path: Path) -> None:
    """``{"data": [records]}`` (SQuAD's layout, accepted by the finetuning loader) was one row with a
    ``data`` column: 'has no column text'."""
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"version": "1", "data": [{"text": "one"}, {"text": " two "}, {"text": ""}]}))
    assert [d.text for d in T.iter_documents([str(path)])] == ["one", "two"]


def test_line_ends_bom_and_blank_documents(tmp_path: Path) -> None:
    """BOM, CRLF, lone CR, whitespace-only paragraphs and a last line without newline give the same
    documents."""
    expected = ["first line\nsecond", "third"]
    variants = [b"first line\nsecond\n\n \t\nthird", b"\xef\xbb\xbffirst line\r\nsecond\r\n\r\nthird\r\n",
                b"first line\rsecond\r\r\rthird\r"]
    for k, raw in enumerate(variants):
        path = tmp_path / f"c{k}.txt"
        path.write_bytes(raw)
        assert [d.text for d in T.iter_documents([str(path)])] == expected


# --- finetuning files --------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(["sentence,label", *rows]) + "\n")
    return path


@settings(max_examples=15, deadline=None, derandomize=True)
@given(bad_row=st.integers(0, 29), kind=st.sampled_from(["", "9", "maybe"]))
def test_messages_name_the_record_of_the_file(
    tmp_path_factory: pytest.TempPathFactory, bad_row: int, kind: str
) -> None:
    """A lone training file is split 80/10/10; a bad record was named by its place in the split it landed in
    ('validation record 1'), not in the file."""
    rows = [f"text {i},{'pos' if kind == 'maybe' and i % 2 else i % 2}" for i in range(30)]
    rows[bad_row] = f"text {bad_row},{kind}"
    if kind == "maybe":
        rows = [r if i == bad_row else r.replace(",0", ",neg") for i, r in enumerate(rows)]
        rows[bad_row] = f"text {bad_row},{'maybe'}"
    path = _csv(tmp_path_factory.mktemp("c") / "all.csv", rows)
    kwargs = {"num_labels": 2} if kind == "9" else {"label_names": ["neg", "pos"]} if kind == "maybe" else {}
    with pytest.raises(TextDataError, match=rf"all\.csv, record {bad_row}\b"):
        load_classification_files(path, **kwargs)


def test_label_name_in_validation_with_id_labels_in_training(tmp_path: Path) -> None:
    """Training ids with a label name in the validation file crashed with ``ValueError: invalid literal for
    int()``."""
    train = _csv(tmp_path / "train.csv", ["a,0", "b,1"])
    dev = _csv(tmp_path / "dev.csv", ["c,1", "d,pos"])
    with pytest.raises(TextDataError, match=r"dev\.csv, record 1: label name 'pos'.*labels are class ids"):
        load_classification_files(train, dev, dev)


def test_integral_float_labels_are_ids_in_csv_as_in_json(tmp_path: Path) -> None:
    """pandas writes an int label column that held a NaN as 0.0, 1.0, ..., 10.0. JSON's 1.0 was the id 1, but
    CSV's '1.0' a label *name*, sorted as text ('10.0' < '2.0'): other ids than the numbers."""
    labels = [0, 1, 2, 10, 2, 1]
    train_csv = _csv(tmp_path / "t.csv", [f"s{i},{float(y)}" for i, y in enumerate(labels)])
    train_jsonl = tmp_path / "t.jsonl"
    train_jsonl.write_text("\n".join(json.dumps({"sentence": f"s{i}", "label": float(y)})
                                     for i, y in enumerate(labels)) + "\n")
    dev = _csv(tmp_path / "d.csv", ["x,2", "y,10.0"])
    from_csv = load_classification_files(train_csv, dev, dev)
    from_json = load_classification_files(train_jsonl, dev, dev)
    assert [e.label for e in from_csv.train] == [e.label for e in from_json.train] == labels
    assert from_csv.num_labels == from_json.num_labels == 11 and from_csv.label_names is None
    assert [e.label for e in from_csv.validation] == [2, 10]


def test_csv_cell_longer_than_the_csv_module_default(tmp_path: Path) -> None:
    """A (valid) cell over 128 KiB was refused: 'field larger than field limit (131072)'."""
    import csv

    limit = csv.field_size_limit()
    path = tmp_path / "long.csv"
    path.write_text('sentence,label\n"' + "word " * 40_000 + '",1\nshort,0\n')
    records = read_records(path)
    assert len(records[0]["sentence"]) == 200_000 and records[1] == {"sentence": "short", "label": "0"}
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


def test_csv_row_with_more_cells_than_the_header(tmp_path: Path) -> None:
    """An unquoted comma in a text moved the rest to a column without a name: the label became the text's
    second half (a new class, silently); empty extra cells (Excel's padding) are fine."""
    bad = _csv(tmp_path / "bad.csv", ['"good, fine",pos', "bad, awful,neg"])
    with pytest.raises(TextDataError, match=r"bad\.csv', record 1 \(ending on line 3\): 2 col.*3 in the row"):
        read_records(bad)
    padded = _csv(tmp_path / "padded.csv", ["good,pos,,", "bad,neg,"])
    assert read_records(padded) == [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}]


def test_missing_cells_and_null_labels_are_explained(tmp_path: Path) -> None:
    short = _csv(tmp_path / "short.csv", ["a,0", "b", "c,1"])
    with pytest.raises(TextDataError, match=r"short\.csv, record 1: no label.*fewer cells than the header"):
        load_classification_files(short, short, short)


def test_train_and_validation_label_names_share_ids(tmp_path: Path) -> None:
    """The validation file lacks a class and lists the others in another order: ids are the training ones."""
    train = _csv(tmp_path / "train.csv", ["a,neu", "b,pos", "c,neg", "d,pos"])
    dev = _csv(tmp_path / "dev.csv", ["x,pos", "y,neg"])
    data = load_classification_files(train, dev, dev)
    assert data.label_names == ["neg", "neu", "pos"]
    assert [e.label for e in data.validation] == [2, 0]


# --- SQuAD -------------------------------------------------------------------------------------------------


def _qa(text: str, start: int, qid: str = "1") -> dict:
    return {"id": qid, "question": "q?", "answers": [{"text": text, "answer_start": start}]}


def _squad(path: Path, qas: list[dict], context: str = "The cat sat on the mat.") -> Path:
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


def test_negative_answer_start_is_refused(tmp_path: Path) -> None:
    """``context[-4:-1] == 'mat'``: a negative offset passed the check and gave a span before the context."""
    path = _squad(tmp_path / "s.json", [_qa("mat", -4)])
    with pytest.raises(TextDataError, match=r"'mat' is not at offset -4 \(it occurs at offset\(s\) \[19\]"):
        load_squad_json(path)


def test_answer_offset_error_says_where_the_answer_is(tmp_path: Path) -> None:
    """Offsets counted in UTF-8 bytes (one past the character offset after an 'é')."""
    path = _squad(tmp_path / "s.json", [_qa("mat", 20)], context="Thé cat sat on the mat.")
    with pytest.raises(TextDataError, match=r"not at offset 20 \(it occurs at offset\(s\) \[19\]; answer_st"):
        load_squad_json(path)
    path = _squad(tmp_path / "n.json", [_qa("dog", 4)])
    with pytest.raises(TextDataError, match=r"it does not occur in the context"):
        load_squad_json(path)


def test_duplicate_question_ids_are_refused(tmp_path: Path) -> None:
    """Predictions and references are dicts keyed by id: a repeated id scored one question of the two."""
    path = _squad(tmp_path / "s.json", [_qa("cat", 4, "q1"), _qa("mat", 19, "q1")])
    with pytest.raises(TextDataError, match=r"qas\[1\]: question id 'q1' is also the id of .*qas\[0\]"):
        load_squad_json(path)
    # a file only trained on (augmented data repeats ids) is not scored: its ids need not be unique
    dev = _squad(tmp_path / "dev.json", [_qa("cat", 4, "d1")])
    data = load_qa(train_file=str(path), validation_file=str(dev))
    assert [e.id for e in data.train] == ["q1", "q1"] and [e.id for e in data.validation] == ["d1"]
    with pytest.raises(TextDataError, match="question id 'q1' is also the id of"):
        load_qa(train_file=str(path))  # (the training questions are then the ones scored)


def test_squad_with_bom_and_bad_bytes(tmp_path: Path) -> None:
    path = _squad(tmp_path / "s.json", [_qa("cat", 4)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_squad_json(path)[0].answers == (("cat", 4),)
    path.write_bytes(path.read_bytes().replace(b"mat", b"m\xe9t"))
    with pytest.raises(TextDataError, match=r"s\.json' is not valid UTF-8 \(byte 0xe9 .*line 1"):
        load_squad_json(path)


def test_a_validation_class_id_the_training_file_lacks_is_refused_unless_num_labels_says_so(
    tmp_path: Path,
) -> None:
    """The label vocabulary is the training file's, for ids as for names: a validation id beyond the training
    ids made num_labels larger (a class never trained) while the same id in a test file was an error."""
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("sentence,label\na,0\nb,1\nc,0\n")
    dev.write_text("sentence,label\nd,2\ne,1\n")
    with pytest.raises(TextDataError, match=r"record 0.*: label 2 is outside \[0, num_labels=2\) \(the "
                       r"training labels' largest id \+ 1: give num_labels"):
        load_classification_files(train, dev)
    data = load_classification_files(train, dev, num_labels=3)
    assert data.num_labels == 3 and [e.label for e in data.validation] == [2, 1]


def test_half_star_ratings_are_label_names_whole_ones_included(tmp_path: Path) -> None:
    """Whole-number texts ("1.0", "2") are class ids, except in a column whose training labels hold other
    numbers too ("1.5"): there all are names (the column was refused as mixing ids and names)."""
    train = _csv(tmp_path / "train.csv", ["a,1.0", "b,1.5", "c,2", "d,2.5", "e,1.5"])
    dev = _csv(tmp_path / "dev.csv", ["f,2", "g,1.0"])
    data = load_classification_files(train, dev, dev)
    assert data.label_names == ["1.0", "1.5", "2", "2.5"] and data.num_labels == 4
    assert [e.label for e in data.train] == [0, 1, 2, 3, 1] and [e.label for e in data.validation] == [2, 0]
    ids = load_classification_files(_csv(tmp_path / "ids.csv", ["a,0", "b,1.0", "c,2"]), dev, dev)
    assert ids.label_names is None and [e.label for e in ids.train] == [0, 1, 2]

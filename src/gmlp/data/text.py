"""Text corpora for masked-language-model pretraining: offline defaults and standard sources.

Offline sources (fetched by ``scripts/fetch_text_data.sh``; see ``docs/text_training.md``):

=============  ==============================================================================================
``pydocs``     Debian ``python3.11-doc``: the 497 ``.rst.txt`` sources of the Python docs (one document each)
``wordnet``    Debian ``wordnet-base``: 117,659 glosses of ``data.{noun,verb,adj,adv}`` (one document each)
``austen``     Debian ``r-cran-janeaustenr`` (unpacked, not installed): Austen's six novels, one document per
               chapter, read from the R lazy-load database with the ``rdata`` package
``mobydick``   Debian ``r-cran-tokenizers`` (unpacked, not installed): Moby Dick, one document per chapter
=============  ==============================================================================================

``offline`` names all four, ``books`` the last two. Other sources: a text file (split into paragraphs at
blank lines) or a folder of them (``*.txt``, ``*.text``, ``*.md``, ``*.rst``, searched recursively), a
``.json``/``.jsonl``/``.csv``/``.parquet`` file read with HF ``datasets`` (its ``text`` column), a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, and ``hf:NAME`` or ``hf:NAME:CONFIG``
(read with ``datasets.load_dataset``: a hub dataset, from the HF cache when it is there, so it works
offline with ``HF_DATASETS_OFFLINE=1`` once cached; or a local folder of parquet/json/csv/arrow files;
``hf:PATH`` of a ``save_to_disk`` folder is read with ``datasets.load_from_disk``). Of a dataset with
splits, the ``train`` split is read (the held-out split below is cut from it; the dataset's own validation
and test splits are not read).

The held-out split is deterministic: a document is held out when the hash of its text falls below
``valid_fraction`` (so it does not depend on the order, the number of sources or the machine).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "OFFLINE_SOURCES",
    "SOURCE_ALIASES",
    "TextDataError",
    "TextDocument",
    "TextSplits",
    "check_text_column",
    "data_home",
    "decode_utf8",
    "heldout_bucket",
    "iter_austen",
    "iter_documents",
    "iter_hf_text",
    "iter_moby_dick",
    "iter_python_docs",
    "iter_text_path",
    "iter_wordnet_glosses",
    "is_saved_dataset",
    "load_hf_splits",
    "load_text_splits",
    "missing_offline_sources",
    "pack_sequences",
    "read_r_lazyload",
    "read_text_file",
    "resolve_sources",
    "source_files",
    "split_documents",
]

#: The offline corpora, in the order they are read.
OFFLINE_SOURCES: tuple[str, ...] = ("pydocs", "wordnet", "austen", "mobydick")
#: Names standing for several sources.
SOURCE_ALIASES: dict[str, tuple[str, ...]] = {"offline": OFFLINE_SOURCES, "books": ("austen", "mobydick")}

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
WORDNET_DIR = Path("/usr/share/wordnet")
#: What the ``sources`` arguments take: a name or path, several of them, or None (``offline``).
SourceSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
_TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_FETCH_HINT = "run scripts/fetch_text_data.sh (it installs/downloads the offline text data)"


class TextDataError(ValueError):
    """A text source is unusable: empty, not UTF-8, missing a column, unknown name..."""


@dataclass(frozen=True)
class TextDocument:
    """One document: the unit of the held-out split."""

    source: str
    name: str
    text: str


@dataclass
class TextSplits:
    """Training and held-out documents (texts only) and where they came from."""

    train: list[str]
    validation: list[str]
    sources: list[str] = field(default_factory=list)


def data_home() -> Path:
    """The data cache: ``$GMLP_DATA`` or ``~/.cache/gmlp``."""
    return Path(os.environ.get("GMLP_DATA") or Path.home() / ".cache" / "gmlp")


def _r_data_dir(deb: str, package: str) -> Path:
    return data_home() / "text" / "deb" / deb / "usr" / "lib" / "R" / "site-library" / package / "data"


def _source_path(name: str) -> Path:
    return {
        "pydocs": PYTHON_DOCS_DIR,
        "wordnet": WORDNET_DIR / "data.noun",
        "austen": _r_data_dir("r-cran-janeaustenr", "janeaustenr") / "Rdata.rdx",
        "mobydick": _r_data_dir("r-cran-tokenizers", "tokenizers") / "Rdata.rdx",
    }[name]


def missing_offline_sources(names: Iterable[str] = OFFLINE_SOURCES) -> list[str]:
    """The offline sources among ``names`` whose files are absent on this machine."""
    return [n for n in names if not _source_path(n).exists()]


def _require(name: str) -> None:
    if missing_offline_sources([name]):
        raise FileNotFoundError(
            f"offline text source {name!r} is not available ({_source_path(name)} is missing); {_FETCH_HINT}"
        )


def _utf8_message(path: str | Path, byte: int, offset: int, line: int, column: int) -> TextDataError:
    return TextDataError(
        f"{str(path)!r} is not valid UTF-8 (byte 0x{byte:02x} at offset {offset}, line {line}, column "
        f"{column}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
    )


def _gzip_error(path: str | Path) -> TextDataError:
    return TextDataError(f"{str(path)!r} is gzip-compressed, which is not read here; unpack it (gunzip)")


def decode_utf8(path: str | Path, raw: bytes) -> str:
    """``raw`` (the bytes of ``path``) decoded as UTF-8, a leading BOM dropped.

    Raises:
        TextDataError: not UTF-8: the message names the file, the first bad byte, its offset, line and
            column (in bytes), or says that the file is gzip-compressed.
    """
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # "utf-8-sig" counts its error offsets after a BOM
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        if raw[:2] == b"\x1f\x8b":  # the gzip magic number
            raise _gzip_error(path) from err
        start = bom + err.start
        line_start = raw.rfind(b"\n", 0, start) + 1
        line = raw.count(b"\n", 0, start) + 1
        raise _utf8_message(path, raw[start], start, line, start - line_start + 1) from err


#: The first bytes of the compressed files HF ``datasets`` reads as they are: gzip, bzip2, xz, zstd, zip.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"PK\x03\x04")


def _compressed(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


def _check_utf8_file(path: str | Path, chunk_size: int = 1 << 22) -> None:
    """:func:`decode_utf8`'s check of a file of any size, read in chunks (HF ``datasets`` reads JSON and CSV
    text unchecked: a bad byte raised a bare ``UnicodeDecodeError`` while the rows were iterated)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the first byte given to decoder.decode (its buffered bytes of the last chunk included)
    line, column = 1, 1  # of that byte
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = decoder.getstate()[0]
            data = pending + chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                newlines = data.count(b"\n", 0, err.start)
                line_start = data.rfind(b"\n", 0, err.start) + 1
                col = column + err.start if newlines == 0 else err.start - line_start + 1
                raise _utf8_message(path, data[err.start], offset + err.start, line + newlines, col) from err
            if not chunk:
                return
            kept = len(decoder.getstate()[0])  # an incomplete character at the end, decoded with the next
            done = data[: len(data) - kept]
            newlines = done.count(b"\n")
            column = column + len(done) if newlines == 0 else len(done) - done.rfind(b"\n")
            line += newlines
            offset += len(done)


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file (a BOM is dropped), with errors that name the file.

    Raises:
        FileNotFoundError: no such file.
        TextDataError: the file is empty (or only whitespace), is not valid UTF-8 (the first bad byte's
            offset and line are named) or is gzip-compressed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {str(path)!r}")
    text = decode_utf8(path, path.read_bytes())
    if not text.strip():
        raise TextDataError(f"text file {str(path)!r} is empty")
    return text


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- offline sources -------------------------------------------------------------------------------------


def iter_python_docs(root: str | Path | None = None) -> Iterator[TextDocument]:
    """The Python documentation sources (``*.rst.txt``), one document per file, in sorted order."""
    root = Path(root) if root is not None else PYTHON_DOCS_DIR
    if root == PYTHON_DOCS_DIR:
        _require("pydocs")
    for path in sorted(root.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield TextDocument("pydocs", str(path.relative_to(root)), text)


def iter_wordnet_glosses(root: str | Path | None = None) -> Iterator[TextDocument]:
    """WordNet glosses: the text after the first ``|`` of each data line (license lines start with spaces)."""
    root = Path(root) if root is not None else WORDNET_DIR
    if root == WORDNET_DIR:
        _require("wordnet")
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos}"
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                offset, _, gloss = line.partition("|")
                gloss = gloss.strip()
                if gloss:
                    yield TextDocument("wordnet", f"{pos}:{offset.split(' ', 1)[0]}", gloss)


def read_r_lazyload(rdx: str | Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` records).

    The index is a gzip'd R serialization of ``list(variables = list(NAME = c(offset, length)), ...)``;
    each record is a 4-byte big-endian length followed by a zlib stream (or, for bzip2/xz databases,
    a type byte and the compressed stream) holding the R serialization of one object. Objects are
    converted with the ``rdata`` package (character vectors become numpy string arrays).
    """
    import rdata

    rdx = Path(rdx)
    rdb = rdx.with_suffix(".rdb")

    def parse(data: bytes) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" on bare streams
            return rdata.conversion.convert(rdata.parser.parse_data(data, expand_altrep=True))

    raw = rdx.read_bytes()
    index = parse(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    blob = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", record[:4])
        body = record[4:]
        kind = body[:1]
        if kind == b"Z":
            import lzma

            data = lzma.decompress(body[1:])
        elif kind == b"2":
            import bz2

            data = bz2.decompress(body[1:])
        elif kind == b"0":
            data = body[1:]
        else:
            data = zlib.decompress(body)
        if len(data) != size:
            raise TextDataError(f"{rdb}: record {name!r} is corrupt ({len(data)} bytes, expected {size})")
        out[str(name)] = parse(data)
    return out


@functools.lru_cache(maxsize=4)
def _read_r_lazyload_at(rdx: str, stamp: tuple[int, int]) -> dict[str, Any]:
    return read_r_lazyload(rdx)


def _read_r_cached(rdx: Path) -> dict[str, Any]:
    """:func:`read_r_lazyload`, cached while the files are unchanged (parsing Austen takes ~1 s)."""
    st = Path(rdx).with_suffix(".rdb").stat()
    return _read_r_lazyload_at(str(rdx), (st.st_mtime_ns, st.st_size))


_CHAPTER = re.compile(r"(?im)^[ \t]*(chapter[ \t]+(?:[ivxlc]+|\d+)\b.*|epilogue[ \t]*)$")


def _chapters(book: str, text: str) -> Iterator[TextDocument]:
    marks = [m.start() for m in _CHAPTER.finditer(text)]
    bounds = [0, *marks, len(text)] if marks and marks[0] > 0 else [*(marks or [0]), len(text)]
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        chunk = "\n\n".join(_paragraphs(text[a:b]))
        if chunk:
            yield TextDocument(book.split(":")[0], f"{book}:{k:03d}", chunk)


def iter_austen(data_dir: str | Path | None = None) -> Iterator[TextDocument]:
    """Jane Austen's six novels (``janeaustenr``), one document per chapter."""
    rdx = Path(data_dir) / "Rdata.rdx" if data_dir is not None else _source_path("austen")
    if data_dir is None:
        _require("austen")
    for title, lines in sorted(_read_r_cached(rdx).items()):
        yield from _chapters(f"austen:{title}", "\n".join(str(x) for x in lines))


def iter_moby_dick(data_dir: str | Path | None = None) -> Iterator[TextDocument]:
    """Moby Dick (``tokenizers`` R package), Project Gutenberg header and licence removed, one document per
    chapter."""
    rdx = Path(data_dir) / "Rdata.rdx" if data_dir is not None else _source_path("mobydick")
    if data_dir is None:
        _require("mobydick")
    text = "\n".join(str(x) for x in _read_r_cached(rdx)["mobydick"]).lstrip("\ufeff")
    text = text.replace("\r\n", "\n")
    start = re.search(r"(?m)^\*\*\* ?START OF.*$", text)
    end = re.search(r"(?m)^\*\*\* ?END OF.*$", text)
    text = text[start.end() if start else 0 : end.start() if end else len(text)]
    yield from _chapters("mobydick:mobydick", text)


# --- user sources ----------------------------------------------------------------------------------------


def _hidden(relative: Path) -> bool:
    """Whether a path inside a folder is hidden or in a hidden folder (``.ipynb_checkpoints/x-checkpoint.txt``
    copies, macOS ``._x.txt`` resource forks (binary), ``.git``, ``.venv``)."""
    return any(part.startswith(".") for part in relative.parts)


def _folder_text_files(path: Path) -> list[Path]:
    """The text files :func:`iter_text_path` reads of the folder ``path``, in its order."""
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.name.lower().endswith(_TEXT_SUFFIXES) and not _hidden(p.relative_to(path))
    )
    if not files:
        raise TextDataError(f"folder {str(path)!r} holds no text files ({', '.join(_TEXT_SUFFIXES)})")
    return files


def iter_text_path(path: str | Path) -> Iterator[TextDocument]:
    """Documents of a local text file (its blank-line separated paragraphs) or of a folder of text files
    (hidden files and folders, whose names start with ``.``, left out).

    Raises:
        FileNotFoundError: the path does not exist.
        TextDataError: a file is empty or not UTF-8; a folder holds no text file.
    """
    path = Path(path)
    if path.is_dir():
        for file in _folder_text_files(path):
            for k, para in enumerate(_paragraphs(read_text_file(file))):
                yield TextDocument(str(path), f"{file.relative_to(path)}:{k}", para)
    elif path.is_file():
        for k, para in enumerate(_paragraphs(read_text_file(path))):
            yield TextDocument(str(path), f"{path.name}:{k}", para)
    else:
        raise FileNotFoundError(f"text source not found: {str(path)!r} is neither a file nor a folder")


#: The files ``Dataset.save_to_disk`` (``state.json``) and ``DatasetDict.save_to_disk``
#: (``dataset_dict.json``) write into their folder (:func:`gmlp.data.folders.hf_source` tells one so too).
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path).expanduser()
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def _hf_spec(source: str) -> tuple[str, str | None]:
    """``(name or path, config)`` of ``hf:NAME[:CONFIG]`` / ``hf:PATH`` (a local folder whose name holds a
    ``:`` is taken whole) or of a bare path."""
    spec = source[3:] if source.startswith("hf:") else source
    if spec.startswith("~"):  # "~/data" from a recipe file, which no shell expanded (no hub name is)
        spec = os.path.expanduser(spec)
    if Path(spec).exists():
        return spec, None
    name, _, config = spec.partition(":")
    if name.startswith("~"):
        name = os.path.expanduser(name)
    return name, config or None


def _offline_setting() -> str | None:
    """The environment variable that puts HF ``datasets`` offline (``HF_DATASETS_OFFLINE=1``...), if set."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def _empty_saved_splits(path: Path) -> list[str]:
    """The splits of a ``save_to_disk`` folder whose ``state.json`` lists no data file (0 rows)."""
    import json

    states = [path / "state.json"] if (path / "state.json").is_file() else sorted(path.glob("*/state.json"))
    empty = []
    for state in states:
        try:
            if not json.loads(state.read_text(encoding="utf-8")).get("_data_files"):
                empty.append(state.parent.name if state.parent != path else "train")
        except (OSError, ValueError, AttributeError):
            continue
    return empty


def load_hf_splits(source: str) -> dict[str, Any]:
    """The splits (name -> ``datasets.Dataset``) of an ``hf:`` source or of a ``save_to_disk`` folder.

    ``source``: ``hf:NAME[:CONFIG]`` (``datasets.load_dataset(NAME, CONFIG)``: a hub dataset, read from the
    HF cache when it is there, so offline too; or a local folder of data files, as ``load_dataset(PATH)``
    reads it), or ``hf:PATH`` / ``PATH`` of a folder written by ``Dataset.save_to_disk`` (one split, named
    ``train``) or ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``).

    Raises:
        FileNotFoundError: a local path (``/``, ``./``, ``../``, ``~``) that does not exist, or a local folder
            that holds no data files.
        ConnectionError: a hub dataset that is neither in the HF cache nor reachable; the message names the
            source and, when offline mode is on, the setting (``HF_DATASETS_OFFLINE=1``) that keeps it from
            being downloaded.
        TextDataError: a local dataset that cannot be read (the message names it and why).
    """
    import datasets

    name, config = _hf_spec(source)
    path = Path(name)
    if is_saved_dataset(path):
        if config is not None:
            raise TextDataError(
                f"{source}: {name!r} is a save_to_disk folder, which has no config {config!r}"
            )
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # a damaged folder (a missing arrow file, bad JSON...), or an empty split
            empty = _empty_saved_splits(path)
            if empty:  # (save_to_disk writes no arrow file for 0 rows, and load_from_disk fails on it)
                raise TextDataError(
                    f"{source}: the save_to_disk folder {name!r} holds no rows (split(s) "
                    f"{', '.join(empty)} empty)"
                ) from err
            raise TextDataError(
                f"{source}: cannot read the save_to_disk folder {name!r}: {type(err).__name__}: {err}"
            ) from err
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    local = path.exists()
    if not local and name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{source}: folder {name!r} does not exist")
    if path.is_file():  # (datasets: "Couldn't find any data file at ...", of a file that is there)
        raise TextDataError(f"{source}: hf: takes a hub dataset name or a folder, and {name!r} is a file; "
                            f"give the file without hf: (.json/.jsonl/.csv/.parquet are read with datasets)")
    try:
        loaded = datasets.load_dataset(name, config)
    except ConnectionError as err:  # not cached, and offline or the hub unreachable
        if getattr(err, "errno", None) is not None:  # an OS error (a reset socket...): not that
            raise
        what = f"dataset {name!r}" + (f" (config {config!r})" if config else "")
        setting = _offline_setting()
        if setting is not None:
            raise ConnectionError(
                f"{source}: {what} is not in the local Hugging Face cache, and {setting} keeps it from being "
                f"downloaded"
            ) from err
        raise ConnectionError(
            f"{source}: {what} is not cached and the Hub cannot be reached ({err})"
        ) from err
    except FileNotFoundError as err:
        if not local:  # a hub dataset that does not exist (online): its own message
            raise
        raise FileNotFoundError(f"{source}: {err}") from err
    except Exception as err:
        if not local:
            raise
        if "corresponds to no data" in str(err):  # ('Instruction "train" corresponds to no data!')
            raise TextDataError(f"{source}: a split of {name!r} holds no rows ({err})") from err
        raise TextDataError(f"{source}: cannot read {name!r}: {type(err).__name__}: {err}") from err
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def check_text_column(ds: Any, column: str, where: str, flag: str = "--text-column") -> None:
    """Refuse a ``datasets.Dataset`` whose ``column`` is missing or holds no strings (a list column, numbers):
    their ``str()`` (``"['a', 'b']"``, ``"3"``) was silently taken as the text.

    Raises:
        TextDataError: naming ``where``, the column, its type and ``flag``.
    """
    import datasets

    if column not in ds.column_names:
        raise TextDataError(
            f"{where} has no column {column!r}; available columns: {', '.join(ds.column_names)} "
            f"(choose one with {flag})"
        )
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise TextDataError(
            f"{where}: column {column!r} holds {kind} values ({feature}), not text; {flag} must name a "
            f"column of strings"
        )


def _iter_hf_dataset(ds: Any, text_column: str, label: str) -> Iterator[TextDocument]:
    """The non-empty texts of ``ds[text_column]`` (None and blank values left out)."""
    check_text_column(ds, text_column, label)
    found = False
    for k, text in enumerate(ds[text_column]):
        if text is not None and text.strip():
            found = True
            yield TextDocument(label, str(k), text.strip())
    if not found:
        raise TextDataError(
            f"{label}: column {text_column!r} holds no text ({len(ds)} rows, all empty or None)"
        )


def _iter_hf_source(source: str, text_column: str, split: str = "train") -> Iterator[TextDocument]:
    """The documents of an ``hf:`` source or ``save_to_disk`` folder: its ``split`` (``train``)."""
    splits = load_hf_splits(source)
    if split not in splits:
        raise TextDataError(
            f"{source} has no {split!r} split (splits: {', '.join(splits) or 'none'}); the corpus is read "
            f"from the {split!r} split"
        )
    yield from _iter_hf_dataset(splits[split], text_column, source)


def iter_hf_text(
    name: str, config: str | None = None, *, split: str = "train", text_column: str = "text", **kwargs: Any
) -> Iterator[TextDocument]:
    """Rows of a HF ``datasets`` dataset (hub name, local data folder or ``save_to_disk`` folder, see
    :func:`load_hf_splits`; or a builder such as ``"json"`` with ``data_files=``; a JSON file holding
    ``{"data": [records]}`` is read from its ``data`` list).

    Raises:
        TextDataError: the dataset has no ``text_column`` (the message lists its columns), it holds no
            strings (a list column, numbers) or no text at all, there is no ``split``; a local ``data_files``
            file is empty, unreadable or (JSON, CSV) not UTF-8 (the message names it).
        FileNotFoundError, ConnectionError: see :func:`load_hf_splits`.
    """
    if not kwargs and re.fullmatch(r"[\w.-]+", split):  # (a slice, "train[:5]", is load_dataset's to read)
        yield from _iter_hf_source(f"hf:{name}" + (f":{config}" if config else ""), text_column, split)
        return
    from datasets import load_dataset

    files = kwargs.get("data_files")
    if isinstance(files, (str, os.PathLike)) and Path(files).is_file():
        if Path(files).stat().st_size == 0:
            raise TextDataError(f"data file {str(files)!r} is empty")
        if name in ("json", "csv") and not _compressed(files):  # (datasets unpacks .gz/.bz2/.xz/.zst itself)
            _check_utf8_file(files)
    try:
        ds = load_dataset(name, config, split=split, **kwargs)
    except Exception as err:
        if files is None:  # a hub dataset: its own error (network, unknown name...)
            raise
        if "corresponds to no data" in str(err):
            raise TextDataError(f"data file {str(files)!r} holds no rows") from err
        reason = err.__cause__ or err
        raise TextDataError(
            f"cannot read {str(files)!r} as {name}: {type(reason).__name__}: {reason}"
        ) from err
    label = kwargs.get("data_files", name)
    if name == "json" and files is not None and "field" not in kwargs and text_column not in ds.column_names \
            and "data" in ds.column_names and len(ds) == 1:  # {"data": [records], ...}: SQuAD's layout
        yield from iter_hf_text(name, config, split=split, text_column=text_column, field="data", **kwargs)
        return
    # a local file is named by its path (several table sources: which one lacks the column)
    what = f"data file {str(files)!r}" if files is not None else f"dataset {name!r}"
    for doc in _iter_hf_dataset(ds, text_column, what):
        yield TextDocument(str(label), doc.name, doc.text)


def resolve_sources(sources: SourceSpec) -> list[str]:
    """Expand aliases (``offline``, ``books``) and comma-separated lists into a list of source names (a
    ``pathlib.Path`` is taken as one source)."""
    if sources is None:
        sources = ["offline"]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[str] = []
    for spec in sources:
        for part in (p.strip() for p in str(spec).split(",")):
            if part:
                out.extend(SOURCE_ALIASES.get(part, (part,)))
    if not out:
        raise TextDataError("no text source given")
    return out


def iter_documents(
    sources: SourceSpec = None, *, text_column: str = "text"
) -> Iterator[TextDocument]:
    """The documents of each source in turn (see the module docstring for the source names)."""
    for source in resolve_sources(sources):
        if source == "pydocs":
            yield from iter_python_docs()
        elif source == "wordnet":
            yield from iter_wordnet_glosses()
        elif source == "austen":
            yield from iter_austen()
        elif source == "mobydick":
            yield from iter_moby_dick()
        elif source.startswith("hf:") or is_saved_dataset(source):
            yield from _iter_hf_source(source, text_column)
        else:
            path = Path(source).expanduser()
            suffix = path.suffix.lower()
            if suffix in _TABLE_SUFFIXES and path.is_file():
                yield from iter_hf_text(
                    _TABLE_SUFFIXES[suffix], data_files=str(path), text_column=text_column, split="train"
                )
            elif path.exists():
                yield from iter_text_path(path)
            else:
                raise _unknown_source(source)


def _unknown_source(source: str) -> FileNotFoundError:
    known = ", ".join([*OFFLINE_SOURCES, *SOURCE_ALIASES])
    return FileNotFoundError(
        f"text source {source!r} is neither a known corpus ({known}), 'hf:NAME[:CONFIG]', 'hf:PATH', nor an "
        f"existing file or folder"
    )


def source_files(source: str) -> tuple[str, Path, list[Path]] | None:
    """What :func:`iter_documents` reads of one resolved source (see :func:`resolve_sources`): ``(kind,
    root, files)``, the files in the order they are read (``kind`` tells how: ``pydocs``, ``wordnet``,
    ``austen``, ``mobydick``, ``text``, ``table:json`` / ``csv`` / ``parquet``, ``hf:disk`` (a
    ``save_to_disk`` folder) / ``hf:folder[:CONFIG]`` (a local folder read by ``load_dataset``): every file of
    the folder but hidden ones, a superset of what is read; the files' names relative to ``root`` order a
    folder). None for ``hf:NAME`` hub datasets (no local files to tell them by).

    Raises:
        FileNotFoundError: as :func:`iter_documents` (offline data not fetched, a path that does not exist).
        TextDataError: a folder that holds no text files.
    """
    if source in OFFLINE_SOURCES:
        _require(source)
        if source == "pydocs":
            return source, PYTHON_DOCS_DIR, sorted(PYTHON_DOCS_DIR.rglob("*.rst.txt"))
        if source == "wordnet":
            return source, WORDNET_DIR, [WORDNET_DIR / f"data.{p}" for p in ("noun", "verb", "adj", "adv")]
        rdx = _source_path(source)
        return source, rdx.parent, [rdx, rdx.with_suffix(".rdb")]
    if source.startswith("hf:") or is_saved_dataset(source):
        name, config = _hf_spec(source)
        path = Path(name)
        if not path.is_dir() or (config is not None and is_saved_dataset(path)):
            return None  # a hub dataset (or a data file: load_dataset reads one by its builder's rules)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        kind = "hf:disk" if is_saved_dataset(path) else "hf:folder" + (f":{config}" if config else "")
        return kind, path, files
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES and path.is_file():
        return f"table:{_TABLE_SUFFIXES[suffix]}", path.parent, [path]
    if path.is_dir():
        return "text", path, _folder_text_files(path)
    if path.is_file():
        return "text", path.parent, [path]
    raise _unknown_source(source)


def heldout_bucket(text: str) -> float:
    """A deterministic number in [0, 1) from the document's text (blake2b): held out if < valid_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(docs: Iterable[TextDocument | str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Split documents into (train, validation) texts by :func:`heldout_bucket`.

    With ``valid_fraction > 0`` and at least two distinct texts, neither split is empty: if no document
    falls below the threshold, the text with the smallest bucket is held out; if every one does, the text
    with the largest bucket is kept for training. Copies of a text always land in the same split.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    texts = [d.text if isinstance(d, TextDocument) else d for d in docs]
    buckets = [heldout_bucket(t) for t in texts]
    held = [b < valid_fraction for b in buckets]
    if valid_fraction > 0 and len(set(texts)) >= 2:
        if not any(held):  # every copy of the text with the smallest bucket (a copy in train would leak)
            lowest = min(buckets)
            held = [b == lowest for b in buckets]
        elif all(held):
            highest = max(buckets)
            held = [b != highest for b in buckets]
    train = [t for t, h in zip(texts, held, strict=True) if not h]
    valid = [t for t, h in zip(texts, held, strict=True) if h]
    return train, valid


def load_text_splits(
    sources: SourceSpec = None,
    *,
    valid_fraction: float = 0.01,
    max_documents: int | None = None,
    max_chars: int | None = None,
    text_column: str = "text",
) -> TextSplits:
    """Read the sources and split them into training and held-out texts.

    Args:
        sources: source names / paths (see the module docstring); default ``offline``.
        valid_fraction: expected fraction of documents held out (deterministic, by text hash).
        max_documents: stop after this many documents (all sources together).
        max_chars: stop once this many characters have been read.
        text_column: the text column of table / HF sources.

    Raises:
        FileNotFoundError: a source is missing (offline data not fetched, path absent).
        TextDataError: a source is empty or unreadable, or nothing was read.
    """
    names = resolve_sources(sources)
    docs: list[str] = []  # the texts only: a TextDocument and its name cost ~200 bytes more per document
    chars = 0
    for doc in iter_documents(names, text_column=text_column):
        if (max_documents is not None and len(docs) >= max_documents) or (
            max_chars is not None and chars >= max_chars
        ):
            break
        docs.append(doc.text)
        chars += len(doc.text)
    if not docs:
        raise TextDataError(f"no text read from {', '.join(names)}")
    train, valid = split_documents(docs, valid_fraction)
    return TextSplits(train=train, validation=valid, sources=names)


def pack_sequences(
    token_ids: Iterable[Sequence[int] | np.ndarray],
    seq_len: int,
    *,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    drop_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack tokenized documents into ``[CLS] ... [SEP]`` blocks of exactly ``seq_len`` tokens.

    Documents are concatenated with ``[SEP]`` between them and cut into pieces of ``seq_len - 2`` tokens;
    the last, shorter piece is right-padded with ``pad_id`` (its attention mask is 0 there) unless
    ``drop_last``.

    Returns:
        ``(input_ids, attention_mask)``, both int64 of shape ``[num_blocks, seq_len]``.

    Raises:
        ValueError: ``seq_len`` is not an int >= 3, or a document is not a flat sequence of token ids.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3 (room for [CLS], a token and [SEP]), got {seq_len!r}")
    seq_len = int(seq_len)
    # The documents are kept as given (an int32 array is not copied) and written straight into their
    # blocks, with no int64 copy of each document and of their concatenation: for int32 input the peak
    # was 36 bytes per token (input 4, the two copies 16, the two outputs 16), now 20.
    docs: list[np.ndarray] = []
    total = 0  # tokens of the stream: the documents and the [SEP] between them
    for k, ids in enumerate(token_ids):
        doc = np.asarray(ids)
        if doc.ndim != 1:
            raise ValueError(
                f"token_ids: document {k} has shape {doc.shape}; token_ids must hold one flat sequence of "
                f"token ids per document (a list of lists, not one list of ids or a [1, n] batch)"
            )
        if len(doc) == 0:
            continue
        total += len(doc) + (1 if docs else 0)
        docs.append(doc)
    body = seq_len - 2
    n_full, rest = divmod(total, body)
    n = n_full + (1 if rest and not drop_last else 0)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    if n == 0:
        return input_ids, mask
    bodies = input_ids.numpy()[:, 1:-1]  # a view: stream position p is bodies[p // body, p % body]
    limit = n * body  # (drop_last: the tail beyond the full blocks is not written)
    sep = np.array([sep_id], dtype=np.int64)
    pos = 0
    for k, doc in enumerate(docs):
        for piece in (sep, doc) if k else (doc,):
            end = min(pos + len(piece), limit)
            if end > pos:
                _write_stream(bodies, piece[: end - pos], pos)
            pos += len(piece)
    input_ids[:, 0] = cls_id
    input_ids[:n_full, -1] = sep_id
    mask[:n_full] = 1
    if n > n_full:
        input_ids[-1, 1 + rest] = sep_id
        mask[-1, : rest + 2] = 1
    return input_ids, mask


def _write_stream(bodies: np.ndarray, piece: np.ndarray, pos: int) -> None:
    """Write ``piece`` at position ``pos`` of the stream laid out row by row in ``bodies`` ([rows, body]): the
    end of the row it starts in, the whole rows it covers (one reshaped assignment), the start of the last."""
    body = bodies.shape[1]
    row, col = divmod(pos, body)
    head = min(len(piece), body - col) if col else 0
    if head:
        bodies[row, col : col + head] = piece[:head]
        row += 1
    whole = (len(piece) - head) // body
    if whole:
        bodies[row : row + whole] = piece[head : head + whole * body].reshape(whole, body)
        row += whole
    tail = piece[head + whole * body :]
    if len(tail):
        bodies[row, : len(tail)] = tail

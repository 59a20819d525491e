"""An on-disk cache of the packed token blocks of MLM pretraining (``gmlp pretrain``).

Reading, tokenizing and packing a corpus takes minutes on a real one, at every start and resume, and every
process of a multi-process job held its own copy of the blocks. An entry of this cache holds the packed
blocks of both splits as ``.npy`` files, read back with memory-mapping (``mmap_mode="r"``): the processes of
a job share one copy in the page cache, and a hit reads no corpus text at all.

**Key** (:func:`cache_key`), as HF ``datasets`` fingerprints a ``map``: everything that decides the blocks.
The corpus by content (:func:`corpus_fingerprint`: a streaming blake2b of the bytes of every file the sources
read, with the names inside a folder, which order its documents; not by path, size or mtime), the split
settings (``valid_fraction``, ``max_documents``, ``max_chars``, ``text_column``), the tokenizer's whole
serialization (its ``tokenizer.json``: normalizer, pre-tokenizer, model, vocabulary, added tokens,
truncation, padding) and the ``[CLS]`` / ``[SEP]`` / ``[PAD]`` ids, ``seq_len``, :data:`FORMAT_VERSION`,
the gmlp version and the source code of the corpus readers and packer (:mod:`gmlp.data.text`) and of this
module. A changed input is another key, so it never meets a stale entry. A local ``hf:`` source, a
``save_to_disk`` folder or a folder of data files read by ``datasets.load_dataset``, is keyed by every file
of the folder (hidden ones left out, as ``datasets`` leaves them out), with the ``:CONFIG`` it names: a
superset of what is read, so an edit anywhere is a miss, never a stale hit. An ``hf:NAME`` hub dataset has
no local files to tell it by (the HF cache holds whatever revision was downloaded last): a corpus with one
is not cached.

**Entry** ``DIR/tokens-<key>/``: ``train.npy`` and ``validation.npy`` (``[blocks, seq_len]``, int32: token ids
fit, half of :func:`~gmlp.data.text.pack_sequences`' int64) and ``meta.json``, each written atomically
(:func:`gmlp.utils.io.atomic_write`), ``meta.json`` last: it names the key, the arrays' shapes and dtype and
the blake2b digest of each file, so a reader never takes a half-written entry, and a truncated or corrupt
file is found (:class:`TokenCacheError`) and rebuilt, not read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import atomic_write
from .text import SourceSpec, resolve_sources, source_files

__all__ = [
    "FORMAT_VERSION",
    "TokenBlocks",
    "TokenCacheError",
    "cache_key",
    "corpus_fingerprint",
    "encode_texts",
    "entry_dir",
    "load_or_build",
    "read_entry",
    "write_entry",
]

#: Bump when what an entry holds, or how the blocks are made, changes in a way the key does not see.
FORMAT_VERSION = 1
_SPLITS = ("train", "validation")
_META = "meta.json"
_PREFIX = "tokens-"
_CHUNK = 1 << 22


class TokenCacheError(ValueError):
    """A cache entry is there but unusable: a file missing, truncated or corrupt, or not of its key."""


@dataclass
class TokenBlocks:
    """The packed blocks of both splits (``[blocks, seq_len]`` integer arrays: in memory, or read-only
    memory maps of a cache entry) and the number of documents each came from."""

    train: np.ndarray
    validation: np.ndarray
    train_documents: int
    validation_documents: int


def encode_texts(tokenizer: Any, texts: Sequence[str], chunk: int = 2000) -> list[np.ndarray]:
    """Token ids of each text (no special tokens: the blocks add them), as compact int32 arrays, encoded in
    parallel chunks by the tokenizer's backend (a ``PreTrainedTokenizerFast``)."""
    backend = tokenizer.backend_tokenizer
    out: list[np.ndarray] = []
    for i in range(0, len(texts), chunk):
        batch = backend.encode_batch(list(texts[i : i + chunk]), add_special_tokens=False)
        out.extend(np.asarray(e.ids, dtype=np.int32) for e in batch)
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _update(h: Any, *parts: str | bytes) -> None:
    """Feed ``parts`` to ``h``, each with its length first (no two sequences of parts feed the same bytes)."""
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)


def corpus_fingerprint(sources: SourceSpec) -> str | None:
    """A blake2b digest of the contents of every file the ``sources`` read (in reading order, with their
    names relative to the source's folder); None when a source is an ``hf:NAME`` hub dataset (no local
    files; a local ``hf:PATH`` folder or ``save_to_disk`` folder is hashed whole).

    Raises:
        FileNotFoundError, TextDataError: as :func:`gmlp.data.text.load_text_splits` for a missing source.
    """
    h = hashlib.blake2b(digest_size=32)
    for source in resolve_sources(sources):
        found = source_files(source)
        if found is None:
            return None
        kind, root, files = found
        _update(h, "source", kind, str(len(files)))
        for file in files:
            _update(h, file.relative_to(root).as_posix(), _file_digest(file))
    return h.hexdigest()


def _code_digest() -> str:
    """The source code that makes the blocks: the readers and packer, and this module (encoding)."""
    from . import text

    h = hashlib.blake2b(digest_size=16)
    for module_file in (text.__file__, __file__):
        with contextlib.suppress(OSError, TypeError):  # (a frozen install without sources: the version)
            h.update(Path(module_file).read_bytes())
    return h.hexdigest()


def cache_key(
    *,
    corpus: str,
    tokenizer: Any,
    special_ids: Mapping[str, int],
    seq_len: int,
    valid_fraction: float,
    max_documents: int | None,
    max_chars: int | None,
    text_column: str,
) -> tuple[str, dict[str, Any]]:
    """The key of the blocks of a corpus (``corpus``: its :func:`corpus_fingerprint`) split, tokenized and
    packed with these settings; and the settings it was made of (the tokenizer by its digest), as a record.

    Returns:
        ``(key, inputs)``: ``key`` is 64 hex digits.
    """
    from .. import __version__

    serialized = tokenizer.backend_tokenizer.to_str()
    inputs = {
        "format": FORMAT_VERSION,
        "gmlp": __version__,
        "code": _code_digest(),
        "corpus": corpus,
        "valid_fraction": float(valid_fraction),
        "max_documents": max_documents,
        "max_chars": max_chars,
        "text_column": text_column,
        "tokenizer": hashlib.blake2b(serialized.encode("utf-8"), digest_size=32).hexdigest(),
        "special_ids": {k: int(special_ids[k]) for k in ("cls", "sep", "pad")},
        "seq_len": int(seq_len),
    }
    key = hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode("utf-8"), digest_size=32).hexdigest()
    return key, inputs


def entry_dir(cache_dir: str | Path, key: str) -> Path:
    """The folder of the entry of ``key`` in ``cache_dir``."""
    return Path(cache_dir) / f"{_PREFIX}{key[:32]}"


def _compact(blocks: np.ndarray) -> np.ndarray:
    """``blocks`` as int32 when every id fits (always for a real vocabulary), else int64; C-contiguous."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2:
        raise ValueError(f"token blocks must be a [blocks, seq_len] array, got shape {blocks.shape}")
    info = np.iinfo(np.int32)
    fits = blocks.size == 0 or (int(blocks.min()) >= info.min and int(blocks.max()) <= info.max)
    return np.ascontiguousarray(blocks, dtype=np.int32 if fits else np.int64)


def write_entry(
    cache_dir: str | Path, key: str, blocks: TokenBlocks, inputs: Mapping[str, Any] | None = None
) -> Path:
    """Write ``blocks`` as the entry of ``key`` (replacing one that is there); return its folder.

    Each file is written atomically and ``meta.json`` last, so a reader that finds ``meta.json`` finds the
    arrays it describes. Two writers of one key (runs sharing a cache folder) write the same bytes.

    Raises:
        OSError: the folder cannot be written (naming the file).
    """
    entry = entry_dir(cache_dir, key)
    entry.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}
    for split in _SPLITS:
        data = _compact(getattr(blocks, split))
        path = entry / f"{split}.npy"
        with atomic_write(path) as tmp, open(tmp, "wb") as f:  # (a file object: np.save adds no ".npy")
            np.save(f, data, allow_pickle=False)
        arrays[split] = {"shape": list(data.shape), "dtype": data.dtype.name, "blake2b": _file_digest(path)}
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "arrays": arrays,
        "documents": {"train": int(blocks.train_documents), "validation": int(blocks.validation_documents)},
        "inputs": dict(inputs or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_write(entry / _META) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return entry


def read_entry(cache_dir: str | Path, key: str, *, verify: bool = True) -> TokenBlocks | None:
    """The blocks of the entry of ``key``, as read-only memory maps; None when there is no entry.

    ``verify`` checks each file's blake2b digest against ``meta.json`` (it reads the files once, which also
    brings them into the page cache); without it, their shape and dtype only (a truncated file is found
    either way).

    Raises:
        TokenCacheError: the entry is there but unusable (it says why).
    """
    entry = entry_dir(cache_dir, key)
    meta_path = entry / _META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            raise TokenCacheError(f"{_META} names another key or format ({meta.get('format')!r})")
        arrays, documents = meta["arrays"], meta["documents"]
        out: dict[str, np.ndarray] = {}
        for split in _SPLITS:
            path, want = entry / f"{split}.npy", arrays[split]
            if verify and _file_digest(path) != want["blake2b"]:
                raise TokenCacheError(f"{path.name} does not match its digest (corrupt or truncated)")
            data = np.load(path, mmap_mode="r", allow_pickle=False)
            if list(data.shape) != list(want["shape"]) or data.dtype.name != want["dtype"]:
                raise TokenCacheError(
                    f"{path.name} holds {data.dtype.name} {list(data.shape)}, {_META} says {want['dtype']} "
                    f"{want['shape']}"
                )
            out[split] = data
        return TokenBlocks(out["train"], out["validation"], int(documents["train"]),
                           int(documents["validation"]))
    except TokenCacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # unreadable, bad JSON or .npy
        raise TokenCacheError(f"{type(err).__name__}: {err}") from err


def _warn(message: str) -> None:
    print(f"[gmlp] warning: {message}", file=sys.stderr)


def load_or_build(
    cache_dir: str | Path,
    key: str,
    build: Callable[[], TokenBlocks],
    *,
    inputs: Mapping[str, Any] | None = None,
    prune: bool = False,
    warn: Callable[[str], None] = _warn,
) -> tuple[TokenBlocks, bool]:
    """The entry of ``key`` (digests verified), or ``build()`` written as it and read back.

    A corrupt or truncated entry is rebuilt with one ``warn`` line. A cache folder that cannot be written
    is ``warn``-ed about and the built blocks are returned in memory (the cache only saves time). With
    ``prune`` (a folder that belongs to one run, which no other writer shares), the temporaries of a writer
    killed before are removed, and the other entries once this one is written.

    Returns:
        ``(blocks, hit)``: memory maps of the entry (in memory where it could not be written), and whether
        the entry was there.
    """
    entry = entry_dir(cache_dir, key)
    try:
        found = read_entry(cache_dir, key)
    except TokenCacheError as err:
        warn(f"token cache {str(entry)!r} is unusable ({err}); rebuilding it")
        found = None
    if found is not None:
        return found, True
    blocks = build()
    if prune:
        for stale in entry.glob(".*.tmp"):  # (a writer killed mid-file)
            with contextlib.suppress(OSError):
                stale.unlink()
    try:
        write_entry(cache_dir, key, blocks, inputs)
    except OSError as err:
        if prune:  # (a train.npy written before a full disk: many GB, useless; a shared folder's entry may be
            shutil.rmtree(entry, ignore_errors=True)  # another run's, whole: left as it is)
        warn(f"token cache {str(entry)!r} not written ({err}); the blocks stay in memory")
        return blocks, False
    if prune:
        for other in Path(cache_dir).glob(f"{_PREFIX}*"):
            if other != entry and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
    read = read_entry(cache_dir, key, verify=False)
    assert read is not None  # (just written)
    return read, False

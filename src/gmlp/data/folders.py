"""Image datasets read through PIL: ImageFolder trees, Hugging Face ``datasets``, and the offline tensors.

Each source gives random access to ``(PIL image, label)``; :class:`TransformedImages` applies a timm
transform (``timm.data.create_transform``) and seeds it per sample, so augmentation is the same whichever
worker process loads the sample and however the run was interrupted. Unreadable (corrupt) images are
skipped and counted by :func:`collate_skipping`, or raise :class:`CorruptImageError` naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import operator
import os
import random
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageSplit

__all__ = [
    "CorruptImageError",
    "FolderSource",
    "HFSource",
    "ImageSource",
    "TensorSource",
    "TransformedImages",
    "collate_skipping",
    "folder_classes",
    "hf_source",
    "image_folder_source",
    "resolve_split",
]


class CorruptImageError(ValueError):
    """An image file cannot be decoded."""


class ImageSource:
    """Random access to labelled images: ``len``, ``load(i)`` (a PIL image), ``labels``, ``classes``."""

    classes: tuple[str, ...]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"


class SubsetSource(ImageSource):
    """``n`` samples of ``source`` taken at even steps through it (``i * len // n``): an ImageFolder lists
    its files class by class, so its first ``n`` would hold only the first class or two; even steps keep
    every class in proportion, with no randomness."""

    def __init__(self, source: ImageSource, n: int) -> None:
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        self.source = source
        self.indices = [i * len(source) // n for i in range(min(n, len(source)))]
        self.labels = [source.labels[i] for i in self.indices]
        self.classes = source.classes

    def load(self, index: int) -> Any:
        return self.source.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


def subset_source(source: ImageSource, n: int | None) -> ImageSource:
    """``source`` itself when ``n`` is None or covers it, else a :class:`SubsetSource` of ``n`` samples."""
    if n is None or n >= len(source):
        return source
    return SubsetSource(source, n)


# file formats whose PIL mode "I" always holds values on a 0..65535 scale: 16-bit PNGs (mode "I" in older
# Pillow versions, "I;16" now) and 9- to 16-bit PGM/PPM files (Pillow scales their maxval to 65535)
_SIXTEEN_BIT_FORMATS = ("PNG", "PPM")


def _to_8_bit(img: Any) -> Any:
    """16-bit greyscale images (PIL modes ``I;16*``, ``I`` read from a PNG or PGM file, and other ``I`` images
    holding values above 255) scaled to 8 bits: PIL's own ``convert`` clips every value above 255, which
    turns a 16-bit photo almost white. A dark 16-bit PGM/PNG (every value <= 255 of 65535) stays dark: only an
    ``I`` image of another origin (a 32-bit TIFF, an in-memory array) with values <= 255 is taken as 8-bit
    values. Float images (mode ``F``) are refused: their range is unknown."""
    from PIL import Image

    mode = img.mode
    if mode == "F":
        raise CorruptImageError("a floating-point image (PIL mode F) has no known value range; save it as "
                                "8- or 16-bit PNG/TIFF")
    if not (mode.startswith("I;16") or mode == "I"):
        return img
    import numpy as np

    arr = np.asarray(img).astype(np.float64)
    sixteen = mode.startswith("I;16") or getattr(img, "format", None) in _SIXTEEN_BIT_FORMATS
    if not sixteen and arr.max() <= 255:  # 32-bit storage of 8-bit values: PIL's convert keeps them right
        return img
    top = 65535.0 if sixteen or arr.max() <= 65535 else float(arr.max())
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def _open_image(opener: Callable[[], Any]) -> Any:
    """The decoded image, turned upright by its EXIF orientation tag (as image viewers and ``datasets``'
    ``Image`` feature show it: a phone photo is stored sideways with a tag saying so)."""
    from PIL import Image, ImageOps

    img = opener()
    try:
        img.load()  # decode now: a truncated or corrupt file fails here, not later inside a transform
    except BaseException:
        img.close()  # a corrupt file is skipped: do not leave its handle open until garbage collection
        raise
    img = img if isinstance(img, Image.Image) else Image.open(img)
    try:
        orientation = img.getexif().get(0x0112, 1)  # the EXIF Orientation tag; 1 = upright
    except Exception:  # unreadable EXIF: the pixels are fine, keep them as stored
        orientation = 1
    if orientation != 1:
        with contextlib.suppress(Exception):  # a malformed tag: as stored, not skipped as corrupt
            upright = ImageOps.exif_transpose(img)
            if upright.format is None:  # a new image: keep the file format (_to_8_bit reads it)
                upright.format = img.format
            img = upright
    return img


def _convert(img: Any, mode: str) -> Any:
    """``img`` in ``mode`` ("L" or "RGB") with the pixels of torchvision's ``pil_loader`` + ``convert``:
    alpha dropped (not composited: a transparent pixel keeps its stored colour), CMYK, palette and 1-bit
    images converted by PIL; 16-bit images scaled first (:func:`_to_8_bit`). A palette image with per-entry
    transparency goes through RGBA, which gives the same pixels without PIL's warning ("Palette images with
    Transparency expressed in bytes should be converted to RGBA images") for each such file. A mode PIL
    turns into RGB but not straight into L (a CIELab TIFF) goes through RGB, as ``pil_loader`` does.

    An image already in ``mode`` is returned as it is: PIL's ``convert`` to the same mode is a copy of the
    pixels (0.1 ms of a 500x375 photo, 2-3% of a sample's whole load and transform) that a transform, which
    makes new images, does not need. A read-only image (one mapping another object's memory, such as
    ``Image.fromarray`` of a greyscale array) is still copied, as before."""
    img = _to_8_bit(img)
    if img.mode == mode and not img.readonly:
        return img
    if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
        img = img.convert("RGBA")
    try:
        return img.convert(mode)
    except ValueError:  # "conversion from LAB to L not supported" (it was skipped as a corrupt image)
        if mode != "L":
            raise
        return img.convert("RGB").convert("L")


def _pil_limits() -> tuple[bool, int | None]:
    """This process's PIL settings that decide whether a file is readable: ``ImageFile.LOAD_TRUNCATED_IMAGES``
    and ``Image.MAX_IMAGE_PIXELS``."""
    from PIL import Image, ImageFile

    return bool(ImageFile.LOAD_TRUNCATED_IMAGES), Image.MAX_IMAGE_PIXELS


def _set_pil_limits(limits: tuple[bool, int | None]) -> None:
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = limits


class FolderSource(ImageSource):
    """Files ``ROOT/SPLIT/CLASS/**/IMAGE``: the ``torchvision.datasets.ImageFolder`` layout.

    The paths are held as one bytes object and an array of offsets, not as a list of ``(path, label)``
    tuples: a DataLoader worker forked from the training process writes the reference count of every
    Python object it reads, so each worker came to hold its own copy of the page of every tuple and string
    it loaded (166 bytes per image measured, about 230 MB per worker for ImageNet's 1.28 M files).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], root: Path) -> None:
        encoded = [os.fsencode(path) for path, _ in samples]
        self._paths = b"".join(encoded)
        self._ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
        self.labels = [label for _, label in samples]
        self.classes = tuple(classes)
        self.root = root

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every image, in order (built on each call)."""
        return [(self.path(i), label) for i, label in enumerate(self.labels)]

    def path(self, index: int) -> str:
        """The file of sample ``index`` (negative indices count from the end)."""
        index = range(len(self.labels))[index]
        start = int(self._ends[index - 1]) if index else 0
        return os.fsdecode(self._paths[start : int(self._ends[index])])

    def load(self, index: int) -> Any:
        """The image of sample ``index``, decoded (the first frame of a multi-frame file) and upright; the
        file is closed on return (PIL kept a multi-frame file open, an MPO phone photo or a TIFF stack,
        until the image was garbage-collected), as torchvision's ``pil_loader`` does."""
        from PIL import Image

        with open(self.path(index), "rb") as f:
            return _open_image(lambda: Image.open(f))

    def describe(self, index: int) -> str:
        return repr(self.path(index))


def resolve_split(available: Sequence[str], wanted: str | None, candidates: Sequence[str], where: str) -> str:
    """``wanted`` if given (and present), else the first of ``candidates`` present; error naming ``where``."""
    if wanted is not None:
        if wanted not in available:
            found = ", ".join(available) or "nothing"
            raise FileNotFoundError(f"{where} has no split {wanted!r} (found: {found})")
        return wanted
    for name in candidates:
        if name in available:
            return name
    found = ", ".join(available) or "nothing"
    wanted_names = ", ".join(map(repr, candidates))
    raise FileNotFoundError(f"{where} has none of the splits {wanted_names} (found: {found})")


def folder_classes(directory: str | Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted: its sub-folders (symlinks followed), leaving out
    hidden ones (``.ipynb_checkpoints``, ``.git``), which torchvision's ``find_classes`` counts as classes.

    Raises:
        FileNotFoundError: ``directory`` holds no (visible) sub-folder.
    """
    return _split_classes(str(directory), None)


def _split_classes(base: str, stamps: list[tuple[str, int, int, int]] | None) -> list[str]:
    """:func:`folder_classes` of ``base``, adding to ``stamps`` (when given) what :func:`_scan_class` adds."""
    classes, links = [], []
    with os.scandir(base) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                classes.append(e.name)
            elif e.is_symlink():
                links.append(e.name)
    if not classes:
        raise FileNotFoundError(f"image folder {base!r} has no class sub-folders")
    if stamps is not None:
        st = os.stat(base)
        stamps.append((".", st.st_dev, st.st_ino, st.st_mtime_ns))
        stamps.extend((name, -1, -1, -1) for name in links)
    return sorted(classes)


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real, absolute paths)."""
    return os.path.commonpath([path, folder]) == folder


#: Bumped when the scan's rules change: a folder list written by another version is not read.
_SCAN_VERSION = 1
#: A folder modified this recently (ns) when its listing was read may change again within the same mtime
#: tick (1-2 s on some file systems) unseen: no folder list is written then.
_RACY_NS = 2_000_000_000


def _list_folder(top: str, extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """``(images, sub-folders, other symlinks)`` of ``top``: visible names only, from the listing itself.

    No file is stat-ed or opened: an entry named like an image (extension in any case) that is a symlink is
    taken as an image without following it (a symlink farm, ImageNet's usual layout, cost one ``stat`` per
    image, a network round trip each); a broken one fails when loaded, as any unreadable file (skipped and
    counted, or with ``strict`` an error naming it). Only a symlink with another name is followed to see
    whether it is a folder (``other symlinks``: those that are not)."""
    images, dirs, links = [], [], []
    with os.scandir(top) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if name.lower().endswith(extensions):
                    # the file type from the listing (d_type): no system call, unless a symlink (taken as
                    # an image file) or a file system that gives no type
                    if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                        images.append(name)
                    else:
                        dirs.append(name)
                elif entry.is_dir():  # a stat only for a symlink
                    dirs.append(name)
                elif entry.is_symlink():
                    links.append(name)
            except OSError:  # vanished while listed
                continue
    return images, dirs, links


def _scan_class(
    base: str, name: str, extensions: tuple[str, ...], stamps: list[tuple[str, int, int, int]] | None
) -> list[str]:
    """The image files under ``base/name``, relative to ``base``, in torchvision's ``make_dataset`` order
    (folders by path, files by name; extensions matched in any case), without hidden files and folders
    (``._x.jpg`` of macOS, notebook checkpoints) and without following a symlink back into its own ancestry
    (a loop listed every image again at each level, and the other classes' images under this one).

    ``stamps``: where to add ``(folder, device, inode, mtime)`` of each folder read and ``(link, -1, -1, -1)``
    of each symlink that is no folder (what :func:`_folder_list_current` checks)."""
    class_dir = os.path.join(base, name)
    listed = []
    # (folder, its path relative to base, the real paths from class_dir down to it)
    pending = [(class_dir, name, (os.path.realpath(class_dir),))]
    while pending:
        top, rel, chain = pending.pop()
        if stamps is not None:
            st = os.stat(top)
            stamps.append((rel, st.st_dev, st.st_ino, st.st_mtime_ns))
        images, dirs, links = _list_folder(top, extensions)
        if stamps is not None:
            stamps.extend((f"{rel}/{n}", -1, -1, -1) for n in links)
        for sub in dirs:
            path = os.path.join(top, sub)
            real = os.path.realpath(path)
            if not any(_is_within(seen, real) for seen in chain):
                pending.append((path, f"{rel}/{sub}", (*chain, real)))
        listed.append((rel, sorted(images)))
    listed.sort()  # (by folder: the order of their full paths, which all start with base + "/")
    return [f"{rel}/{image}" for rel, images in listed for image in images]


@dataclass
class _SplitScan:
    """What a scan of one split folder found: its class folders (sorted) and, per class, the image paths
    relative to the split folder joined by NUL (one string per class: cheap to pickle, broadcast and
    store)."""

    split: str
    classes: list[str]
    files: list[str]

    def paths(self, base: str, index: int) -> list[str]:
        joined, prefix = self.files[index], os.path.join(base, "")  # (os.path.join(base, rel) of each)
        return [prefix + rel for rel in joined.split("\0")] if joined else []


def _folder_list_file(cache_dir: Path, real_base: str, extensions: tuple[str, ...]) -> Path:
    key = json.dumps([_SCAN_VERSION, real_base, sorted(extensions)])  # (ASCII: json escapes the rest)
    return cache_dir / f"imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _folder_list_current(real_base: str, stamps: Sequence[Sequence[Any]]) -> bool:
    """Whether every folder of a stored list still has the device, inode and modification time it had (a
    file added, removed or renamed in it changes its mtime; a folder swapped for another, its inode), and
    each symlink that was no folder still is none."""
    for rel, dev, ino, mtime in stamps:
        path = os.path.join(real_base, rel)
        if dev == -1:
            if os.path.isdir(path):
                return False
            continue
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino, st.st_mtime_ns) != (dev, ino, mtime):
            return False
    return True


def _read_folder_list(file: Path, real_base: str, extensions: tuple[str, ...]) -> _SplitScan | None:
    """The stored scan in ``file`` when it was made of ``real_base`` and the tree has not changed since."""
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
        if (stored["version"], stored["base"], stored["extensions"]) != (_SCAN_VERSION, real_base,
                                                                          sorted(extensions)):
            return None
        if not _folder_list_current(real_base, stored["stamps"]):
            return None
        return _SplitScan(stored["split"], list(stored["classes"]), list(stored["files"]))
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or not ours: scan again
        return None


def _write_folder_list(file: Path, real_base: str, extensions: tuple[str, ...], scan: _SplitScan,
                       stamps: list[tuple[str, int, int, int]]) -> None:
    """``scan`` stored in ``file`` (written to a temporary file, then renamed: a reader sees the old file or
    the whole new one); a failure to write is a warning, the run goes on with its own scan."""
    text = json.dumps({"version": _SCAN_VERSION, "base": real_base, "extensions": sorted(extensions),
                       "split": scan.split, "classes": scan.classes, "files": scan.files, "stamps": stamps})
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, file)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        warnings.warn(f"image folder list not stored in {str(file)!r}: {err}", stacklevel=3)


def _scan_split(root: Path, split: str | None, candidates: Sequence[str], extensions: tuple[str, ...],
                cache_dir: Path | None) -> _SplitScan:
    """The split folder of ``root`` and its classes and images, from ``cache_dir``'s stored list when that
    is still current (a stale one is scanned again and replaced)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist (expected {root}/train/<class>/*.jpg)"
        )
    splits = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())
    split = resolve_split(splits, split, candidates, f"image folder {str(root)!r}")
    base = str(root / split)
    stamps: list[tuple[str, int, int, int]] | None = None
    if cache_dir is not None:
        real_base = os.path.realpath(base)
        file = _folder_list_file(cache_dir, real_base, extensions)
        stored = _read_folder_list(file, real_base, extensions)
        if stored is not None:
            return _SplitScan(split, stored.classes, stored.files)
        stamps = []
        started = time.time_ns()
    classes = _split_classes(base, stamps)
    files = ["\0".join(_scan_class(base, c, extensions, stamps)) for c in classes]
    scan = _SplitScan(split, classes, files)
    if stamps is not None and all(mtime < started - _RACY_NS for _, _, _, mtime in stamps):
        _write_folder_list(file, real_base, extensions, scan, stamps)
    return scan


_SHARED_ERRORS: dict[str, type[Exception]] = {
    "FileNotFoundError": FileNotFoundError,
    "NotADirectoryError": NotADirectoryError,
    "PermissionError": PermissionError,
    "ValueError": ValueError,
}


def _scan_once(scan: Callable[[], _SplitScan]) -> _SplitScan:
    """``scan()`` in process 0 of the ``torch.distributed`` group, its result (or its error) sent to every
    process (:func:`gmlp.utils.distributed.process_zero_first`: over a gloo group of their own, no GPU
    memory, a long timeout: a scan of a network file system outlasts NCCL's 10 minutes). Just ``scan()``
    without a group of several processes."""
    from ..utils.distributed import process_zero_first

    return process_zero_first(scan, what="scan the image folder", errors=_SHARED_ERRORS)[1]


def image_folder_source(
    root: str | Path,
    split: str | None,
    class_names: Sequence[str] | None = None,
    *,
    candidates: Sequence[str] = (),
    shared: bool = False,
    cache_dir: str | Path | None = None,
) -> FolderSource:
    """The images of ``root/split`` (one sub-folder per class, as torchvision's ImageFolder), in the same
    order, except that hidden files and folders (names starting with ``.``) are left out and a symlink back
    up the tree is not followed.

    The scan reads each folder's listing and nothing else: no image is opened or stat-ed. Symlinked class
    folders and sub-folders are followed; a symlink named like an image is taken as one without following
    it, so a broken link is listed, and fails when loaded like any unreadable file (skipped and counted, or
    an error naming it with ``strict``).

    Args:
        root: the dataset directory holding the split folders (e.g. ``train/`` and ``val/``).
        split: the split folder, or None for the first of ``candidates`` that exists.
        class_names: the training classes, to give a validation split the training label numbering (its
            classes must be among them); None = this split's own sorted class folders.
        shared: every process of the ``torch.distributed`` group calls this (a collective): process 0 scans
            and sends the list to the others (one scan per run instead of one per process; the same list,
            in the same order, everywhere). Without a group of several processes, a plain scan.
        cache_dir: a folder to keep the list in, reused by a later call while the tree is unchanged (every
            folder's modification time and inode are checked: O(folders), not O(files)); a tree changed
            since is scanned again. A folder modified within 2 s of the scan is not stored (a change within
            the same mtime tick could go unseen). None: scan every time.

    Raises:
        FileNotFoundError: ``root`` or the split folder is missing, or a class folder holds no image.
        ValueError: the split has a class the training split lacks.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root).expanduser()  # "~/data" from a recipe file, which no shell expanded
    extensions = tuple(IMG_EXTENSIONS)
    cache = None if cache_dir is None else Path(cache_dir).expanduser()

    def scan() -> _SplitScan:
        return _scan_split(root, split, candidates, extensions, cache)

    found = _scan_once(scan) if shared else scan()
    base = root / found.split
    classes = found.classes
    if class_names is not None:
        class_to_idx = {c: i for i, c in enumerate(class_names)}
        # a folder name in another Unicode normal form (macOS writes "é" as e + accent, NFD; most other
        # systems as one character, NFC) is the same class when it matches exactly one training class so
        composed = collections.Counter(unicodedata.normalize("NFC", c) for c in class_names)
        by_nfc = {unicodedata.normalize("NFC", c): i for i, c in enumerate(class_names)}
        for c in classes:
            nfc = unicodedata.normalize("NFC", c)
            if c not in class_to_idx and composed[nfc] == 1:
                class_to_idx[c] = by_nfc[nfc]
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ValueError(f"{str(base)!r} has classes the training split lacks: {unknown[:10]}")
    else:
        class_to_idx = {c: i for i, c in enumerate(classes)}
        class_names = classes
    empty = [c for c, joined in zip(classes, found.files, strict=True) if not joined]
    if empty:
        raise FileNotFoundError(
            f"class folder {str(base / empty[0])!r} holds no images ({len(empty)} empty class folders; "
            f"extensions read: {', '.join(IMG_EXTENSIONS)})"
        )
    samples = [(path, class_to_idx[c]) for k, c in enumerate(classes) for path in found.paths(str(base), k)]
    return FolderSource(samples, class_names, base)


class HFSource(ImageSource):
    """A Hugging Face ``datasets.Dataset`` with an image column (decoded here: bad images can be skipped)."""

    def __init__(self, ds: Any, image_key: str, labels: list[int], classes: Sequence[str], name: str) -> None:
        self.ds, self.image_key, self.labels, self.name = ds, image_key, labels, name
        self.classes = tuple(classes)

    def load(self, index: int) -> Any:
        from PIL import Image

        item = self.ds[index][self.image_key]
        if isinstance(item, Image.Image):
            return _open_image(lambda: item)
        if isinstance(item, dict) and item.get("bytes"):
            return _open_image(lambda: Image.open(io.BytesIO(item["bytes"])))
        if isinstance(item, dict) and item.get("path"):
            with open(item["path"], "rb") as f:  # closed on return (a multi-frame file stayed open)
                return _open_image(lambda: Image.open(f))
        raise CorruptImageError(f"{self.describe(index)} holds no image bytes or path")

    def describe(self, index: int) -> str:
        return f"row {index} of {self.name}"


def _load_hf(name_or_path: str, split: str | None, candidates: Sequence[str]) -> tuple[Any, str]:
    import datasets

    if name_or_path.startswith("~"):  # "~/data" from a recipe file, which no shell expanded (no hub name is)
        name_or_path = os.path.expanduser(name_or_path)
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))  # a save_to_disk directory
        if isinstance(loaded, datasets.DatasetDict):
            name = resolve_split(list(loaded), split, candidates, f"dataset {name_or_path!r}")
            return loaded[name], name
        return loaded, split or "train"
    if not path.exists() and name_or_path.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"dataset directory {name_or_path!r} does not exist")
    # a hub name, or a local directory of data files (parquet, arrow, an imagefolder tree, ...)
    available = list(datasets.get_dataset_split_names(name_or_path))
    name = resolve_split(available, split, candidates, f"dataset {name_or_path!r}")
    return datasets.load_dataset(name_or_path, split=name), name


def hf_source(
    name_or_path: str,
    split: str | None,
    *,
    image_key: str | None = None,
    label_key: str | None = None,
    class_names: Sequence[str] | None = None,
    candidates: Sequence[str] = (),
) -> HFSource:
    """An image-classification split of a Hugging Face dataset: a hub name, a local data directory, or a
    ``save_to_disk`` directory (read with ``datasets.load_from_disk``).

    The image column is the one of feature type ``Image`` (else ``image``/``img``), the label column the
    ``ClassLabel`` one (else ``label``/``labels``); ``image_key``/``label_key`` choose them explicitly.
    """
    import datasets

    ds, split_name = _load_hf(name_or_path, split, candidates)
    features = ds.features
    if image_key is None:
        image_key = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        image_key = image_key or next((k for k in ("image", "img") if k in features), None)
    if image_key is None or image_key not in features:
        raise ValueError(f"dataset {name_or_path!r}: no image column in {list(features)}; pass image_key")
    if label_key is None:
        label_key = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        label_key = label_key or next((k for k in ("label", "labels") if k in features), None)
    if label_key is None or label_key not in features:
        raise ValueError(f"dataset {name_or_path!r}: no label column in {list(features)}; pass label_key")
    if isinstance(features[image_key], datasets.Image):
        ds = ds.cast_column(image_key, datasets.Image(decode=False))
    labels = []
    for row, value in enumerate(ds[label_key]):
        try:
            label = int(value)
            if isinstance(value, float) and value != label:  # int(1.5) == 1: no class index
                raise ValueError(value)
            labels.append(label)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"dataset {name_or_path!r} split {split_name!r}: label column {label_key!r} must hold class "
                f"indices (a ClassLabel or integers); row {row} holds {value!r}"
            ) from None
    if len(labels) == 0:
        raise ValueError(f"dataset {name_or_path!r} split {split_name!r} is empty")
    feature = features[label_key]
    if class_names is None:
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        else:
            class_names = [str(i) for i in range(max(labels) + 1)]
    bad = [v for v in labels if not 0 <= v < len(class_names)]
    if bad:
        raise ValueError(
            f"dataset {name_or_path!r} split {split_name!r}: label {bad[0]} outside [0, {len(class_names)})"
        )
    return HFSource(ds, image_key, labels, class_names, f"{name_or_path} [{split_name}]")


class TensorSource(ImageSource):
    """An in-memory :class:`~gmlp.data.images.ImageSplit` served as PIL images (for PIL augmentation)."""

    def __init__(self, split: ImageSplit) -> None:
        self.split = split
        self.labels = split.labels.tolist()
        self.classes = split.classes

    def load(self, index: int) -> Any:
        from PIL import Image

        img = self.split.images[index]
        if img.shape[0] == 1:
            return Image.fromarray(img[0].numpy(), "L")
        return Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")


def _random_states() -> tuple[Any, Any, torch.Tensor]:
    """The states of Python's, NumPy's (legacy global) and torch's CPU generator."""
    return random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()


def _set_random_states(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.default_generator.set_state(states[2])


def _seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's CPU generator seeded by ``seed``. Only the CPU generator is seeded
    (``torch.manual_seed`` also reseeded every CUDA generator of the training process): the transforms draw
    on the CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generator seeded by ``seed`` inside; their states put back on exit.

    Put back: with ``num_workers=0`` the transform runs in the training process, whose own random streams
    (dropout, mixup, a user's loop) then went on from the last sample's seed, so that they, and the results,
    depended on the number of workers."""
    states = _random_states()
    _seed_all(seed)
    try:
        yield
    finally:
        _set_random_states(states)


class TransformedImages(Dataset):
    """``source`` images converted to ``mode`` ("L" or "RGB") and transformed.

    Items are addressed by an index or an ``(index, seed)`` pair; with a seed, Python's, NumPy's and
    torch's (CPU) generators are seeded for the transform and put back after it, so an item depends on its
    index and seed alone, and loading it in the caller's process (``num_workers=0``) leaves the caller's
    random streams as they were, as loading it in a worker process does. An index outside ``[-len, len)``
    raises ``IndexError``. A corrupt image gives ``None`` (skipped by
    :func:`collate_skipping`) or, with ``strict``, raises :class:`CorruptImageError` naming the file.

    What counts as corrupt follows PIL's settings of the caller's process, which gmlp never changes there: a
    truncated file is corrupt unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, an image of more than
    twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is corrupt (``DecompressionBombError``; above it, PIL warns).
    A worker process started by "spawn" or "forkserver" (macOS, Windows, Python 3.14's Linux default) began
    with PIL's defaults, which decided otherwise than ``num_workers=0``: the dataset carries the settings
    of the process that pickled it there and sets them in that worker before its first image.
    """

    def __init__(
        self, source: ImageSource, transform: Callable[[Any], torch.Tensor], mode: str, strict: bool = False
    ) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.source, self.transform, self.mode, self.strict = source, transform, mode, strict
        self._pil_limits: tuple[bool, int | None] | None = None  # to set in a spawned worker (pickled)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pil_limits"] = _pil_limits()  # this process's: a spawned worker starts with PIL's defaults
        return state

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = self._key(key)
        img = self._image(index)
        if img is None:
            return None
        if seed is None:
            return self.transform(img), self.source.labels[index]
        with _seeded(seed):
            return self.transform(img), self.source.labels[index]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int] | None]:
        """``[self[key] for key in keys]``: the same items, and the same random streams of the caller after
        it and for each unseeded item, with the generators' states saved and put back once for a run of
        seeded items instead of around each (NumPy's ``get_state``/``set_state`` alone took 0.1 ms per
        sample, 2-3% of a photo's load and transform). A DataLoader calls it for each batch (its fetcher
        uses ``__getitems__`` where a dataset has one; so does ``Subset``)."""
        out: list[tuple[torch.Tensor, int] | None] = []
        saved = None  # the caller's states while seeded items run
        try:
            for key in keys:
                index, seed = self._key(key)
                img = self._image(index)  # loading draws no random number: seeded or not, the same image
                if img is None:
                    out.append(None)
                    continue
                if seed is None:
                    if saved is not None:  # an unseeded item draws on the caller's streams, as in self[key]
                        _set_random_states(saved)
                        saved = None
                    out.append((self.transform(img), self.source.labels[index]))
                    continue
                if saved is None:
                    saved = _random_states()
                _seed_all(seed)
                out.append((self.transform(img), self.source.labels[index]))
        finally:
            if saved is not None:
                _set_random_states(saved)
        return out

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int | None]:
        """``(index, seed)`` of an item key, the index checked and made non-negative."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        # checked before loading: an index past the end (a sampler built for another dataset) raised an
        # IndexError inside the source, which was taken for a corrupt image: skipped and counted (or, with
        # strict, reported as "corrupt image sample N"), and `list(dataset)` / `for x in dataset` never ended
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(
                f"TransformedImages index must be an integer or an (index, seed) pair, got {key!r}"
            ) from None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return index % len(self), seed  # a negative index counts from the end, as for a list

    def _image(self, index: int) -> Any:
        """Sample ``index``'s image in ``self.mode``; None for a corrupt file (``CorruptImageError`` if
        strict)."""
        if getattr(self, "_pil_limits", None) is not None:  # (getattr: a dataset pickled by an older gmlp)
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:  # a DataLoader worker: its PIL settings, not the caller's
                _set_pil_limits(self._pil_limits)
            self._pil_limits = None
        try:
            return _convert(self.source.load(index), self.mode)
        except CorruptImageError as err:
            if not self.strict:
                return None
            what = self.source.describe(index)
            if what in str(err):
                raise
            raise CorruptImageError(f"{what}: {err}") from err  # a mode-F image's message named no file
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
            if self.strict:
                raise CorruptImageError(
                    f"corrupt image {self.source.describe(index)}: {type(err).__name__}: {err} "
                    f"(run without --strict-images to skip and count such files)"
                ) from err
            return None


def collate_skipping(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; returns ``(images, labels, number of skipped corrupt samples)``."""
    good = [(i, b) for i, b in enumerate(batch) if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    first, (x0, _) = good[0]
    odd = next(((i, x) for i, (x, _) in good if x.shape != x0.shape), None)
    if odd is not None:
        raise ValueError(
            f"the images of a batch must share one shape to be stacked: sample {first} of the batch is "
            f"{tuple(x0.shape)}, sample {odd[0]} is {tuple(odd[1].shape)}; the transform must crop or resize "
            f"to one size (timm's create_transform does, to the model's input size)"
        )
    from torch.utils.data import get_worker_info

    images = [x for _, (x, _) in good]
    out = None
    if get_worker_info() is not None and all(x.dtype == x0.dtype for x in images):
        # in a DataLoader worker: stacked straight into shared memory, as torch's default_collate does; a
        # batch in private memory was copied once more (into shared memory) to be sent to the main process
        with contextlib.suppress(AttributeError, RuntimeError):  # (private API: else as before)
            storage = x0._typed_storage()._new_shared(len(images) * x0.numel(), device=x0.device)
            out = x0.new(storage).resize_(len(images), *x0.shape)
    return (torch.stack(images, out=out), torch.tensor([y for _, (_, y) in good], dtype=torch.long),
            skipped)

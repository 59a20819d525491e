"""Offline image datasets held as uint8 tensors: Fashion-MNIST (default) and scikit-learn's digits.

Both load into memory as ``(N, 1, H, W)`` uint8 images and ``(N,)`` int64 labels; training reads batches
straight from these tensors (no per-sample Python work), which keeps a 2-core CPU busy with the model.
"""

from __future__ import annotations

import gzip
import math
import operator
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ImageSplit",
    "fashion_mnist_root",
    "load_digits_split",
    "load_fashion_mnist",
    "load_image_dataset",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DEFAULT_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass
class ImageSplit:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, with the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            got = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {got}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        if len(self.images) == 0:
            raise ValueError("the dataset split is empty")
        if self.labels.is_floating_point() or self.labels.is_complex() or self.labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {self.labels.dtype}")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= len(self.classes):
            bad = low if low < 0 else high
            raise ValueError(
                f"labels must be class indices in [0, {len(self.classes)}) ({len(self.classes)} classes), "
                f"got {bad}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> ImageSplit:
        """The first ``n`` samples (all if None)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        return ImageSplit(self.images[:n], self.labels[:n], self.classes)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (gzipped or plain) as a uint8 tensor of the shape its header declares.

    Compression is told from the content, not the name: a browser may save ``x.gz`` already unpacked, or
    a gzipped file under the unpacked name.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":  # the gzip magic number
            data = gzip.decompress(data)
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {str(path)!r}: {err}") from err
    if len(data) < 4:
        raise ValueError(f"IDX file {str(path)!r} is truncated (no header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{str(path)!r} is not a uint8 IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated ({len(data)} bytes, a {header}-byte header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)  # Python ints: a product of uint32 sizes can overflow int64
    if len(data) != expected:
        raise ValueError(
            f"IDX file {str(path)!r} has {len(data)} bytes, expected {expected} for shape {dims}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """Where the Fashion-MNIST IDX files are: ``root``, ``$GMLP_FASHION_MNIST``, or Debian's location (``~``
    expanded: a recipe file's ``data_root`` passes through no shell)."""
    return Path(root or os.environ.get("GMLP_FASHION_MNIST") or _DEFAULT_FASHION_ROOT).expanduser()


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageSplit:
    """Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000) split from the IDX files.

    The files come from Debian's ``dataset-fashion-mnist`` package (``scripts/setup.sh`` installs it). They
    are read gzipped (``train-images-idx3-ubyte.gz``, as distributed) or unpacked
    (``train-images-idx3-ubyte``, as torchvision and Kaggle leave them).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = fashion_mnist_root(root)
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        gz, plain = base / f"{name}.gz", base / name  # as distributed, or unpacked (read_idx reads both)
        if not gz.is_file() and not plain.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {str(gz)!r} not found (nor {plain.name}); install it with "
                f"`apt-get install dataset-fashion-mnist` (scripts/setup.sh does) or pass data_root"
            )
        paths.append(gz if gz.is_file() else plain)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} disagree"
        )
    return ImageSplit(images.unsqueeze(1).contiguous(), labels.long(), FASHION_MNIST_CLASSES)


def load_digits_split(split: str = "train", test_size: int = 297, seed: int = 0) -> ImageSplit:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), as a fixed seeded train/test split.

    Pixel values 0..16 are scaled to 0..255. ``test_size`` (the images of the test split) must leave the
    split asked for non-empty: ``0 <= test_size < 1797`` for ``"train"``, ``1 <= test_size <= 1797`` for
    ``"test"``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    total = len(digits.target)
    low, high = (1, total) if split == "test" else (0, total - 1)
    # a negative size sliced from the end (test_size=-5: a test split of 1792 images, a train split of 5)
    try:
        size = None if isinstance(test_size, bool) else operator.index(test_size)  # (NumPy ints too)
    except TypeError:
        size = None
    if size is None or not low <= size <= high:
        raise ValueError(
            f"test_size must be an integer in [{low}, {high}] (the {total} digits split into test and train; "
            f"the {split} split must not be empty), got {test_size!r}"
        )
    images = torch.from_numpy(digits.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    idx = order[:size] if split == "test" else order[size:]
    return ImageSplit(images[idx].unsqueeze(1).contiguous(), labels[idx], tuple(str(i) for i in range(10)))


def load_image_dataset(name: str, split: str, root: str | Path | None = None) -> ImageSplit:
    """Load an offline image dataset by name: ``"fashion_mnist"`` or ``"digits"`` (which takes no ``root``:
    scikit-learn's bundled copy is the only source, so a given ``root`` is an error, not ignored)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, root)
    if name == "digits":
        if root:
            raise ValueError(
                f"dataset 'digits' reads scikit-learn's bundled copy and takes no data_root; got {root}"
            )
        return load_digits_split(split)
    raise ValueError(f"unknown dataset {name!r}; expected 'fashion_mnist' or 'digits'")

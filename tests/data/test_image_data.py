"""Offline image datasets: IDX parsing, Fashion-MNIST, digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from gmlp.data.images import fashion_mnist_root, load_digits_split, load_fashion_mnist, read_idx


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_read_idx_round_trip(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    _write_idx(tmp_path / "x.gz", data)
    assert torch.equal(read_idx(tmp_path / "x.gz"), data)


def test_read_idx_rejects_truncated_file(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (5, 4), dtype=torch.uint8)
    _write_idx(tmp_path / "x.gz", data)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "y.gz").write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "y.gz")


def test_local_fashion_mnist_layout_and_missing_files(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.tensor([1, 2, 3], dtype=torch.uint8))
    split = load_fashion_mnist("test", tmp_path)
    assert split.images.shape == (3, 1, 28, 28) and split.labels.tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("validation", tmp_path)


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(load_digits_split("test").labels, test.labels)
    flat_train = {bytes(x.flatten().tolist()) for x in train.images}
    overlap = sum(bytes(x.flatten().tolist()) in flat_train for x in test.images)
    assert overlap < 10  # the digits set has a few duplicate images, not whole shared splits


@pytest.mark.skipif(not (fashion_mnist_root() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_installed_fashion_mnist() -> None:
    test = load_fashion_mnist("test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10

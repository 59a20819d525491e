"""Offline image datasets: IDX parsing, Fashion-MNIST, digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from gmlp.data.images import (
    ImageSplit,
    fashion_mnist_root,
    load_digits_split,
    load_fashion_mnist,
    load_image_dataset,
    read_idx,
)
from gmlp.data.sampling import StepBatches


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


def test_unpacked_fashion_mnist_files_load_like_the_gzipped_ones(tmp_path: Path) -> None:
    """read_idx reads plain IDX files, but load_fashion_mnist looked for the .gz names only: a folder of
    unpacked files (torchvision's raw/, Kaggle's copy) was "not found"."""
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4,), dtype=torch.uint8)
    for folder, gzipped in ((tmp_path / "gz", True), (tmp_path / "plain", False)):
        folder.mkdir()
        for name, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
            _write_idx(folder / f"{name}.gz", array)
            if not gzipped:
                (folder / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))
                (folder / f"{name}.gz").unlink()
    a, b = load_fashion_mnist("test", tmp_path / "gz"), load_fashion_mnist("test", tmp_path / "plain")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(b.images[:, 0], images) and b.labels.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz' not found \(nor "):
        load_fashion_mnist("train", tmp_path / "plain")


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


def test_read_idx_truncated_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBB", 0, 0x08, 3) + b"\x00\x00"))
    with pytest.raises(ValueError, match="x-idx3-ubyte.gz.*truncated"):
        read_idx(path)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"world_size": 0}, "world_size"), ({"accum_steps": 0}, "accum_steps"),
     ({"rank": 2, "world_size": 2}, "rank"), ({"rank": -1}, "rank")],
)
def test_step_batches_rejects_bad_sharding(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        list(StepBatches(8, 4, 0, 0, 1, **kwargs))


def test_digits_refuses_a_data_root(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="data_root"):
        load_image_dataset("digits", "train", tmp_path)
    assert len(load_image_dataset("digits", "test")) == 297


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_tells_compression_from_the_content_not_the_name(
    tmp_path: Path, name: str, gzipped: bool
) -> None:
    """A ``.gz`` that a browser saved unpacked was 'not a gzipped file', and a gzipped file under the
    unpacked name 'not a uint8 IDX file (magic 1f8b0800)': every pairing of name and content reads alike."""
    data = torch.randint(0, 256, (3, 5, 2), dtype=torch.uint8)
    _write_idx(tmp_path / "ref.gz", data)
    raw = gzip.decompress((tmp_path / "ref.gz").read_bytes())
    (tmp_path / name).write_bytes(gzip.compress(raw) if gzipped else raw)
    assert torch.equal(read_idx(tmp_path / name), data)


def test_read_idx_states_the_true_size_of_a_huge_header(tmp_path: Path) -> None:
    """The expected size was a product in int64, which overflowed for large declared dimensions."""
    dims = (2**32 - 1,) * 3
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", *dims) + bytes(8))
    with pytest.raises(ValueError, match=f"expected {16 + (2**32 - 1) ** 3} for shape"):
        read_idx(path)


@pytest.mark.parametrize("bad", [10, 255])
def test_fashion_mnist_labels_outside_the_classes_are_refused_at_load(tmp_path: Path, bad: int) -> None:
    """A label file with a value >= 10 loaded, and training failed later inside the loss (on CUDA, a
    device-side assert)."""
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.tensor([1, bad, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 10\).*got {bad}"):
        load_fashion_mnist("test", tmp_path)


def test_image_split_checks_label_values() -> None:
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"in \[0, 2\).*got -1"):
        ImageSplit(images, torch.tensor([0, -1, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="integer class indices, got torch.float32"):
        ImageSplit(images, torch.tensor([0.0, 1.0, 1.0]), ("a", "b"))
    assert ImageSplit(images, torch.tensor([0, 1, 1]), ("a", "b")).subset(2).labels.tolist() == [0, 1]


def test_fashion_mnist_root_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data_root: ~/fmnist`` in a recipe reaches the code unexpanded (no shell): 'not found'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(2, 28, 28, dtype=torch.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.tensor([4, 5], dtype=torch.uint8))
    assert load_fashion_mnist("test", "~").labels.tolist() == [4, 5]

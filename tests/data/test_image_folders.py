"""PIL-read image data: ImageFolder trees, HF datasets, corrupt files, seeded transforms, step sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.data.folders import (
    CorruptImageError,
    TransformedImages,
    collate_skipping,
    hf_source,
    image_folder_source,
    subset_source,
)
from gmlp.data.sampling import StepBatches

COLORS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def make_tree(root: Path, per_class: dict[str, int], size: int = 12, corrupt: bool = True) -> Path:
    """``root/SPLIT/classK/I.png`` with class-coloured noise, plus one corrupt PNG in train/class0."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, col in enumerate(COLORS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(col)[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return root


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten()


def test_image_folder_classes_labels_and_val_numbering(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"train": 3, "val": 2})
    train = image_folder_source(root, "train")
    assert train.classes == ("class0", "class1", "class2")
    assert len(train) == 3 * 3 + 1 and sorted(set(train.labels)) == [0, 1, 2]
    (root / "val" / "class0").rename(root / "val" / "zzz_class0_moved")  # val lacks class0 ...
    with pytest.raises(ValueError, match="classes the training split lacks"):
        image_folder_source(root, "val", train.classes)
    (root / "val" / "zzz_class0_moved").rename(root / "val" / "class0")
    val = image_folder_source(root, None, train.classes, candidates=("val", "validation"))
    assert val.root.name == "val" and len(val) == 6


def test_missing_or_empty_folders_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder_source(tmp_path / "nowhere", "train")
    root = make_tree(tmp_path / "imgs", {"train": 2}, corrupt=False)
    with pytest.raises(FileNotFoundError, match="no split 'val'.*found: train"):
        image_folder_source(root, "val")
    (root / "train" / "class3").mkdir()
    with pytest.raises(FileNotFoundError, match="class3.*holds no images"):
        image_folder_source(root, "train")
    (root / "empty" / "x").mkdir(parents=True)
    (root / "train" / "class3").rmdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        image_folder_source(root, "empty")


def test_a_subset_of_a_folder_keeps_every_class(tmp_path: Path) -> None:
    """An ImageFolder lists its files class by class: the first N held one class or two. A subset takes
    samples at even steps, each still loading its own file."""
    root = make_tree(tmp_path / "imgs", {"train": 10}, corrupt=False)
    source = image_folder_source(root, "train")
    sub = subset_source(source, 12)
    assert len(sub) == 12 and sorted(set(sub.labels)) == [0, 1, 2]
    assert [sub.labels.count(c) for c in range(3)] == [4, 4, 4]
    for i, j in enumerate(sub.indices):
        assert sub.describe(i) == source.describe(j) and sub.labels[i] == source.labels[j]
    assert subset_source(source, 30) is source and subset_source(source, None) is source


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert clips 16-bit values above 255 (a 16-bit photo came out almost white); they are scaled
    to 8 bits, as the same picture saved in 8 bits reads."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 12), (12, 1))
    d = tmp_path / "imgs" / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(d / "deep.png")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(d / "flat.png")
    source = image_folder_source(tmp_path / "imgs", "train")
    assert source.load(0).mode.startswith("I")  # the 16-bit file really is 16-bit
    for mode in ("L", "RGB"):
        ds = TransformedImages(source, _to_tensor, mode)
        deep, flat = ds[0][0], ds[1][0]
        assert (deep - flat).abs().max() <= 1.0


def test_corrupt_images_are_skipped_and_counted_or_raise(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imgs", {"train": 2})
    src = image_folder_source(root, "train")
    broken = next(i for i, (p, _) in enumerate(src.samples) if p.endswith("broken.png"))
    ds = TransformedImages(src, _to_tensor, "RGB")
    x, y, skipped = collate_skipping([ds[i] for i in range(len(ds))])
    assert skipped == 1 and len(y) == len(ds) - 1 and x.shape == (len(ds) - 1, 12 * 12 * 3)
    with pytest.raises(CorruptImageError, match="broken.png"):
        TransformedImages(src, _to_tensor, "RGB", strict=True)[broken]
    grey = TransformedImages(src, _to_tensor, "L")[0][0]
    assert grey.shape == (12 * 12,)


def test_seeded_random_transform_is_reproducible(tmp_path: Path) -> None:
    from timm.data import create_transform

    root = make_tree(tmp_path / "imgs", {"train": 1}, corrupt=False)
    tf = create_transform(
        12, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    ds = TransformedImages(image_folder_source(root, "train"), tf, "RGB")
    a, b, c = ds[(0, 123)][0], ds[(0, 123)][0], ds[(0, 124)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hf_dataset_from_disk_with_a_corrupt_row(tmp_path: Path) -> None:
    import datasets

    root = make_tree(tmp_path / "imgs", {"train": 2, "val": 1})

    def split(name: str) -> datasets.Dataset:
        files = sorted((root / name).glob("*/*.png"))
        return datasets.Dataset.from_dict(
            {"img": [str(f) for f in files], "fine_label": [int(f.parent.name[-1]) for f in files]},
            features=datasets.Features(
                {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["red", "green", "blue"])}
            ),
        )

    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(
        str(tmp_path / "hf")
    )
    train = hf_source(str(tmp_path / "hf"), None, candidates=("train",))
    val = hf_source(str(tmp_path / "hf"), None, candidates=("validation", "val"), class_names=train.classes)
    assert train.classes == ("red", "green", "blue") and len(train) == 7 and len(val) == 3
    ds = TransformedImages(train, _to_tensor, "RGB")
    _, y, skipped = collate_skipping([ds[i] for i in range(len(ds))])
    assert skipped == 1 and sorted(set(y.tolist())) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="no split 'test'"):
        hf_source(str(tmp_path / "hf"), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_source(str(tmp_path / "missing"), None)


def test_step_batches_shard_every_sample_exactly_once_and_resume() -> None:
    n, batch, world, accum = 50, 12, 2, 3  # 4 steps per epoch, 2 samples dropped per epoch
    plans = [
        StepBatches(n, batch, 7, 0, 8, rank=r, world_size=world, accum_steps=accum) for r in range(world)
    ]
    per_rank = [list(p) for p in plans]
    assert all(len(b) == 8 * accum for b in per_rank) and all(len(mb) == 2 for b in per_rank for mb in b)
    for step in range(8):
        got = sorted(
            i for r in range(world) for mb in per_rank[r][step * accum : (step + 1) * accum] for i, _ in mb
        )
        assert got == sorted(plans[0].global_batch(step).tolist())
    for epoch in range(2):
        seen = [
            i
            for r in range(world)
            for mb in per_rank[r][epoch * 4 * accum : (epoch + 1) * 4 * accum]
            for i, _ in mb
        ]
        assert len(seen) == len(set(seen)) == 48
    seeds = [s for b in per_rank for mb in b for _, s in mb]
    assert len(set(seeds)) == len(seeds)
    tail = list(StepBatches(n, batch, 7, 5, 8, rank=1, world_size=world, accum_steps=accum))
    assert tail == per_rank[1][5 * accum :]
    with pytest.raises(ValueError, match="divisible by world_size x grad_accum_steps"):
        StepBatches(n, 10, 0, 0, 1, world_size=2, accum_steps=3)


def test_hf_dataset_with_text_labels_names_the_row(tmp_path: Path) -> None:
    import datasets

    root = make_tree(tmp_path / "imgs", {"train": 2}, corrupt=False)
    files = sorted((root / "train").glob("*/*.png"))
    labels = ["0"] * (len(files) - 1) + ["cat"]  # integers as text are fine; a class name is not an index
    datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": labels}).save_to_disk(
        str(tmp_path / "hf")
    )
    last = len(files) - 1
    with pytest.raises(ValueError, match=f"column 'label' must hold class indices.*row {last} holds 'cat'"):
        hf_source(str(tmp_path / "hf"), None, candidates=("train",))

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


def test_a_class_folder_in_another_unicode_normal_form_is_the_same_class(tmp_path: Path) -> None:
    """A validation split copied from macOS names "café" as e + combining accent (NFD), the training split
    as one character (NFC): the same class, not "a class the training split lacks"."""
    import unicodedata

    root = make_tree(tmp_path / "imgs", {"train": 2, "val": 1}, corrupt=False)
    composed, decomposed = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    assert composed != decomposed
    (root / "train" / "class1").rename(root / "train" / composed)
    (root / "val" / "class1").rename(root / "val" / decomposed)
    train = image_folder_source(root, "train")
    val = image_folder_source(root, "val", train.classes)
    assert train.classes == (composed, "class0", "class2")  # sorted: "c" + "a" < "c" + "l"
    expected = {c: i for i, c in enumerate(train.classes)}
    for path, label in val.samples:
        name = Path(path).parent.name
        assert label == expected[unicodedata.normalize("NFC", name)], (name, label)
    assert sorted(set(val.labels)) == [0, 1, 2]


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


def _write_png(path: Path, value: int = 100) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path, format="PNG")


def _plain_tree(base: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """An ImageFolder split (nested folders, upper-case extensions, other files); torchvision's listing."""
    from torchvision.datasets import ImageFolder

    for rel in ("cat/a.png", "cat/B.PNG", "cat/sub/c.png", "cat/sub/deeper/d.Png", "dog/e.png",
                "dog/z/f.png", "emu/g.png"):
        _write_png(base / rel)
    (base / "dog" / "notes.txt").write_text("not an image")
    (base / "emu" / "h.png.bak").write_bytes(b"")
    reference = ImageFolder(str(base))
    return tuple(reference.classes), reference.samples


def test_folder_listing_matches_torchvision_without_hidden_entries(tmp_path: Path) -> None:
    """Same classes, files and order as torchvision's ImageFolder on a plain tree; hidden entries change
    nothing. A notebook's ``.ipynb_checkpoints`` folder used to become class 0 (every label shifted by one)
    and macOS's ``._x.png`` files counted as corrupt images (fatal with --strict-images)."""
    import os

    base = tmp_path / "data" / "train"
    classes, samples = _plain_tree(base)
    source = image_folder_source(tmp_path / "data", "train")
    assert (source.classes, source.samples) == (classes, samples) and len(source) == 7

    _write_png(base / ".ipynb_checkpoints" / "a-checkpoint.png")  # a hidden class folder with an image
    (base / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble file
    _write_png(base / "dog" / ".thumbs" / "e.png")  # a hidden sub-folder inside a class
    (tmp_path / "data" / ".cache").mkdir()  # a hidden split folder
    os.symlink("../../cat", base / "dog" / "z" / "back")  # dog/z/back -> cat: a link elsewhere is followed
    source = image_folder_source(tmp_path / "data", "train")
    linked = [(str(base / "dog" / "z" / "back" / rel), 1)
              for rel in ("B.PNG", "a.png", "sub/c.png", "sub/deeper/d.Png")]
    assert source.classes == classes and source.samples == samples[:6] + linked + samples[6:]
    with pytest.raises(FileNotFoundError, match=r"\(found: train\)"):
        image_folder_source(tmp_path / "data", "val")


def test_folder_listing_does_not_follow_a_symlink_loop(tmp_path: Path) -> None:
    """A link back up the tree (``cat/up -> ..``) listed each image once per level until the path resolution
    gave up (~40 times), the other classes' images among them under this class's label."""
    import os

    base = tmp_path / "data" / "train"
    classes, samples = _plain_tree(base)
    os.symlink("..", base / "cat" / "sub" / "up")
    source = image_folder_source(tmp_path / "data", "train")
    assert (source.classes, source.samples) == (classes, samples)


def test_collating_images_of_different_sizes_names_the_samples() -> None:
    """torch.stack's own error gave the position among the readable samples, not in the batch."""
    batch = [(torch.zeros(3, 4, 4), 0), None, (torch.zeros(3, 4, 4), 1), (torch.zeros(3, 5, 4), 2)]
    with pytest.raises(ValueError, match=r"sample 0 of the batch is \(3, 4, 4\), sample 3 is \(3, 5, 4\)"):
        collate_skipping(batch)
    x, y, skipped = collate_skipping(batch[:3])
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 1] and skipped == 1


def test_eval_of_an_imagefolder_run_uses_its_own_train_and_val_splits(tmp_path: Path) -> None:
    """``gmlp eval RUN`` numbered the classes from ``train/`` and looked for ``val``/``validation``/``test``
    whatever splits the run named: a run trained on ``training/`` and validated on ``holdout/`` (which lacks
    a class) was evaluated on ``test/`` with that split's own class numbering, and refused."""
    import json

    from gmlp import create_model
    from gmlp.models.loading import save_model
    from gmlp.train.vision_tools import evaluate_checkpoint

    data = tmp_path / "data"
    for split, classes in (("training", "abc"), ("holdout", "bc"), ("test", "a")):
        for c in classes:
            for i in range(2):
                _write_png(data / split / c / f"{i}.png", value=60 * (ord(c) - 96))
    run = tmp_path / "run"
    run.mkdir()
    save_model(create_model("gmlp_micro4_28", num_classes=3, in_chans=1), run / "model.safetensors")
    config = {"model": "gmlp_micro4_28", "dataset": "imagefolder", "data_root": str(data),
              "train_split": "training", "val_split": "holdout"}
    (run / "config.json").write_text(json.dumps(config))
    result = evaluate_checkpoint(run, workers=0, batch_size=8, device="cpu")
    assert result["split"] == "holdout" and result["count"] == 4
    other = evaluate_checkpoint(run, split="test", workers=0, batch_size=8, device="cpu")
    assert other["split"] == "test" and other["count"] == 2


def test_a_data_root_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data_root: ~/data`` in a recipe reaches the code unexpanded (no shell): it 'did not exist'."""
    import datasets

    monkeypatch.setenv("HOME", str(tmp_path))
    _write_png(tmp_path / "imgs" / "train" / "cat" / "a.png")
    assert len(image_folder_source("~/imgs", "train")) == 1
    datasets.Dataset.from_dict({"image": [str(tmp_path / "imgs" / "train" / "cat" / "a.png")],
                                "label": [0]}).save_to_disk(str(tmp_path / "hf"))
    assert len(hf_source("~/hf", None, candidates=("train",))) == 1

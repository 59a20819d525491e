"""The input pipeline's faster paths give the values of the plain ones, bit for bit: a DataLoader batch
(``TransformedImages.__getitems__``: the random states saved once per batch; ``_convert`` without PIL's copy;
``collate_skipping`` stacking into shared memory in a worker) equals the batch built item by item as before,
from torchvision's ``pil_loader`` and a per-sample ``_seeded`` transform; the caller's random streams end
where they did."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gmlp.data.folders import (
    TensorSource,
    TransformedImages,
    _convert,
    _seeded,
    collate_skipping,
    image_folder_source,
)
from gmlp.data.images import ImageSplit
from gmlp.data.sampling import StepBatches


def _jpeg_tree(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    """``root/train/cK/I.jpg``: small photo-like JPEGs of odd sizes."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (30 + 3 * i, 40 + 5 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _rand_augment() -> Any:
    """timm's RandAugment train transform as ``gmlp train`` builds it (draws on random, NumPy and torch)."""
    from timm.data import create_transform

    from gmlp.train.vision import _posterize_to_zero_bits

    tf = create_transform(24, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0,
                          interpolation="bicubic")  # fmt: skip
    _posterize_to_zero_bits(tf)
    return tf


def _streams() -> tuple[float, float, float]:
    """The next draw of Python's, NumPy's and torch's global generators (consumes them)."""
    return random.random(), float(np.random.rand()), float(torch.rand(()))


class _Reference(torch.utils.data.Dataset):
    """The plain path, item by item: ``pil_loader`` (open + ``convert("RGB")``, a copy) and the transform
    under its own ``_seeded`` block (a Dataset without ``__getitems__``)."""

    def __init__(self, paths: list[str], labels: list[int], transform: Any) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import pil_loader

        index, seed = key
        img = pil_loader(self.paths[index])
        with _seeded(seed):
            return self.transform(img), self.labels[index]


def _stack(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch]), 0


def _run(loader: Any) -> tuple[list, tuple[float, float, float]]:
    """The batches of ``loader`` from seeded global streams, and the streams' next draws after it."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    batches = list(loader)
    return batches, _streams()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_the_item_by_item_reference(tmp_path: Path, workers: int) -> None:
    """gmlp's train loader (StepBatches, collate_skipping; workers 0 and 2) gives the reference's batches bit
    for bit, and leaves the caller's random streams where the reference leaves them."""
    from torch.utils.data import DataLoader

    source = image_folder_source(_jpeg_tree(tmp_path), "train")
    transform = _rand_augment()
    plan = StepBatches(len(source), 4, 5, 0, 4, accum_steps=2)  # two epochs
    ours = DataLoader(TransformedImages(source, transform, "RGB"), batch_sampler=plan, num_workers=workers,
                      collate_fn=collate_skipping)  # fmt: skip
    reference = _Reference([path for path, _ in source.samples], source.labels, transform)
    got, after = _run(ours)
    want, after_ref = _run(DataLoader(reference, batch_sampler=plan, num_workers=workers, collate_fn=_stack))
    assert after == after_ref
    assert len(got) == len(want) == 8
    for (x, y, skipped), (x_ref, y_ref, _) in zip(got, want, strict=True):
        assert skipped == 0 and torch.equal(y, y_ref)
        assert x.dtype == x_ref.dtype and torch.equal(x, x_ref)


def _noise(img: Any) -> torch.Tensor:
    """A transform drawing on all three global generators."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten()[:3]
    return x + torch.rand(3) + float(np.random.rand()) + random.random()


_SPLIT = ImageSplit(torch.arange(6 * 3 * 4 * 4, dtype=torch.uint8).reshape(6, 3, 4, 4),
                    torch.arange(6) % 2, ("a", "b"))  # fmt: skip


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(-6, 5), st.one_of(st.none(), st.integers(0, 2**63 - 1))), max_size=6))
def test_getitems_equals_getitem_for_any_mix_of_seeded_and_unseeded_keys(
    keys: list[tuple[int, int | None]],
) -> None:
    """``__getitems__`` (what a DataLoader calls per batch) gives ``[ds[k] for k in keys]`` and the same
    random streams afterwards, whatever the mix: an unseeded item draws on the caller's streams in both."""
    ds = TransformedImages(TensorSource(_SPLIT), _noise, "RGB")
    keys_ = [i if s is None else (i, s) for i, s in keys]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    batched = ds.__getitems__(keys_)
    after_batched = _streams()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    single = [ds[k] for k in keys_]
    assert _streams() == after_batched
    assert len(batched) == len(single)
    for (xa, ya), (xb, yb) in zip(batched, single, strict=True):
        assert ya == yb and torch.equal(xa, xb)


def test_getitems_puts_the_streams_back_when_an_item_fails() -> None:
    """A bad key in the middle of a batch raises as ``ds[key]`` does, the caller's streams put back."""
    ds = TransformedImages(TensorSource(_SPLIT), _noise, "RGB")
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    expected = _streams()
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    with pytest.raises(IndexError, match="index 6 is out of range"):
        ds.__getitems__([(0, 1), (6, 2)])
    assert _streams() == expected


def _old_convert(img: Any, mode: str) -> Any:
    """``_convert`` before it skipped PIL's copy: every image through ``convert``."""
    from gmlp.data.folders import _to_8_bit

    img = _to_8_bit(img)
    if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
        img = img.convert("RGBA")
    try:
        return img.convert(mode)
    except ValueError:
        if mode != "L":
            raise
        return img.convert("RGB").convert("L")


def test_convert_keeps_the_pixels_and_copies_a_read_only_image(tmp_path: Path) -> None:
    """The result of ``_convert`` has the pixels of PIL's ``convert`` for every mode pair; an image in
    ``mode`` already comes back as it is, except a read-only one (memory mapped from an array), copied."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    images = {
        "RGB": Image.fromarray(rgb),
        "L": Image.fromarray(grey).copy(),
        "RGBA": Image.fromarray(np.dstack([rgb, grey])),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "1": Image.fromarray(grey > 128),
    }
    path = tmp_path / "x.jpg"
    images["RGB"].save(path, quality=95)
    with open(path, "rb") as f:
        jpeg = Image.open(f)
        jpeg.load()
    images["JPEG"] = jpeg
    for name, img in images.items():
        for mode in ("RGB", "L"):
            new, old = _convert(img, mode), _old_convert(img, mode)
            assert new.mode == old.mode == mode and new.size == old.size, (name, mode)
            assert np.array_equal(np.asarray(new), np.asarray(old)), (name, mode)
    assert _convert(images["JPEG"], "RGB") is images["JPEG"]  # no copy
    mapped = Image.fromarray(grey)
    assert mapped.readonly and _convert(mapped, "L") is not mapped


def test_a_worker_stacks_the_batch_into_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a DataLoader worker the images are stacked straight into shared memory (not copied there again
    to be sent), with the values of ``torch.stack``; in the main process into ordinary memory."""
    import torch.utils.data

    items = [(torch.rand(3, 5, 5), 1), None, (torch.rand(3, 5, 5), 0)]
    x, y, skipped = collate_skipping(items)
    assert not x.is_shared() and skipped == 1
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    xw, yw, skipped_w = collate_skipping(items)
    assert xw.is_shared() and torch.equal(xw, x) and torch.equal(yw, y) and skipped_w == 1
    assert xw.shape == (2, 3, 5, 5) and xw.is_contiguous()

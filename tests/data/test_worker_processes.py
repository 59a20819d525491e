"""Data loading with DataLoader worker processes: what ``gmlp train`` / ``gmlp eval`` hand to the workers
pickles and runs under the "spawn" start method (macOS, Windows) with the batches of ``num_workers=0``; a
seeded item depends on its (index, seed) alone and leaves the caller's random streams alone (so results do not
depend on the number of workers); an index past the end is an ``IndexError``, not a skipped corrupt image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.data.folders import (
    CorruptImageError,
    TensorSource,
    TransformedImages,
    collate_skipping,
    image_folder_source,
    subset_source,
)
from gmlp.data.images import ImageSplit, load_digits_split
from gmlp.data.sampling import StepBatches


def _tree(root: Path) -> Path:
    """``root/train/cK/I.png``: 3 classes x 4 colour 12x12 PNGs, plus one corrupt PNG in c1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, col in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(col)[None, None] + rng.normal(0, 30, (12, 12, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    (root / "train" / "c1" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _rand_augment(chans: int = 3, size: int = 12) -> object:
    """timm's train transform with RandAugment (draws on random, NumPy and torch), as ``gmlp train`` builds
    it (posterize ops pointed at gmlp's module-level replacement)."""
    from timm.data import create_transform

    from gmlp.train.vision import _posterize_to_zero_bits

    tf = create_transform((chans, size, size), is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                          re_prob=0.0, mean=(0.5,) * chans, std=(0.5,) * chans)
    _posterize_to_zero_bits(tf)
    return tf


def _noise_transform(img: object) -> torch.Tensor:
    """A transform drawing on all three global generators (as timm's do)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten()[:4]
    return x + torch.rand(4) + float(np.random.rand()) + random.random()


_SPLIT = ImageSplit(
    torch.arange(7 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(7, 3, 4, 4),
    torch.tensor([0, 1, 2, 0, 1, 2, 0]),
    ("a", "b", "c"),
)


def _sources(tmp_path: Path) -> dict[str, object]:
    folder = image_folder_source(_tree(tmp_path / "imgs"), "train")
    return {"tensor": TensorSource(_SPLIT), "folder": folder, "subset": subset_source(folder, 5)}


@pytest.mark.parametrize("kind", ["tensor", "folder", "subset"])
@pytest.mark.parametrize("strict", [False, True])
def test_an_index_past_the_end_is_an_index_error_not_a_skipped_corrupt_image(
    tmp_path: Path, kind: str, strict: bool
) -> None:
    """An index past the end raised an IndexError inside the source, which was taken for a corrupt image:
    ``None`` (skipped, counted in ``skipped_images``), or with strict "corrupt image sample N"; iterating the
    dataset (Python's sequence protocol stops at an IndexError) never ended."""
    source = _sources(tmp_path)[kind]
    ds = TransformedImages(source, _noise_transform, "RGB", strict=strict)
    n = len(ds)
    for index in (n, n + 3, -n - 1, (n, 5)):
        with pytest.raises(IndexError, match=f"out of range for a dataset of {n} images"):
            ds[index]
    items = list(ds) if not strict or kind == "tensor" else None  # (strict: the folder's corrupt file stops)
    if items is not None:
        assert len(items) == n
    if kind == "tensor":
        torch.testing.assert_close(ds[(-1, 3)][0], ds[(n - 1, 3)][0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="must be an integer or an \\(index, seed\\) pair, got 1.5"):
        ds[1.5]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(index=st.integers(0, 6), seed=st.integers(0, 2**63 - 1), caller=st.integers(0, 2**32 - 1))
def test_a_seeded_item_depends_on_index_and_seed_alone_and_leaves_the_caller_s_streams(
    index: int, seed: int, caller: int
) -> None:
    """With ``num_workers=0`` the transform runs in the training process: its seeding reseeded the process's
    global generators (torch's CUDA ones too), so what the process drew next (dropout, mixup, a user's loop)
    depended on the last sample's seed, i.e. on whether a worker or the process itself loaded the batch."""
    ds = TransformedImages(TensorSource(_SPLIT), _noise_transform, "RGB")
    reference = ds[(index, seed)][0]
    random.seed(caller)
    np.random.seed(caller)
    torch.manual_seed(caller)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(caller)
    np.random.seed(caller)
    torch.manual_seed(caller)
    item = ds[(index, seed)][0]  # loaded between the caller's seeding and its draws
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    torch.testing.assert_close(item, reference, rtol=0, atol=0)  # whatever the caller drew before
    assert not torch.equal(ds[(index, seed ^ 1)][0], reference)  # the seed does pick the draws


def test_digits_test_size_outside_the_dataset_is_a_named_error() -> None:
    """``test_size=-5`` sliced from the end: a "test" split of 1792 images and a "train" split of 5, silently;
    0 (or 1797) gave "the dataset split is empty", naming no argument."""
    for split, size in (("test", -5), ("train", -5), ("test", 0), ("train", 1797), ("test", 2.5)):
        with pytest.raises(ValueError, match=f"test_size must be an integer in .*, got {size}"):
            load_digits_split(split, test_size=size)
    assert len(load_digits_split("train", test_size=0)) == 1797
    assert len(load_digits_split("test", test_size=np.int64(5))) == 5


def _batches(ds: TransformedImages, n: int, workers: int, context: str | None) -> list:
    from torch.utils.data import DataLoader

    plan = StepBatches(n, 4, 3, 0, 2 * (n // 4))  # two epochs: every sample twice, with other seeds
    loader = DataLoader(ds, batch_sampler=plan, num_workers=workers, collate_fn=collate_skipping,
                        multiprocessing_context=context if workers else None)
    try:
        return list(loader)
    except CorruptImageError as err:  # without the frames that hold the loader's iterator: its workers
        raise err.with_traceback(None) from None  # shut down now, not when pytest drops the traceback


def test_what_the_workers_get_pickles_with_torch_s_reductions(tmp_path: Path) -> None:
    """Each source kind, its dataset and timm's RandAugment transform survive the pickling that hands them to
    a spawned worker (torch's ForkingPickler: tensors travel as shared memory), and give the same items."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    folder = image_folder_source(_tree(tmp_path / "imgs"), "train")
    for source in (TensorSource(load_digits_split("test").subset(8)), folder, subset_source(folder, 5)):
        ds = TransformedImages(source, _rand_augment(3, 12), "RGB")
        buffer = io.BytesIO()
        ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(ds)
        copy = pickle.loads(buffer.getvalue())
        for key in ((0, 11), (len(ds) - 1, 12)):
            torch.testing.assert_close(copy[key][0], ds[key][0], rtol=0, atol=0)
        assert copy[(0, 11)][1] == ds[(0, 11)][1]


@pytest.mark.slow
def test_spawned_workers_run_what_gmlp_train_builds_and_give_the_batches_of_no_workers(
    tmp_path: Path,
) -> None:
    """Under "spawn" (macOS, Windows) the dataset, its source, timm's RandAugment transform and the collate
    function are pickled into each worker (a lambda, closure or local class fails there only); the batches,
    skipped-image counts and per-sample augmentation equal those of ``num_workers=0``. A corrupt image with
    strict reaches the caller as a CorruptImageError naming the file."""
    folder = image_folder_source(_tree(tmp_path / "imgs"), "train")
    # (library objects only: the test module's own functions would need this file importable there)
    ds = TransformedImages(folder, _rand_augment(), "RGB")
    alone = _batches(ds, len(folder), 0, None)
    spawned = _batches(ds, len(folder), 2, "spawn")
    assert len(spawned) == len(alone) > 0
    for (xa, ya, sa), (xb, yb, sb) in zip(alone, spawned, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb) and sa == sb
    assert sum(s for *_, s in alone) == 2  # the corrupt PNG, skipped once per epoch
    strict = TransformedImages(folder, _rand_augment(), "RGB", strict=True)
    with pytest.raises(CorruptImageError, match="zz_corrupt.png"):
        _batches(strict, len(folder), 1, "spawn")

"""Real-world image files through the PIL pipeline (``FolderSource`` + ``TransformedImages``): the pixels of
torchvision's ``pil_loader`` + ``convert`` for every PIL mode (alpha dropped, palette, CMYK, 1-bit, first
frame of a multi-frame file), 16-bit files scaled, EXIF orientation applied, junk files skipped and counted,
truncated and oversized files corrupt by the caller's PIL settings (never changed by gmlp) in worker
processes too, and tiny or extreme-aspect images through the train and eval transforms."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from gmlp.data.folders import (
    CorruptImageError,
    TransformedImages,
    collate_skipping,
    image_folder_source,
)


def _as_tensor(img: Image.Image) -> torch.Tensor:
    """The converted image's pixels, untransformed (module level: picklable into a spawned worker)."""
    return torch.from_numpy(np.array(img))


def _rgb(rng: np.random.Generator, h: int = 6, w: int = 7) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_formats(d: Path) -> None:
    """One small file per awkward PIL mode / container, random pixels."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 7, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (6, 7, 2), dtype=np.uint8), "LA").save(d / "la.png")
    pal = Image.fromarray(_rgb(rng)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(d / "p.png")
    pal.save(d / "p_one_transparent.png", transparency=3)
    pal.save(d / "p_alpha_bytes.png", transparency=bytes(range(0, 256, 16)))
    Image.fromarray(_rgb(rng)).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(rng.integers(0, 2, (6, 7), dtype=np.uint8) * 255).convert("1").save(d / "bits.png")
    Image.fromarray(rng.integers(0, 256, (6, 7), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(_rgb(rng)).save(d / "upper.JPG", quality=95)
    Image.fromarray(_rgb(rng)).save(d / "upper.JPEG", quality=95)
    Image.fromarray(_rgb(rng)).save(d / "lossless.webp", lossless=True)
    frames = [Image.fromarray(_rgb(rng)) for _ in range(3)]
    frames[0].save(d / "stack.tif", save_all=True, append_images=frames[1:])
    frames[0].save(d / "phone.mpo", "MPO", save_all=True, append_images=frames[1:])  # a phone's JPEG
    (d / "phone.mpo").rename(d / "phone.jpg")
    Image.fromarray(_rgb(rng)).convert("LAB").save(d / "cielab.tif")  # PIL converts LAB to RGB, not to L


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    _write_formats(root / "train" / "a")
    return root


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_pil_mode_reads_as_torchvision_s_pil_loader(formats: Path, mode: str) -> None:
    """RGBA/LA (alpha dropped, not composited), palette with and without transparency, CMYK JPEG, CIELab
    TIFF, 1-bit, grey for an RGB model and RGB for a 1-channel model, WebP, upper-case extensions, and the
    first frame of a multi-frame TIFF or MPO: the pixels of torchvision's loader,
    ``pil_loader(path).convert(mode)``."""
    from torchvision.datasets.folder import pil_loader

    source = image_folder_source(formats, "train")
    names = sorted(Path(p).name for p, _ in source.samples)
    assert names == sorted(p.name for p in (formats / "train" / "a").iterdir())  # .JPG, .JPEG, .webp listed
    ds = TransformedImages(source, _as_tensor, mode)
    for i, (path, _) in enumerate(source.samples):
        item = ds[i]
        assert item is not None, path
        with warnings.catch_warnings():  # PIL's palette-transparency warning, for the reference only
            warnings.simplefilter("ignore", UserWarning)
            expected = np.asarray(pil_loader(path).convert(mode))
        np.testing.assert_array_equal(item[0].numpy(), expected, err_msg=path)


def test_a_palette_with_alpha_bytes_reads_without_pil_s_warning(formats: Path) -> None:
    """PIL warns "Palette images with Transparency expressed in bytes should be converted to RGBA images"
    on every such file converted straight to RGB/L (a warning per worker, on every run); going through RGBA
    gives the same pixels (checked above) and no warning."""
    source = image_folder_source(formats, "train")
    index = next(i for i, (p, _) in enumerate(source.samples) if p.endswith("p_alpha_bytes.png"))
    for mode in ("RGB", "L"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert TransformedImages(source, _as_tensor, mode)[index] is not None


def _open_fds_to(path: str) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile (the listing's own)
            count += os.readlink(fd) == path
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
@pytest.mark.parametrize("name", ["stack.tif", "phone.jpg", "rgba.png"])
def test_a_loaded_image_holds_no_open_file(formats: Path, name: str) -> None:
    """PIL keeps a multi-frame file (a TIFF stack, an MPO phone JPEG) open after decoding its first frame,
    until the image is garbage-collected; the source closes it on return, as ``pil_loader`` does."""
    source = image_folder_source(formats, "train")
    index, path = next((i, p) for i, (p, _) in enumerate(source.samples) if p.endswith(name))
    img = source.load(index)
    assert _open_fds_to(os.path.realpath(path)) == 0
    assert np.asarray(img.convert("RGB")).shape[:2] == (6, 7)  # still usable with its file closed


def _pgm16(path: Path, values: np.ndarray) -> None:
    h, w = values.shape
    path.write_bytes(f"P5 {w} {h} 65535\n".encode() + values.astype(">u2").tobytes())


@settings(max_examples=12, deadline=None, derandomize=True)
@given(top=st.sampled_from([1, 200, 255, 256, 4000, 65535]), seed=st.integers(0, 2**16))
def test_16_bit_files_scale_by_65535_whatever_their_brightest_pixel(top: int, seed: int) -> None:
    """A 16-bit PGM (PIL mode ``I``) or PNG (mode ``I;16``) reads as ``round(v * 255 / 65535)``: a dark one
    (every value <= 255) stayed as it was, 257 times too bright, while one with a pixel at 256 was scaled;
    two nearly equal pictures came out 257 times apart."""
    import tempfile

    values = np.random.default_rng(seed).integers(0, top + 1, (5, 6)).astype(np.uint16)
    expected = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "train" / "a"
        d.mkdir(parents=True)
        _pgm16(d / "deep.pgm", values)
        Image.fromarray(values).save(d / "deep.png")
        source = image_folder_source(tmp, "train")
        assert {source.load(i).mode for i in range(2)} == {"I", "I;16"}
        for mode in ("L", "RGB"):
            ds = TransformedImages(source, _as_tensor, mode)
            for i in range(2):
                got = ds[i][0].numpy()
                np.testing.assert_array_equal(got if mode == "L" else got[..., 0], expected)


def test_32_bit_images_of_8_bit_values_and_float_images(tmp_path: Path) -> None:
    """A 32-bit TIFF (mode ``I``) holding 8-bit values keeps them (its range is unknown; a PGM's is not);
    a float image (mode ``F``) is unreadable: skipped, or with strict an error naming the file."""
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    values = np.random.default_rng(1).integers(0, 256, (5, 6)).astype(np.int32)
    Image.fromarray(values, "I").save(d / "a_int32.tif")
    Image.fromarray(values.astype(np.float32), "F").save(d / "b_float.tif")
    source = image_folder_source(tmp_path, "train")
    ds = TransformedImages(source, _as_tensor, "L")
    np.testing.assert_array_equal(ds[0][0].numpy(), values.astype(np.uint8))
    assert ds[1] is None
    with pytest.raises(CorruptImageError, match="b_float.tif.*mode F"):
        TransformedImages(source, _as_tensor, "L", strict=True)[1]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_turns_the_image_upright(tmp_path: Path, fmt: str) -> None:
    """Each of the 8 EXIF orientations: the pixels of ``ImageOps.exif_transpose`` (as image viewers and
    ``datasets`` show the photo; torchvision's loader ignores the tag), whatever the container."""
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    arr = np.repeat(np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)[..., None], 3, axis=2)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        Image.fromarray(arr).save(d / f"{orientation}.{fmt.lower()}", fmt, exif=exif, **kwargs)
    source = image_folder_source(tmp_path, "train")
    ds = TransformedImages(source, _as_tensor, "RGB")
    for i, (path, _) in enumerate(source.samples):
        with Image.open(path) as stored:
            expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
        got = ds[i][0].numpy()
        assert got.shape == expected.shape, path
        np.testing.assert_array_equal(got, expected)
        if Path(path).stem in "5678":
            assert got.shape[:2] == (6, 4)  # turned a quarter


def test_a_turned_image_keeps_its_file_format(tmp_path: Path) -> None:
    """``exif_transpose`` returns a new image without ``format``, which :func:`_to_8_bit` reads to tell a
    16-bit PNG/PGM from a 32-bit TIFF."""
    from gmlp.data.folders import _open_image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(buf, "PNG", exif=exif)
    img = _open_image(lambda: Image.open(io.BytesIO(buf.getvalue())))
    assert img.size == (4, 6) and img.format == "PNG"


def test_junk_files_are_skipped_and_counted_or_named_with_strict(tmp_path: Path) -> None:
    """A zero-byte ``.jpg``, a text file named ``.jpg``, a broken symlink ``x.png`` and (when not root) an
    unreadable file are listed (as torchvision lists them) and skipped with a count; a folder named ``x.jpg``
    is a folder, not an image. With strict each is an error naming the file."""
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "good.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image\n")
    (d / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.png", d / "dangling.png")
    junk = ["dangling.png", "empty.jpg", "notes.jpg"]
    locked = d / "locked.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(locked)
    locked.chmod(0)
    try:
        try:
            locked.read_bytes()  # root reads it anyway: then it is an ordinary image
        except PermissionError:
            junk.append("locked.png")
        source = image_folder_source(tmp_path, "train")
        names = [Path(p).name for p, _ in source.samples]
        assert "folder.jpg" not in names and set(junk) <= set(names)
        ds = TransformedImages(source, _as_tensor, "RGB")
        x, y, skipped = collate_skipping([ds[i] for i in range(len(ds))])
        assert skipped == len(junk) and len(y) == len(names) - len(junk)
        strict = TransformedImages(source, _as_tensor, "RGB", strict=True)
        for name in junk:
            with pytest.raises(CorruptImageError, match=name.replace(".", r"\.")):
                strict[names.index(name)]
    finally:
        locked.chmod(0o644)


def _truncated_jpeg_and_big_png(d: Path) -> None:
    """``cut.jpg`` (16x16, its scan cut in half), ``huge.png`` (2000 pixels: over twice a limit of 450) and
    ``small.png`` (16x16)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    Image.fromarray(_rgb(rng, 16, 16)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    scan = data.index(b"\xff\xda")  # start of scan: the header before it stays whole
    (d / "cut.jpg").write_bytes(data[: scan + (len(data) - scan) // 2])
    Image.fromarray(_rgb(rng, 40, 50)).save(d / "huge.png")
    Image.fromarray(_rgb(rng, 16, 16)).save(d / "small.png")


def test_truncated_and_oversized_files_are_corrupt_and_gmlp_leaves_pil_s_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated JPEG and an image over twice ``Image.MAX_IMAGE_PIXELS`` (``DecompressionBombError``) are
    skipped with a count, or with strict an error naming the file and PIL's reason; reading them (and
    building the dataset) leaves PIL's two global settings as the caller had them. A caller who sets
    ``LOAD_TRUNCATED_IMAGES`` gets the partial image, as PIL does."""
    _truncated_jpeg_and_big_png(tmp_path / "train" / "a")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 450)
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    source = image_folder_source(tmp_path, "train")
    ds = TransformedImages(source, _as_tensor, "RGB")
    assert [ds[i] is None for i in range(3)] == [True, True, False]
    strict = TransformedImages(source, _as_tensor, "RGB", strict=True)
    with pytest.raises(CorruptImageError, match=r"cut\.jpg.*truncated"):
        strict[0]
    with pytest.raises(CorruptImageError, match=r"huge\.png.*DecompressionBombError"):
        strict[1]
    assert before == (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert ds[0] is not None and ds[0][0].shape == (16, 16, 3)


def _worker_limits_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[TransformedImages, list[bool]]:
    """A dataset built under the caller's PIL settings (truncated files read, a pixel limit of 450), and what
    ``num_workers=0`` makes of its three files."""
    _truncated_jpeg_and_big_png(tmp_path / "train" / "a")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 450)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    ds = TransformedImages(image_folder_source(tmp_path, "train"), _as_tensor, "RGB")
    alone = [ds[i] is None for i in range(3)]
    assert alone == [False, True, False]  # the cut JPEG read partially, the big PNG refused
    return ds, alone


def test_a_worker_started_fresh_reads_under_the_caller_s_pil_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a "spawn"/"forkserver" worker does, in this process: the dataset is pickled, the worker's PIL
    starts at its defaults, and the items are read inside a DataLoader worker. It skipped the truncated JPEG
    and read the oversized PNG where ``num_workers=0`` did the opposite; the caller's process is untouched."""
    import torch.utils.data

    ds, alone = _worker_limits_case(tmp_path, monkeypatch)
    here, worker = pickle.loads(pickle.dumps(ds)), pickle.loads(pickle.dumps(ds))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(1024 * 1024 * 1024 // 4 // 3))  # PIL's defaults
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    assert [here[i] is None for i in range(3)] == [True, False, False]  # not in a worker: this process's
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == (False, 89478485)  # left alone
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    assert [worker[i] is None for i in range(3)] == alone


@pytest.mark.slow
def test_spawned_workers_skip_what_no_workers_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with a real DataLoader under "spawn" (macOS's and Windows' default)."""
    from torch.utils.data import DataLoader

    ds, alone = _worker_limits_case(tmp_path, monkeypatch)
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_skipping,
                        multiprocessing_context="spawn")
    [(x, _, skipped)] = list(loader)
    assert skipped == sum(alone) == 1 and x.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("chans", [1, 3])
def test_tiny_and_extreme_aspect_images_through_gmlp_s_transforms(chans: int) -> None:
    """1x1 images and 1:1000 strips, grey or RGB, through the train transform (RandomResizedCrop,
    RandAugment) and the eval transform (resize + centre crop) ``gmlp train`` builds: the model's input
    size, finite values."""
    import gmlp
    from gmlp.train.vision import pil_transforms
    from gmlp.train.vision_config import VisionTrainConfig

    model = gmlp.create_model("gmlp_micro4_28", in_chans=chans)
    config = VisionTrainConfig(auto_augment="rand-m9-mstd0.5-inc1")
    train_tf, eval_tf = pil_transforms(model, config, (0.5,) * chans, (0.25,) * chans)
    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (1, 1000), (1000, 1), (3, 2), (2, 700)):
        img = Image.fromarray(_rgb(rng, h, w)).convert("L" if chans == 1 else "RGB")
        for tf in (train_tf, eval_tf):
            out = tf(img)
            assert out.shape == (chans, 28, 28) and bool(torch.isfinite(out).all()), (h, w, tf)

"""Images/s of gmlp's ImageFolder input pipeline against the same timm transform through torchvision.

    python benchmarks/loader_throughput.py                         # synthetic JPEGs, ~1.5 minutes on 2 cores
    python benchmarks/loader_throughput.py --root ~/imagenet --split val --images 2000 --workers 0,8
    python benchmarks/loader_throughput.py --smoke                 # tiny sizes, a few seconds (the tests)

Two pipelines read the same files with the same transform object, batch size and worker count:

- ``gmlp``: what ``gmlp train --dataset imagefolder`` builds: :func:`gmlp.data.folders.image_folder_source`,
  :class:`~gmlp.data.folders.TransformedImages` (EXIF orientation, mode conversion, each sample's transform
  seeded by its step and position), the :class:`~gmlp.data.sampling.StepBatches` batch sampler and
  :func:`~gmlp.data.folders.collate_skipping`, with the DataLoader settings of the training loop; for
  ``eval``, :func:`gmlp.train.vision.eval_loader`.
- ``torchvision``: ``torchvision.datasets.ImageFolder`` (``pil_loader``) and a plain ``DataLoader``
  (``shuffle=True, drop_last=True`` for the train transforms), the default collate.

The transforms are gmlp's (:func:`gmlp.train.vision.pil_transforms`, i.e. timm's ``create_transform`` with the
model's crop and interpolation): ``train-ra`` with RandAugment (``--auto-augment``, the ImageNet recipes'),
``train`` without it (random-resized crop, flip, colour jitter), ``eval`` (resize and centre crop). Without
``--root`` a synthetic ImageFolder of photo-like JPEGs (``--image-size``, ``--quality``, ``--classes``) is
made once and kept in the temporary folder.

Each (transform, workers) cell runs both pipelines in interleaved repetitions, the order swapped every other
repetition (a b, b a, a b, ...), over the whole folder (``--images``); the first batch of each pass (worker
start-up) is not timed. Prints a markdown table of the medians, the ratio gmlp / torchvision (above 1: gmlp
is faster) and each pipeline's spread, and the CPU time per image (this process and its joined workers,
the whole pass), with the versions and the load average before and after. On a busy machine the CPU time is
the steadier measure; a rate ratio within the spread is noise unless it repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402
from run import cpu_name  # noqa: E402

TRANSFORMS = ("train-ra", "train", "eval")


def _size(text: str) -> tuple[int, int]:
    """argparse type: ``WIDTHxHEIGHT``."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 500x375), got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be at least 1, got {text!r}")
    return width, height


def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated non-negative ints (worker counts)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected one or more integers >= 0, got {text!r}")
    return values


def _transform_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in TRANSFORMS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {TRANSFORMS}, got {text!r}")
    return names


def synthetic_folder(classes: int, per_class: int, size: tuple[int, int], quality: int,
                     base: Path | None = None) -> Path:
    """An ImageFolder root (``train/cNN/*.jpg``) of photo-like JPEGs (smooth colour fields plus grain, about
    the bytes per pixel of ImageNet's photos), made once and reused: its folder name holds the settings and a
    ``complete`` marker is written last, so an interrupted run makes it again."""
    import numpy as np
    from PIL import Image

    width, height = size
    base = base or Path(tempfile.gettempdir())
    root = base / f"gmlp_loader_bench_{width}x{height}_q{quality}_{classes}x{per_class}"
    if (root / "complete").is_file():
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"c{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
            grain = rng.integers(-20, 21, smooth.shape, dtype=np.int16)
            pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=quality)
    (root / "complete").write_text("")
    return root


def build_transforms(model_name: str, auto_augment: str) -> dict[str, Any]:
    """gmlp's PIL transforms for ``model_name`` (:func:`gmlp.train.vision.pil_transforms`): train with and
    without RandAugment, and eval."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from gmlp import create_model
    from gmlp.train.vision import pil_transforms
    from gmlp.train.vision_config import VisionTrainConfig

    model = create_model(model_name)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    with_ra = VisionTrainConfig(model=model_name, dataset="imagefolder", auto_augment=auto_augment)
    plain = VisionTrainConfig(model=model_name, dataset="imagefolder", auto_augment=None)
    train_ra, eval_tf = pil_transforms(model, with_ra, mean, std)
    train, _ = pil_transforms(model, plain, mean, std)
    return {"train-ra": train_ra, "train": train, "eval": eval_tf}


def gmlp_loader(root: Path, split: str, transform: Any, kind: str, batch: int, workers: int,
                seed: int = 0) -> Any:
    """gmlp's loader as ``gmlp train`` builds it (vision.py: the train DataLoader; ``eval_loader``)."""
    from torch.utils.data import DataLoader

    from gmlp.data.folders import TransformedImages, collate_skipping, image_folder_source
    from gmlp.data.sampling import StepBatches
    from gmlp.train.interrupt import ignore_stop_signals
    from gmlp.train.vision import eval_loader

    source = image_folder_source(root, split)
    if kind == "eval":
        return eval_loader(source, transform, 3, batch, workers, False)
    plan = StepBatches(len(source), batch, seed, 0, len(source) // batch)
    return DataLoader(TransformedImages(source, transform, "RGB"), batch_sampler=plan, num_workers=workers,
                      pin_memory=False, collate_fn=collate_skipping, persistent_workers=False,
                      prefetch_factor=4 if workers else None,
                      worker_init_fn=ignore_stop_signals if workers else None)  # fmt: skip


def torchvision_loader(root: Path, split: str, transform: Any, kind: str, batch: int, workers: int) -> Any:
    """torchvision's ImageFolder with the same transform and a plain DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    train = kind != "eval"
    return DataLoader(ImageFolder(str(root / split), transform=transform), batch_size=batch, shuffle=train,
                      drop_last=train, num_workers=workers)  # fmt: skip


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (joined DataLoader workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def images_per_s(loader: Any) -> tuple[float, float]:
    """Images per second over one pass of ``loader``, its first batch (worker start-up) not timed; and the
    CPU milliseconds per image of the whole pass, workers included (they are joined at its end): less
    sensitive than the rate to other jobs on the machine."""
    cpu0 = _cpu_seconds()
    batches = iter(loader)
    first = next(batches)[0].shape[0]
    count, t0 = 0, time.perf_counter()
    for images, *_ in batches:
        count += images.shape[0]
    elapsed = time.perf_counter() - t0
    del batches  # (exhausted: its workers are joined)
    cpu_ms = (_cpu_seconds() - cpu0) * 1e3 / (first + count)
    return (count / elapsed if elapsed > 0 else float("nan")), cpu_ms


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Versions, CPU, cores, threads, the load average (1 minute) and the date."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("torchvision", "timm", "pillow", "numpy")},
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None,
                        help="an ImageFolder dataset root (ROOT/SPLIT/CLASS/*.jpg); default: synthetic JPEGs")
    parser.add_argument("--split", default="train", help="the split folder under --root (default: train)")
    parser.add_argument("--images", type=positive_int, default=256,
                        help="synthetic images in all (default 256); with --root, ignored")
    parser.add_argument("--classes", type=positive_int, default=10, help="synthetic classes (default 10)")
    parser.add_argument("--image-size", type=_size, default=(500, 375), help="synthetic WIDTHxHEIGHT")
    parser.add_argument("--quality", type=positive_int, default=90, help="synthetic JPEG quality")
    parser.add_argument("--cache", type=Path, default=None, help="where the synthetic folder is kept")
    parser.add_argument("--model", default="gmlp_s16_224", help="whose input size, crop and interpolation")
    parser.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="the train-ra policy")
    parser.add_argument("--transforms", type=_transform_list, default=list(TRANSFORMS),
                        help=f"comma-separated, of {', '.join(TRANSFORMS)} (default: all)")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--workers", type=_int_list, default=[0, 2], help="worker counts (default 0,2)")
    parser.add_argument("--reps", type=positive_int, default=4, help="interleaved repetitions per cell")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads of the main process (default 1, as in a DataLoader worker: with "
                             "more, the per-image tensor ops of workers=0 waited on thread wake-ups, 5-10x "
                             "slower on a busy 2-core machine)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds): for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.classes, args.image_size, args.batch, args.reps = 8, 2, (64, 48), 4, 1
        args.model, args.workers = "gmlp_ti16_224", [0]
    torch.set_num_threads(args.threads)
    if args.root is None:
        per_class = max(1, args.images // args.classes)
        root = synthetic_folder(args.classes, per_class, args.image_size, args.quality, args.cache)
        split = "train"
    else:
        root, split = args.root.expanduser(), args.split
    transforms = build_transforms(args.model, args.auto_augment)
    info = machine_info()
    info["loadavg_before"] = _loadavg()
    count = sum(len(files) for _, _, files in os.walk(root / split))
    print(f"{count} images under {root / split}, batch {args.batch}, median of {args.reps} interleaved "
          f"repetitions; {args.model}'s transforms")  # fmt: skip
    results = []
    for kind in args.transforms:
        for workers in args.workers:
            # each repetition with another seed: gmlp's augmentation is a function of it, and a crop's size
            # sets the resize's cost, so one seed would time one fixed draw of crops (torchvision's vary)
            common = (root, split, transforms[kind], kind, args.batch, workers)
            make = {
                "gmlp": lambda rep, common=common: gmlp_loader(*common, seed=rep),
                "torchvision": lambda rep, common=common: torchvision_loader(*common),
            }
            rates: dict[str, list[float]] = {name: [] for name in make}
            cpu: dict[str, list[float]] = {name: [] for name in make}
            for rep in range(args.reps):
                for name in (list(make) if rep % 2 == 0 else list(make)[::-1]):
                    rate, cpu_ms = images_per_s(make[name](rep))
                    rates[name].append(rate)
                    cpu[name].append(cpu_ms)
            med = {name: statistics.median(r) for name, r in rates.items()}
            cpu_med = {name: statistics.median(c) for name, c in cpu.items()}
            results.append({"transform": kind, "workers": workers, "gmlp": med["gmlp"],
                            "torchvision": med["torchvision"], "ratio": med["gmlp"] / med["torchvision"],
                            "rounds": rates, "cpu_ms_per_image": cpu_med, "cpu_rounds": cpu,
                            "cpu_ratio": cpu_med["torchvision"] / cpu_med["gmlp"]})  # fmt: skip
    info["loadavg_after"] = _loadavg()
    print("\n| transform | workers | gmlp img/s (min-max) | torchvision img/s (min-max) | gmlp / torchvision "
          "| CPU ms/img gmlp | CPU ms/img torchvision | CPU torchvision / gmlp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        spread = {n: f"{r[n]:.1f} ({min(r['rounds'][n]):.1f}-{max(r['rounds'][n]):.1f})" for n in r["rounds"]}
        cpu_ms = r["cpu_ms_per_image"]
        print(f"| {r['transform']} | {r['workers']} | {spread['gmlp']} | {spread['torchvision']} | "
              f"{r['ratio']:.3f} | {cpu_ms['gmlp']:.2f} | {cpu_ms['torchvision']:.2f} | "
              f"{r['cpu_ratio']:.3f} |")  # fmt: skip
    print("(ratios above 1: gmlp faster; CPU: the whole pass, worker start-up included)")
    print(f"\nload average (1, 5, 15 min) before {info['loadavg_before']}, after {info['loadavg_after']}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if not k.startswith("loadavg")))
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        out = {"machine": info, "settings": settings, "results": results}
        args.json.write_text(json.dumps(out, indent=1))
    return results


if __name__ == "__main__":
    main()

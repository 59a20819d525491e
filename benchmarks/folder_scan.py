"""Seconds to list an ImageFolder split: :func:`gmlp.data.folders.image_folder_source` (a scan, and a read of
its stored folder list with ``cache_dir``) against ``torchvision.datasets.ImageFolder``'s ``make_dataset``.

    python benchmarks/folder_scan.py                          # 200 classes x 500 empty files, plain and farm
    python benchmarks/folder_scan.py --root ~/imagenet --split train

Without ``--root`` two synthetic trees are made in a temporary folder: plain files, and a symlink farm (each
image a symlink to a file elsewhere, as ImageNet trees often are). Prints the best of ``--repeat`` times of
each; the file system's own cache is warm after the first pass, so a network file system's round trips
(a ``stat`` per symlinked image in torchvision's walk) show only as the counts, not the times: count the
system calls with ``strace -c -f -e trace=%file,getdents64 python benchmarks/folder_scan.py ...``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _make(root: Path, classes: int, per_class: int, farm: bool) -> Path:
    for c in range(classes):
        folder = root / "data" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        store = root / "store" / f"n{c:08d}"
        if farm:
            store.mkdir(parents=True)
        for i in range(per_class):
            name = f"n{c:08d}_{i}.JPEG"
            if farm:
                (store / name).write_bytes(b"")
                os.symlink(store / name, folder / name)
            else:
                (folder / name).write_bytes(b"")
    old = time.time() - 3600  # (a folder modified within 2 s of a scan is not stored)
    for folder in (root / "data" / "train", *(root / "data" / "train").iterdir()):
        os.utime(folder, (old, old))
    return root / "data"


def _best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - start)
    return min(times), n


def _run(data: Path, split: str, repeat: int, label: str) -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    from gmlp.data.folders import image_folder_source

    cache = Path(tempfile.mkdtemp(prefix="folder-list-"))
    cells = {
        "gmlp scan": lambda: len(image_folder_source(data, split)),
        "gmlp stored list": lambda: len(image_folder_source(data, split, cache_dir=cache)),
        "torchvision make_dataset": lambda: len(make_dataset(str(data / split),
                                                             find_classes(str(data / split))[1],
                                                             IMG_EXTENSIONS)),
    }
    image_folder_source(data, split, cache_dir=cache)  # stores the list (when the tree is old enough)
    for name, fn in cells.items():
        seconds, n = _best(fn, repeat)
        print(f"| {label} | {name} | {n} | {seconds:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder dataset (else synthetic trees)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| tree | what | images | best s |\n|---|---|---|---|")
    if args.root is not None:
        _run(args.root.expanduser(), args.split, args.repeat, str(args.root))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for farm in (False, True):
            data = _make(Path(tmp) / ("farm" if farm else "plain"), args.classes, args.per_class, farm)
            _run(data, "train", args.repeat, "symlink farm" if farm else "plain files")


if __name__ == "__main__":
    main()

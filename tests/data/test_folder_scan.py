"""The ImageFolder scan at ImageNet scale: listings only (no stat or open per image, symlink farms included),
one scan per run shared by the processes of a ``torch.distributed`` group, and a stored folder list that is
never used once the tree has changed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forked_pair import run_two_forked
from gmlp.data import folders
from gmlp.data.folders import image_folder_source


def _farm(root: Path, classes: int, per_class: int) -> Path:
    """``root/data/{train,val}/cK/*.JPEG``: every image a symlink into ``root/store`` (ImageNet's usual
    symlink farm), train's first class a symlinked folder holding a sub-folder, plus a broken image link."""
    for split in ("train", "val"):
        for c in range(classes):
            store = root / "store" / split / f"c{c}"
            store.mkdir(parents=True)
            folder = root / "data" / split / f"c{c}"
            if split == "train" and c == 0:  # a symlinked class folder, with a sub-folder
                (root / "data" / split).mkdir(parents=True, exist_ok=True)
                folder.symlink_to(store, target_is_directory=True)
                (store / "sub").mkdir()
                (store / "sub" / "deep.png").write_bytes(b"")
                (store / "broken.jpg").symlink_to(root / "store" / "missing.jpg")
                continue
            folder.mkdir(parents=True)
            for i in range(per_class):
                (store / f"{i}.JPEG").write_bytes(b"")
                (folder / f"{i}.JPEG").symlink_to(store / f"{i}.JPEG")
    return root / "data"


class _Entry:
    """An ``os.DirEntry`` that logs each question costing a ``stat`` (a symlink followed, ``stat()``)."""

    def __init__(self, entry: os.DirEntry, log: list[str]) -> None:
        self._entry, self._log, self.name, self.path = entry, log, entry.name, entry.path

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()  # from the listing's d_type

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        if follow_symlinks and self._entry.is_symlink():
            self._log.append(f"stat {self.path}")
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        if follow_symlinks and self._entry.is_symlink():
            self._log.append(f"stat {self.path}")
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        self._log.append(f"stat {self.path}")
        return self._entry.stat(follow_symlinks=follow_symlinks)

    def inode(self) -> int:
        return self._entry.inode()


class _Listing:
    def __init__(self, inner: Any, log: list[str]) -> None:
        self._inner, self._log = inner, log

    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def __iter__(self) -> _Listing:
        return self

    def __next__(self) -> _Entry:
        return _Entry(next(self._inner), self._log)

    def close(self) -> None:
        self._inner.close()


def _file_system_calls(monkeypatch: pytest.MonkeyPatch, data: Path) -> list[str]:
    """The listings and stats a scan of ``data/train`` makes (``os.scandir``, ``os.stat``, ``os.lstat``
    (``realpath``), the stats of ``DirEntry``), with no image opened."""
    log: list[str] = []
    real_scandir, real_stat, real_lstat = os.scandir, os.stat, os.lstat

    def scandir(path: Any = ".") -> _Listing:
        log.append(f"scandir {path}")
        return _Listing(real_scandir(path), log)

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        log.append(f"stat {path}")
        return real_stat(path, *args, **kwargs)

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        log.append(f"lstat {path}")
        return real_lstat(path, *args, **kwargs)

    def no_open(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an image was opened while scanning")

    import PIL.Image
    import torchvision.datasets.folder  # noqa: F401  (imported before: its own stats are not the scan's)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        m.setattr(os, "stat", stat)
        m.setattr(os, "lstat", lstat)
        m.setattr(PIL.Image, "open", no_open)
        image_folder_source(data, "train")
    return log


@pytest.mark.parametrize("farm", [True, False])
def test_the_scan_reads_listings_and_stats_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    farm: bool) -> None:
    """The file-system calls of a scan do not grow with the number of images (one listing per folder, a few
    stats per folder): in a symlink farm each image cost a ``stat`` (following its link to see whether it
    is a folder), 1.28 M network round trips per process for ImageNet. Symlinks are still followed where
    they name folders (a symlinked class folder and its sub-folder are read), and a broken image link is
    listed (it fails when loaded, as any unreadable file)."""
    calls = []
    for n in (2, 30):
        data = _farm(tmp_path / f"{farm}{n}", classes=3, per_class=n)
        if not farm:  # the same tree of plain files
            for link in (data / "train").glob("c[12]/*.JPEG"):
                link.unlink()
                link.write_bytes(b"")
        calls.append([c.replace(str(data.parent), "ROOT") for c in _file_system_calls(monkeypatch, data)
                      if str(data.parent) in c])  # (not the imports' own stats)
    assert calls[0] == calls[1]
    listings = sorted(c for c in calls[0] if c.startswith("scandir"))
    want = ["ROOT/data/train", *(f"ROOT/data/train/c{c}" for c in range(3)), "ROOT/data/train/c0/sub"]
    assert listings == sorted(f"scandir {p}" for p in want)  # (the split folders: Path.iterdir, no scandir)
    source = image_folder_source(tmp_path / f"{farm}2" / "data", "train")
    names = [os.path.relpath(p, tmp_path / f"{farm}2" / "data" / "train") for p, _ in source.samples]
    assert names == ["c0/broken.jpg", "c0/sub/deep.png", "c1/0.JPEG", "c1/1.JPEG", "c2/0.JPEG", "c2/1.JPEG"]


# --- several processes: one scan, the same list everywhere -------------------------------------------------


def _two_processes(rank: int, init_file: str, data: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    scanned: list[str] = []
    real_scan = folders._scan_class

    def counting(base: str, name: str, *args: Any) -> list[str]:
        scanned.append(name)
        return real_scan(base, name, *args)

    folders._scan_class = counting
    out: dict[str, Any] = {}
    train = image_folder_source(data, None, candidates=("train",), shared=True)
    val = image_folder_source(data, "val", train.classes, shared=True)
    out["train"], out["val"], out["scanned"] = train.samples, val.samples, scanned
    try:  # an error of process 0 is raised in every process (the others did not wait for good)
        image_folder_source(data, "nope", shared=True)
    except Exception as err:  # noqa: BLE001  (the test compares the errors)
        out["error"] = [type(err).__name__, str(err)]
    dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(out))


def test_processes_share_one_scan(tmp_path: Path) -> None:
    """With ``shared``, process 0 scans and the others receive its list: each process scanned the whole
    tree itself (8 per node, all on one file server); the lists (and so the samplers' order) are the same."""
    data = _farm(tmp_path, classes=3, per_class=4)
    run_two_forked(_two_processes, (str(tmp_path / "init"), str(data), str(tmp_path)))
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0]["scanned"] == ["c0", "c1", "c2", "c0", "c1", "c2"] and got[1]["scanned"] == []
    assert got[0]["train"] == got[1]["train"] and got[0]["val"] == got[1]["val"]
    alone = image_folder_source(data, "train")
    assert [list(s) for s in alone.samples] == got[0]["train"] and len(got[0]["val"]) == 12
    assert got[0]["error"] == got[1]["error"]
    assert got[0]["error"][0] == "FileNotFoundError" and "'nope'" in got[0]["error"][1]


def test_shared_without_a_process_group_scans(tmp_path: Path) -> None:
    data = _farm(tmp_path, classes=2, per_class=3)
    alone = image_folder_source(data, "train").samples
    assert image_folder_source(data, "train", shared=True).samples == alone


# --- a stored folder list: reused while the tree is unchanged, never once it changed --------------------


def _age(*paths: Path, when: float) -> None:
    for p in paths:
        os.utime(p, (when, when))


def _tree(root: Path) -> Path:
    for c in range(3):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            (root / "train" / f"c{c}" / f"{i}.jpg").write_bytes(b"")
    _age(root / "train", *(root / "train").iterdir(), when=time.time() - 10_000)
    return root


_CHANGES = st.lists(st.tuples(st.sampled_from(["add", "remove", "rename", "subfolder", "class", "hidden"]),
                              st.integers(0, 50)), min_size=1, max_size=6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(changes=_CHANGES)
def test_a_stored_list_is_never_stale(tmp_path_factory: pytest.TempPathFactory, changes: list) -> None:
    """After each change to the tree (an image added, removed or renamed, a sub-folder or class folder
    added, a hidden file added), the list read with ``cache_dir`` equals a fresh scan: the changed folder's
    modification time differs from the stored one. Each change is given a new, old mtime, so that the list
    is stored again after it (a folder modified within 2 s of a scan is not stored: tested below)."""
    root = _tree(tmp_path_factory.mktemp("tree"))
    cache = root.parent / f"{root.name}-cache"
    first = image_folder_source(root, "train").samples
    assert image_folder_source(root, "train", cache_dir=cache).samples == first
    assert len(list(cache.iterdir())) == 1
    when = time.time() - 5_000
    for step, (kind, k) in enumerate(changes):
        classes = sorted(p for p in (root / "train").iterdir())
        folder = classes[k % len(classes)]
        images = sorted(folder.glob("*.jpg"))
        if kind == "add":
            (folder / f"new{step}.png").write_bytes(b"")
        elif kind == "remove" and len(images) > 1:
            images[k % len(images)].unlink()
        elif kind == "rename" and images:
            images[k % len(images)].rename(folder / f"renamed{step}.jpg")
        elif kind == "subfolder":
            (folder / f"sub{step}").mkdir()
            (folder / f"sub{step}" / "x.jpg").write_bytes(b"")
            _age(folder / f"sub{step}", when=when + step)
        elif kind == "class":
            folder = root / "train" / f"new{step}"
            folder.mkdir()
            (folder / "x.jpg").write_bytes(b"")
            _age(folder, when=when + step)
            folder = folder.parent
        elif kind == "hidden":
            (folder / f".hidden{step}.jpg").write_bytes(b"")
        _age(folder, when=when + step)  # a new mtime, old enough to store the list again
        fresh = image_folder_source(root, "train").samples
        assert image_folder_source(root, "train", cache_dir=cache).samples == fresh
        assert image_folder_source(root, "train", cache_dir=cache).samples == fresh


def test_an_unchanged_tree_is_not_scanned_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored list is read without a listing of the class folders; a tree modified just now (within
    the mtime tick of a scan) is not stored; a cache folder that cannot be written is a warning."""
    root = _tree(tmp_path / "tree")
    want = image_folder_source(root, "train").samples
    assert image_folder_source(root, "train", cache_dir=tmp_path / "cache").samples == want
    with monkeypatch.context() as m:
        m.setattr(folders, "_scan_class", lambda *a: pytest.fail("the class folders were listed again"))
        assert image_folder_source(root, "train", cache_dir=tmp_path / "cache").samples == want
        # another root path to the same tree: the same list, with this root's paths
        (tmp_path / "alias").symlink_to(root)
        alias = image_folder_source(tmp_path / "alias", "train", cache_dir=tmp_path / "cache").samples
        assert alias == [(p.replace(str(root), str(tmp_path / "alias")), y) for p, y in want]
    (root / "train" / "c1" / "9.jpg").write_bytes(b"")  # modified now: scanned, not stored
    fresh = image_folder_source(root, "train", cache_dir=tmp_path / "fresh")
    assert len(fresh) == len(want) + 1 and not (tmp_path / "fresh").exists()
    (tmp_path / "file").write_bytes(b"")
    _age(root / "train" / "c1", when=time.time() - 100)
    with pytest.warns(UserWarning, match="image folder list not stored"):
        assert len(image_folder_source(root, "train", cache_dir=tmp_path / "file" / "cache")) == len(want) + 1


def test_a_link_that_becomes_a_folder_is_seen(tmp_path: Path) -> None:
    """A symlink (not named like an image) whose target folder appears later: its class folder is unchanged,
    but the stored list is not used (the link is checked again)."""
    root = _tree(tmp_path / "tree")
    (root / "train" / "c0" / "more").symlink_to(tmp_path / "later", target_is_directory=True)
    _age(root / "train" / "c0", when=time.time() - 1_000)
    first = image_folder_source(root, "train", cache_dir=tmp_path / "cache")
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "x.jpg").write_bytes(b"")
    again = image_folder_source(root, "train", cache_dir=tmp_path / "cache")
    assert len(again) == len(first) + 1 == len(image_folder_source(root, "train"))

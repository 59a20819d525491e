"""The file system fights back: a full disk (real kernel errors, through torch's and safetensors' own
writers), a folder that cannot be written, two runs given one ``--output``, a ``metrics.jsonl`` cut short.
Every test here failed before its fix (twenty-fifth session)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gmlp.train.checkpoint as checkpoint
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint, run_lock, save_checkpoint
from gmlp.train.recipe import ConfigError
from gmlp.utils.io import append_line, atomic_dir, atomic_write

resource = pytest.importorskip("resource")  # (POSIX)
in_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                    reason="SIGXFSZ is ignored from the main thread only")


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Every write past ``limit`` bytes of a file fails in the kernel with EFBIG, as a full disk fails it with
    ENOSPC: the real error through every writer (Python's, torch's C++ stream, safetensors' Rust), which no
    monkeypatch of a Python function reaches. (Lowering the soft limit needs no privilege.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the process is killed)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _save(run: Path, step: int, model_numel: int = 4, optimizer_numel: int = 4, keep_last: int = 2) -> Path:
    return save_checkpoint(run, step, {"w": torch.full((model_numel,), float(step))},
                           {"optimizer": {"m": torch.zeros(optimizer_numel)}}, {"loss": 1.0},
                           keep_last=keep_last)


def _leftovers(root: Path) -> list[str]:
    """Hidden entries under ``root``: the temporaries a failed save must not leave behind."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


# --- 1. a full disk while saving -------------------------------------------------------------------------


@in_main_thread
@pytest.mark.parametrize("big", ["model", "optimizer"])
def test_a_full_disk_while_saving_a_checkpoint_is_an_os_error_naming_its_file(tmp_path: Path,
                                                                               big: str) -> None:
    """A real write error in ``model.safetensors`` (safetensors raised a ``SafetensorError`` "(os error 27)")
    or ``optimizer.pt`` (torch raised ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``,
    which names no file and no errno) is an ``OSError`` of the errno, naming the checkpoint's file (not the
    temporary's); the last checkpoint stays, nothing is left beside it, and the save succeeds once it fits."""
    run = tmp_path / "run"
    _save(run, 3)
    sizes = {"model_numel": 40_000, "optimizer_numel": 4} if big == "model" else {
        "model_numel": 4, "optimizer_numel": 40_000}
    with _file_size_limit(64 * 1024), pytest.raises(OSError) as caught:
        _save(run, 6, **sizes)
    err = caught.value
    name = "model.safetensors" if big == "model" else "optimizer.pt"
    assert err.errno == errno.EFBIG, repr(err)
    assert err.filename == str(run / "checkpoints" / "step-00000006" / name), err.filename
    assert load_checkpoint(run).state["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-00000003"]
    assert _leftovers(run) == []
    assert load_checkpoint(_save(run, 6, **sizes)).state["step"] == 6  # "--resume" once there is room


def _failing_nth(m: pytest.MonkeyPatch, n: int, calls: list[str]) -> None:
    """ENOSPC at the ``n``-th (from 0) file-system call a save makes: opening a file to write, ``fsync``,
    ``mkdir``, ``replace``. (The writers' own writes fail for real in the test above.)"""

    def check(name: str, path: Any) -> None:
        calls.append(name)
        if len(calls) - 1 == n:  # (os.open and os.mkdir name the path, os.write and os.fsync do not)
            named = [path] if name in ("open", "mkdir") else []
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *named)

    def wrap(name: str, real: Any, writes_only: bool = False) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            if not writes_only or a[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                check(name, a[0])
            return real(*a, **kw)

        return call

    m.setattr(os, "open", wrap("open", os.open, writes_only=True))
    for name in ("fsync", "mkdir", "replace"):
        m.setattr(os, name, wrap(name, getattr(os, name)))


def test_a_save_that_fails_at_any_file_system_call_leaves_the_last_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever call of a save fails (a full disk), the error is an ``OSError`` that names a file of the
    checkpoint or ``latest.json`` (never a temporary), ``latest.json`` still names a complete checkpoint, no
    temporary and no checkpoint that nothing names is left (one written whole before ``latest.json`` failed
    stayed, taking the room the next save needs), and the next save works."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # (the test's time is the disk's flushes otherwise)
    failed_at = []
    for n in range(200):
        run = tmp_path / f"run{n}"
        _save(run, 3)
        calls: list[str] = []
        try:
            with monkeypatch.context() as m:
                _failing_nth(m, n, calls)
                _save(run, 6)
        except OSError as err:  # (an error some calls take in their stride, mkdir(exist_ok=True)'s, is not)
            failed_at.append(calls[-1])
            assert err.errno == errno.ENOSPC
            assert err.filename is not None and ".tmp" not in str(err.filename), (n, calls[-1], err)
            assert str(err.filename).startswith(str(run / "checkpoints")), (n, err)
            step = load_checkpoint(run).state["step"]
            assert step in (3, 6), n
            entries = sorted(p.name for p in (run / "checkpoints").iterdir())
            assert entries == ["latest.json", "step-00000003"] + (["step-00000006"] if step == 6 else []), (
                n, calls[-1], entries)
            assert _leftovers(run) == [], (n, calls[-1])
            assert load_checkpoint(_save(run, 6)).state["step"] == 6
            continue
        assert load_checkpoint(run).state["step"] == 6 and _leftovers(run) == []
        if len(calls) <= n:  # no call failed: every one has had its turn
            break
    else:
        raise AssertionError("the save makes more calls than this test tries")
    assert {"mkdir", "open", "fsync", "replace"} <= set(failed_at), failed_at


def test_a_save_first_removes_what_it_would_prune_so_a_full_disk_can_take_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk filled by the checkpoints of ``--keep-last 2`` and by the temporary of a killed save: resumed
    with ``--keep-last 1``, the save pruned only after it was written, so it failed again for want of the
    room the older checkpoint and the temporary held. Now they go first; the checkpoint ``latest.json``
    names is never removed, even when a newer one (that nothing names) is there."""
    run = tmp_path / "run"
    _save(run, 3)
    _save(run, 5)
    _save(run, 8)
    root = run / "checkpoints"
    (root / "latest.json").write_text(json.dumps({"tag": "step-00000005", "step": 5}))  # 8: never named
    stale = root / ".step-00000006.abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    present: list[list[str]] = []
    real = checkpoint.save_state_dict_file

    def spy(*a: Any, **kw: Any) -> None:
        present.append(sorted(p.name for p in root.iterdir() if not p.name.startswith(".step-00000006.")
                              or p.name == stale.name))
        real(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_state_dict_file", spy)
    _save(run, 6, keep_last=1)
    assert "step-00000005" in present[0] and "step-00000003" not in present[0], present
    assert stale.name not in present[0], present
    assert load_checkpoint(run).state["step"] == 6


def test_a_full_disk_while_saving_a_folder_names_the_folder(tmp_path: Path) -> None:
    """``atomic_dir`` (``final/`` of a text run, written by ``save_pretrained``): a writer's error that holds
    the errno only in its message (safetensors') is an ``OSError`` naming the folder; it is left as it was."""
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old").write_text("kept")

    class SafetensorError(Exception):
        pass

    with pytest.raises(OSError) as caught, atomic_dir(dest) as tmp:
        (tmp / "part").write_text("x")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (dest / "old").read_text() == "kept"


def test_a_full_disk_while_saving_a_tokenizer_names_its_folder(tmp_path: Path) -> None:
    """The tokenizers library's OSError for a full disk names no file; ``save_tokenizer`` names the tokenizer
    folder, and leaves no temporary beside it."""
    from gmlp.train.tokenizer import save_tokenizer

    class FullDisk:
        def save_pretrained(self, folder: str) -> None:
            (Path(folder) / "tokenizer_config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        save_tokenizer(FullDisk(), tmp_path / "tok")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_names_the_file_not_its_temporary_and_keeps_other_errors(tmp_path: Path) -> None:
    """A full disk in ``write`` (no file name) or a refused temporary is an OSError naming the file asked
    for; an error about another file (an input read while writing), or no OS error at all, is raised as is."""
    target = tmp_path / "metrics.png"
    with pytest.raises(OSError) as caught, atomic_write(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.filename == str(target)
    with pytest.raises(FileNotFoundError) as other, atomic_write(target):
        open(tmp_path / "missing-input")  # noqa: SIM115
    assert other.value.filename == str(tmp_path / "missing-input")
    with pytest.raises(KeyError), atomic_write(target):
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


# --- 2. and 3. the run folder: one that cannot be written, one already in use ------------------------------


def test_a_second_holder_of_a_run_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two runs with one ``--output`` wrote checkpoints and metrics over each other's, both reporting
    success. The second is refused at once, told who holds the folder; the lock and a folder made only for
    it go when the holder ends."""
    out = tmp_path / "new" / "run"
    with run_lock(out):
        record = json.loads((out / ".gmlp-run.lock").read_text())
        assert record["pid"] == os.getpid()
        message = rf"output '{re.escape(str(out))}' is in use by another run \(pid {os.getpid()} on host "
        with pytest.raises(ConfigError, match=message), run_lock(out):
            pass
        assert (out / ".gmlp-run.lock").exists()  # (the refused one took nothing away)
    assert not (tmp_path / "new").exists()  # (made for the lock, and left empty)
    out.mkdir(parents=True)
    with run_lock(out):
        (out / "metrics.jsonl").write_text("")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # a folder with a run stays, without a lock
    with run_lock(out, enabled=False), run_lock(out):  # (enabled=False: another process of a distributed run)
        pass


def test_a_run_folder_whose_holder_died_is_free(tmp_path: Path) -> None:
    """The lock goes with its process, however it ends (``kill -9``): a dead run never keeps its folder,
    though its lock file (and the pid in it) is still there."""
    out = tmp_path / "run"
    out.mkdir()
    hold = (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(out / '.gmlp-run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere', 'started': 'then'}).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        holder = rf"pid {proc.pid} on host elsewhere, started then"
        with pytest.raises(ConfigError, match=holder), run_lock(out):
            pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(out):
        assert json.loads((out / ".gmlp-run.lock").read_text())["pid"] == os.getpid()


def test_a_lock_file_another_user_left_does_not_keep_the_folder(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock file left by another user's run killed with -9 (theirs, mode 0644: this user cannot open it
    for writing) used to refuse the folder for good with EACCES; flock needs only a read-only open."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".gmlp-run.lock").write_text('{"pid": 1, "host": "elsewhere", "started": "then"}\n')
    real_open = os.open

    def as_another_user(path, flags, *args):  # (the tests run as root, which permissions do not stop)
        if str(path).endswith(".gmlp-run.lock") and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", as_another_user)
    with run_lock(out), pytest.raises(ConfigError, match="in use by another run"), run_lock(out):
        pass


def test_every_process_of_a_distributed_run_stops_when_process_0_cannot_hold_it(tmp_path: Path) -> None:
    """Only process 0 takes the lock: when it was refused, it raised alone and the others went on to wait for
    it in a collective (until the launcher or a timeout ended them). Now every process raises."""
    import socket

    out = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "import sys\n"
        "from gmlp.train import vision\n"
        "from gmlp.train.distributed import init_distributed, shutdown\n"
        "from gmlp.train.recipe import ConfigError\n"
        "env = init_distributed('cpu')\n"
        "try:\n"
        f"    with vision._holding_output({str(out)!r}, env):\n"
        "        print('held', flush=True)\n"
        "except ConfigError as err:\n"
        "    print('refused:', err, flush=True)\n"
        "finally:\n"
        "    shutdown(env)\n"
    )
    with run_lock(out):  # another run holds the folder
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                     "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
            for rank in (0, 1)
        ]
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert "in use by another run" in outputs[0]
    assert outputs[1].startswith("refused: process 0 could not take the output folder"), outputs[1]


def test_an_output_that_cannot_be_a_run_folder_is_refused_up_front(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file, a folder under a file: a ConfigError naming the path; a folder that cannot be written: the
    OSError naming it (which the CLI words in one line). Raised when the lock is taken, before any training
    (the runs failed only at their first write, after loading the data and building the model, with a
    ``FileExistsError`` or ``OSError`` traceback)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=rf"output '{re.escape(str(afile))}' is a file, not a folder"), \
            run_lock(afile):
        pass
    with pytest.raises(ConfigError, match=rf"'{re.escape(str(afile))}' is a file, not a folder"), \
            run_lock(afile / "run"):
        pass
    out = tmp_path / "read-only"
    out.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path: Any) -> None:  # (as root, chmod stops no write: a read-only file system does)
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def open_(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", open_)
    for run in (out, out / "a" / "b"):
        with pytest.raises(OSError, match="Read-only file system") as caught, run_lock(run):
            pass
        assert caught.value.filename == str(run / ".gmlp-run.lock")
    assert list(out.iterdir()) == []  # (the folders it made for the lock are gone again)
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **kw: (refuse(path), real_mkdir(path, *a, **kw)))
    with pytest.raises(OSError, match="Read-only file system") as caught, run_lock(out / "sub" / "run"):
        pass
    assert str(caught.value.filename).startswith(str(out / "sub"))
    assert list(out.iterdir()) == []


def test_train_vision_refuses_a_folder_in_use_before_reading_any_data(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """(Needs ``train_vision`` to hold its output with :func:`run_lock`.)"""
    from gmlp.train import vision
    from gmlp.train.vision_config import VisionTrainConfig

    def no_data(*a: Any, **kw: Any) -> None:
        raise AssertionError("the data was loaded before the output was checked")

    monkeypatch.setattr(vision, "load_data", no_data)
    out = tmp_path / "run"
    config = VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", output=str(out), epochs=1,
                               progress=False, tensorboard=False, plot=False)
    with run_lock(out), pytest.raises(ConfigError, match="is in use by another run"):
        vision.train_vision(config)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        vision.train_vision(VisionTrainConfig(**{**config.__dict__, "output": str(tmp_path / "afile")}))


def test_text_runs_refuse_a_folder_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Needs ``pretrain`` and ``finetune`` to hold their output with :func:`run_lock`.)"""
    from gmlp.train import text

    def no_data(*a: Any, **kw: Any) -> None:
        raise AssertionError("the corpus was read before the output was checked")

    monkeypatch.setattr(text, "load_text_splits", no_data)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words\n\nand a few more")
    out = tmp_path / "run"
    with run_lock(out), pytest.raises(ConfigError, match="is in use by another run"):
        text.pretrain(text.PretrainConfig(corpus=str(corpus), output=str(out), steps=1, progress=False))


# --- 4. metrics.jsonl --------------------------------------------------------------------------------------


def test_an_append_the_disk_refuses_part_way_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record written in part (a full disk after the first bytes) left a partial last line; now the file
    is cut back to what it held and the error names it (``write``'s own names no file)."""
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    before = path.read_bytes()
    real_write = os.write

    def partial(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", partial)
    with pytest.raises(OSError) as caught:
        append_line(path, json.dumps({"step": 2, "loss": 0.5}))
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_an_append_after_a_line_cut_short_starts_a_line_of_its_own(tmp_path: Path, cut: int) -> None:
    """A file that ends in part of a record (a process killed while writing it) gets the next record on a
    line of its own: every reader then loses the partial line alone, not the good one run on from it."""
    from gmlp.utils.io import read_jsonl_records

    path = tmp_path / "metrics.jsonl"
    full = json.dumps({"epoch": 1, "step": 5, "train_loss": 2.5})
    path.write_text(full + "\n" + full[:cut])
    append_line(path, json.dumps({"epoch": 2, "step": 10}))
    lines = path.read_text().splitlines()
    assert lines[0] == full and lines[1] == full[:cut] and json.loads(lines[2]) == {"epoch": 2, "step": 10}
    with pytest.warns(UserWarning, match="skipped 1 line"):
        assert [r["step"] for _, r in read_jsonl_records(path)] == [5, 10]


def test_every_metrics_reader_skips_lines_that_are_no_records(tmp_path: Path) -> None:
    """A line cut short by a kill, JSON that is not an object, an object without a step, bytes that are not
    UTF-8: the public reader (``iter_metrics``), compare-vit's and both resume truncations skip them (with a
    warning) and keep the records; they raised ``JSONDecodeError`` / ``KeyError`` / ``UnicodeDecodeError``."""
    from gmlp.train import compare, text, vision

    path = tmp_path / "metrics.jsonl"
    good = [{"epoch": 1, "step": 5, "loss": 2.5}, {"epoch": 2, "step": 10, "loss": 2.0}]
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b'{"epoch": 1, "st', b"[1, 2]", b'{"note": 1}',
                                 b"\xff\xfe", json.dumps(good[1]).encode()]) + b"\n")
    with pytest.warns(UserWarning, match="metrics.jsonl.*skipped"):
        assert list(text.iter_metrics(path)) == [good[0], {"note": 1}, good[1]]
    with pytest.warns(UserWarning, match="skipped"):
        assert compare._records(tmp_path) == [good[0], {"note": 1}, good[1]]
    original = path.read_bytes()
    with pytest.warns(UserWarning, match="skipped"):
        vision._truncate_metrics(path, 5)
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:1]
    path.write_bytes(original)
    with pytest.warns(UserWarning, match="skipped"):
        text._MetricsLog(path, True, 5)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [good[0], {"note": 1}]


def test_a_full_disk_mid_run_is_one_line_from_gmlp_pretrain(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real writers (not a patched save function): the text CLI turned only ``OSError`` into a
    one-line error, and torch's ``RuntimeError`` for a full disk went out as a traceback."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGXFSZ is ignored from the main thread only")
    from text_corpus import corpus_and_tokenizer  # (tests/train is on the path, as for the other files)

    from gmlp.cli import main

    corpus, tok = corpus_and_tokenizer(tmp_path)
    run = tmp_path / "run"
    args = ["pretrain", "--corpus", str(corpus), "--tokenizer", str(tok), "--arch", "bert", "--layers", "1",
            "--hidden", "64", "--ffn", "128", "--seq-len", "32", "--batch-size", "4", "--no-progress",
            "--steps", "2", "--save-every", "1", "--eval-every", "2", "--eval-batches", "1",
            "--valid-fraction", "0.2", "--output", str(run)]
    assert main([*args, "--stop-after-steps", "1"]) == 0
    size = (latest_checkpoint(run) / "optimizer.pt").stat().st_size
    capsys.readouterr()
    with _file_size_limit(size // 2):
        assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    named = r"'.*step-00000002/(optimizer\.pt|model\.safetensors)'"
    assert re.search(rf"^gmlp pretrain: error: File too large: {named}", err, re.M), err
    assert load_checkpoint(run).state["step"] == 1 and _leftovers(run / "checkpoints") == []
    assert main([*args, "--resume"]) == 0
    assert load_checkpoint(run).state["step"] == 2

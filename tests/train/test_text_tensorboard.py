"""``gmlp pretrain`` / ``gmlp finetune`` write their metrics.jsonl records as TensorBoard scalars too
(``OUTPUT/tensorboard``, tagged ``SPLIT/KEY`` as ``gmlp train``'s ``train/loss``), one point per step and tag
after a resume, closed however the run ends, none with ``--no-tensorboard`` (twenty-seventh session: before,
the text commands wrote no event files)."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from text_corpus import SENTENCES, corpus_and_tokenizer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gmlp.train import text as pipelines  # noqa: E402
from gmlp.train.tensorboard import open_writer  # noqa: E402
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain  # noqa: E402

TINY = dict(layers=1, hidden=16, ffn=32, seq_len=32, batch_size=4, progress=False)
ARCH = "gmlp" if pipelines.gmlp_available() else "bert"


@pytest.fixture
def corpus_and_tok(tmp_path: Path) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path)


def _pretrain_cfg(corpus: Path, tok: Path, out: Path, **kw: Any) -> PretrainConfig:
    opts: dict[str, Any] = dict(TINY, arch=ARCH, steps=4, log_every=1, save_every=0, eval_every=2,
                                eval_batches=1, valid_fraction=0.2)
    opts.update(kw)
    return PretrainConfig(output=str(out), corpus=[str(corpus)], tokenizer=str(tok), **opts)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars(run: Path) -> list[tuple[str, int, float]]:
    """Every point TensorBoard shows of ``run``'s event files (after its purges), as (tag, step, value)."""
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def _expected(records: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """The records' numbers as TensorBoard stores them (float32), tagged SPLIT/KEY."""
    return [
        (f"{r['split']}/{k}", r["step"], float(np.float32(v)))
        for r in records for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def _assert_same_points(run: Path) -> None:
    got, want = _scalars(run), _expected(_records(run))
    counts = Counter((tag, step) for tag, step, _ in got)
    assert [k for k, n in counts.items() if n > 1] == []  # one point per tag and step
    assert sorted(got) == sorted(want)


def _after_the_last_event_file_second(run: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and the names begin with the second they
    were made in: a resumed run's file made in the same second as the last one may sort before it."""
    newest = max(int(p.name.split(".")[3]) for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    time.sleep(max(0.0, newest + 1.05 - time.time()))


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]


def test_pretrain_event_files_hold_the_metrics_jsonl_records(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    before = _writer_threads()
    pretrain(_pretrain_cfg(corpus, tok, run))
    assert _writer_threads() == before  # closed
    tags = {tag for tag, _, _ in _scalars(run)}
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/tokens_per_s", "validation/loss",
            "validation/perplexity", "validation/masked_accuracy"} <= tags
    _assert_same_points(run)


def test_finetune_event_files_hold_the_records_and_a_resumed_finished_run_its_test_scores_once(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """The test record is written again when a finished run is resumed (metrics.jsonl drops the old one):
    TensorBoard shows it once, and the validation and train points of the last step still."""
    _, tok = corpus_and_tok
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    run = tmp_path / "ft"
    kw: dict[str, Any] = dict(TINY, arch=ARCH, train_file=str(data), validation_file=str(data),
                              test_file=str(data), steps=2, log_every=1, tokenizer=str(tok), output=str(run))
    finetune(FinetuneConfig(**kw))
    tags = {tag for tag, _, _ in _scalars(run)}
    assert {"train/loss", "train/lr", "train/steps_per_s", "validation/accuracy", "test/accuracy"} <= tags
    _assert_same_points(run)
    _after_the_last_event_file_second(run)
    finetune(FinetuneConfig(**kw, resume=True))  # nothing left to train: final and test metrics again
    assert [r["split"] for r in _records(run)].count("test") == 1
    _assert_same_points(run)
    assert {tag for tag, _, _ in _scalars(run)} == tags


def test_a_run_that_failed_after_its_checkpoint_and_resumed_shows_one_point_per_step(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed after logging steps 3 and 4 past its checkpoint at step 2, then resumed: steps 3 and 4
    are shown once (the resumed run's, as in metrics.jsonl), step 2's train and validation points still (a
    purge from the checkpoint's step alone hid them: they are not logged again), and the failed run closed
    its writer."""
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    real = pipelines.save_checkpoint

    def killed_at_step_4(out: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        if step == 4:
            raise RuntimeError("killed")
        return real(out, step, *args, **kwargs)

    monkeypatch.setattr(pipelines, "save_checkpoint", killed_at_step_4)
    before = _writer_threads()
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(_pretrain_cfg(corpus, tok, run, save_every=2))
    assert _writer_threads() == before  # closed by the error
    assert {(t, s) for t, s, _ in _scalars(run)} >= {("train/loss", 3), ("train/loss", 4)}
    monkeypatch.setattr(pipelines, "save_checkpoint", real)
    _after_the_last_event_file_second(run)
    pretrain(_pretrain_cfg(corpus, tok, run, save_every=2, resume=True))
    _assert_same_points(run)
    assert sorted(s for t, s, _ in _scalars(run) if t == "train/loss") == [1, 2, 3, 4]
    assert sorted(s for t, s, _ in _scalars(run) if t == "validation/loss") == [2, 4]


def test_stopped_and_resumed_pretrain_has_one_point_per_step(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    pretrain(_pretrain_cfg(corpus, tok, run, stop_after_steps=2))
    _after_the_last_event_file_second(run)
    pretrain(_pretrain_cfg(corpus, tok, run, resume=True))
    _assert_same_points(run)
    assert sorted(s for t, s, _ in _scalars(run) if t == "train/loss") == [1, 2, 3, 4]


def test_overwrite_removes_the_old_runs_event_files(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """They were kept: TensorBoard showed the old run's points beside the new one's, at the same steps."""
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    pretrain(_pretrain_cfg(corpus, tok, run, steps=1))
    pretrain(_pretrain_cfg(corpus, tok, run, steps=1, overwrite=True))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_same_points(run)


def test_no_tensorboard_writes_no_event_files(tmp_path: Path, corpus_and_tok: tuple[Path, Path]) -> None:
    corpus, tok = corpus_and_tok
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "run", steps=1, tensorboard=False))
    assert (tmp_path / "run" / "metrics.jsonl").read_text()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    log = pipelines._MetricsLog(tmp_path / "metrics.jsonl", False, None, tensorboard=True)
    log.log({"step": 1, "split": "train", "loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_the_flag_parses_as_gmlp_train_s() -> None:
    from gmlp.cli import build_parser
    from gmlp.train.text import config_from_namespace

    parser = build_parser()
    for command, cls in (("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        assert cls().tensorboard is None  # (written when tensorboard is installed)
        for flag, value in (("--tensorboard", True), ("--no-tensorboard", False)):
            assert config_from_namespace(cls, parser.parse_args([command, flag])).tensorboard is value


def test_tensorboard_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As gmlp train: left out, no event files and no error; --tensorboard, an error naming it."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert open_writer(tmp_path, None) is None
    with pytest.raises(ImportError, match=r"--tensorboard needs the tensorboard package"):
        open_writer(tmp_path, True)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_missing_stops_every_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--tensorboard without the package: the other processes of a multi-process run raise the error too
    (process 0 alone did, and they waited for it in their next collective), as the CLI's missing-package
    message (``ModuleNotFoundError`` of tensorboard)."""
    import importlib.util

    from gmlp.cli import missing_optional_package

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"--tensorboard needs the tensorboard package") as err:
        pipelines._MetricsLog(tmp_path / "metrics.jsonl", False, None, tensorboard=True)
    assert missing_optional_package(err.value) == "tensorboard"
    pipelines._MetricsLog(tmp_path / "metrics.jsonl", False, None, tensorboard=None)  # (left out: no error)
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_number_is_a_point_too(tmp_path: Path) -> None:
    """A train record with no masked token in its window logs a NaN loss (metrics.jsonl: NaN)."""
    log = pipelines._MetricsLog(tmp_path / "metrics.jsonl", True, None, tensorboard=True)
    with log:
        log.log({"step": 1, "split": "train", "loss": math.nan, "lr": 0.5, "note": "x", "r": None})
    ((tag, step, value), (tag2, _, lr)) = sorted(_scalars(tmp_path))
    assert (tag, step, tag2, lr) == ("train/loss", 1, "train/lr", 0.5) and math.isnan(value)


def test_a_resumed_vision_run_keeps_the_checkpoint_steps_points(tmp_path: Path) -> None:
    """``gmlp train --resume`` purged TensorBoard at the checkpoint's step, whose points are not logged
    again: after a 1-epoch run extended to 2, ``train/loss`` showed steps 1, 3, 4 and the test accuracy step
    4 only."""
    from gmlp.train.vision import VisionTrainConfig, train_vision

    cfg = dict(model="gmlp_micro4_28", dataset="digits", batch_size=32, warmup_steps=0, augment=False,
               progress=False, train_subset=64, test_subset=32, threads=1, plot=False, log_every=1,
               output=str(tmp_path / "run"))
    train_vision(VisionTrainConfig(epochs=1, **cfg))
    _after_the_last_event_file_second(tmp_path / "run")
    train_vision(VisionTrainConfig(epochs=2, **cfg), resume=True)
    points = _scalars(tmp_path / "run")
    assert [s for tag, s, _ in points if tag == "train/loss"] == [1, 2, 3, 4]
    assert [s for tag, s, _ in points if tag == "epoch/test_accuracy"] == [2, 4]

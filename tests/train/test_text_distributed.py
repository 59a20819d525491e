"""``gmlp pretrain`` / ``gmlp finetune`` under several processes (``torchrun``, gloo on CPU) (twentieth
session: each test failed before its fix).

2 processes with ``--batch-size B`` train as one process with ``--batch-size 2B`` (no dropout): the same
weights, training losses and held-out metrics; only process 0 writes; an evaluation split with fewer
examples than processes finishes; a run stopped part way resumes to the uninterrupted result. Every launch
has a timeout after which the whole process tree is killed, so a collective out of step fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, documents, write_corpus
from torchrun_helpers import launch, torchrun_cmd

from gmlp.train import text as pipelines
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain
from gmlp.train.tokenizer import train_tokenizer

TIMEOUT = 150  # seconds per launch; a normal one takes ~10 s on 2 cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
TINY = ["--layers", "2", "--hidden", "32", "--ffn", "64", "--seq-len", "32", "--no-progress"]
# 46 training / 5 held-out blocks of 32 tokens; 2 processes x batch 2 x 2 accumulation micro-batches
PRETRAIN = ["pretrain", *TINY, "--arch", ARCH, "--steps", "4", "--log-every", "2", "--save-every", "0",
            "--eval-every", "2", "--valid-fraction", "0.2", "--grad-accum", "2"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m gmlp ARGS`` with the default ``--device auto``."""
    cmd = torchrun_cmd(*args)
    code, out, err = launch(cmd, ENV, cwd, TIMEOUT)
    assert code == 0, f"exit {code}\n{out[-2000:]}\n--- stderr\n{err[-6000:]}"
    return subprocess.CompletedProcess(cmd, 0, out, err)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text-ddp")
    write_corpus(root / "corpus.txt")
    train_tokenizer(documents(), vocab_size=150, model_max_length=32).save_pretrained(str(root / "tok"))
    rows = "".join(f'"{s}",{(i * 0.37) % 5:.3f}\n' for i, s in enumerate(SENTENCES * 2))
    (root / "train.csv").write_text("sentence,score\n" + rows)
    (root / "one.csv").write_text("sentence,score\n" + rows.splitlines()[0] + "\n")  # fewer than processes
    (root / "five.csv").write_text("sentence,score\n" + "".join(rows.splitlines(True)[1:6]))  # 3 + 2
    return root


@pytest.fixture(scope="module")
def ddp_pretrain(files: Path) -> tuple[Path, str]:
    """2 processes, --batch-size 2 --grad-accum 2, uninterrupted; and their stdout."""
    run = files / "ddp-pretrain"
    proc = _torchrun([*PRETRAIN, "--corpus", "corpus.txt", "--tokenizer", "tok", "--batch-size", "2",
                      "--output", str(run)], files)
    return run, proc.stdout


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")} for x in lines]


def _assert_same_records(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for k, v in x.items():
            # a correlation of nearly constant predictions (a tiny model after 4 steps) magnifies the
            # float32 differences of the two runs' weights: compare it to 1e-3
            tol = dict(abs=1e-3) if k in ("pearson", "spearman") else dict(rel=1e-5, abs=1e-7)
            assert y[k] == (pytest.approx(v, **tol) if isinstance(v, float) else v), (k, x, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_auto_on_a_cpu_joins_the_launched_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate joins torchrun's processes on a CPU only with cpu=True: with the default --device auto
    every process trained alone (each its own "main process", all writing the same files)."""
    import accelerate

    seen: list[dict] = []

    class Recorder:
        num_processes = 1

        def __init__(self, **kwargs: object) -> None:
            seen.append(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recorder)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pipelines._make_accelerator(PretrainConfig())
    assert seen[-1]["cpu"] is True
    # and a launcher's processes that accelerate did not join are an error, not N independent runs
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # (a launch without them is refused earlier: test_launch_environment.py)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(RuntimeError, match=r"started 2 processes \(WORLD_SIZE=2\) but accelerate joined 1"):
        pipelines._make_accelerator(PretrainConfig())


def test_masks_do_not_depend_on_the_split_into_micro_batches(tmp_path: Path, files: Path) -> None:
    """--batch-size 2 --grad-accum 2 trains as --batch-size 4 with the real masks (they were drawn per
    micro-batch, seeded by its index: other masks for another split, and for another number of processes)."""
    base = dict(output="", corpus=[str(files / "corpus.txt")], tokenizer=str(files / "tok"), arch=ARCH,
                layers=2, hidden=32, ffn=64, seq_len=32, progress=False, steps=2, log_every=1, save_every=0,
                eval_every=0, valid_fraction=0.2)
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainConfig(**{**base, "output": str(one)}, batch_size=4))
    pretrain(PretrainConfig(**{**base, "output": str(two)}, batch_size=2, grad_accum=2))
    _assert_same_weights(one, two)
    _assert_same_records(one, two)


def test_two_processes_pretrain_as_one_with_the_global_batch(
    tmp_path: Path, files: Path, ddp_pretrain: tuple[Path, str]
) -> None:
    """Weights, logged training losses (the mean over processes and micro-batches) and held-out metrics of
    2 processes x 2 micro-batches of 2 equal those of one process with batch 8; process 0 alone reports and
    writes (one record per step, not one per process)."""
    run, stdout = ddp_pretrain
    single = tmp_path / "single"
    pretrain(PretrainConfig(output=str(single), corpus=[str(files / "corpus.txt")],
                            tokenizer=str(files / "tok"), arch=ARCH, layers=2, hidden=32, ffn=64, seq_len=32,
                            progress=False, steps=4, log_every=2, save_every=0, eval_every=2,
                            valid_fraction=0.2, batch_size=8))
    assert stdout.count("done at step 4") == 1
    _assert_same_weights(single, run)
    _assert_same_records(single, run)
    assert [r["split"] for r in _records(run)] == ["train", "validation"] * 2
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2


def test_bert_evaluation_with_fewer_examples_than_processes_finishes(tmp_path: Path, files: Path) -> None:
    """A validation split of 1 example under 2 processes: the process without an example skipped the
    forward pass whose DDP buffer broadcast (BERT's position ids) process 0 waited in for good. The dev and
    test metrics (regression, 5 test examples shared 3 + 2) equal one process's, as do the weights."""
    args = ["--arch", "bert", *TINY, "--tokenizer", "tok", "--train-file", "train.csv", "--validation-file",
            "one.csv", "--test-file", "five.csv", "--label-column", "score", "--num-labels", "1", "--dropout",
            "0", "--steps", "3", "--log-every", "1", "--eval-batch-size", "2"]
    run = tmp_path / "ddp"
    _torchrun(["finetune", *args, "--batch-size", "2", "--output", str(run)], files)
    single = tmp_path / "single"
    cwd = Path.cwd()
    try:
        os.chdir(files)
        cfg = FinetuneConfig(arch="bert", layers=2, hidden=32, ffn=64, seq_len=32, progress=False,
                             tokenizer="tok", train_file="train.csv", validation_file="one.csv",
                             test_file="five.csv", label_column="score", num_labels=1, dropout=0.0, steps=3,
                             log_every=1, eval_batch_size=2, batch_size=4, output=str(single))
        finetune(cfg)
    finally:
        os.chdir(cwd)
    _assert_same_weights(single, run)
    _assert_same_records(single, run)
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["count"] == 5 and test["pearson"] is not None


@pytest.mark.slow
def test_two_process_resume_equals_the_uninterrupted_run(
    tmp_path: Path, files: Path, ddp_pretrain: tuple[Path, str]
) -> None:
    """2 processes stopped after step 1 (mid log window, accumulation on) and resumed on 2 processes end with
    the weights and metrics.jsonl of the uninterrupted 2-process run."""
    reference, _ = ddp_pretrain
    run = tmp_path / "stopped"
    common = [*PRETRAIN, "--corpus", "corpus.txt", "--tokenizer", "tok", "--batch-size", "2", "--output",
              str(run)]
    _torchrun([*common, "--stop-after-steps", "1"], files)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 1
    resumed = _torchrun([*common, "--resume"], files)
    assert resumed.stderr.count("resumed from") == 1  # process 0 only
    _assert_same_weights(reference, run)
    _assert_same_records(reference, run)

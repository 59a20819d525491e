"""``torchrun --nproc_per_node=2 -m gmlp train`` (DDP, gloo on CPU) equals one process with the same global
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gmlp.train.checkpoint import load_checkpoint
from gmlp.train.vision import VisionTrainConfig, train_vision
from gmlp.utils.io import load_state_dict_file

ARGS = [
    "--model",
    "gmlp_micro4_28",
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--warmup-steps",
    "2",
    "--train-subset",
    "256",
    "--test-subset",
    "96",
    "--no-progress",
    "--threads",
    "1",
    "--no-tensorboard",
    "--no-plot",
]


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gmlp",
        "train",
        *ARGS,
        "--output",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # only rank 0 reports (and writes)

    single = VisionTrainConfig(
        model="gmlp_micro4_28",
        dataset="digits",
        epochs=2,
        batch_size=64,
        warmup_steps=2,
        train_subset=256,
        test_subset=96,
        progress=False,
        threads=1,
        tensorboard=False,
        plot=False,
        output=str(tmp_path / "single"),
    )
    result = train_vision(single)
    a = load_state_dict_file(tmp_path / "ddp" / "model.safetensors")[0]
    b = load_state_dict_file(tmp_path / "single" / "model.safetensors")[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    ddp_records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ddp_records] == [1, 2]
    assert abs(ddp_records[-1]["test_accuracy"] - result["test_accuracy"]) <= 1 / 96
    assert abs(ddp_records[-1]["train_loss"] - result["train_loss"]) < 1e-4
    assert load_checkpoint(tmp_path / "ddp").state["fingerprint"]["world_size"] == 2

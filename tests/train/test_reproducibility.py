"""Reproducibility on the CPU: the same seed gives the same run bit for bit, another seed another init and
data order, and a resume (at an epoch boundary, with the settings a resume may change) the uninterrupted run's
weights and metrics; a seed outside torch's generator range trains (twenty-fifth session: the seed test
failed before its fix, the others cover gaps of the resume tests in test_train_vision.py,
test_vision_features.py, test_text_fault_tolerance.py and test_text_pipelines.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, corpus_and_tokenizer

import gmlp.train.vision as vision
from gmlp.train import text as pipelines
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain
from gmlp.train.vision import VisionTrainConfig, train_vision
from gmlp.utils.io import load_state_dict_file

# 96 training images, batch 32: 3 steps per epoch
TINY = dict(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=2, warmup_steps=2, lr=3e-3,
            train_subset=96, test_subset=32, eval_batch_size=32, progress=False, threads=1, tensorboard=False,
            plot=False)
# every random choice a step makes: shift/flip, Mixup/CutMix per element, erasing, drop path, dropout, EMA
STOCHASTIC = dict(mixup=0.8, cutmix=1.0, mixup_mode="elem", mixup_prob=0.7, reprob=0.5, remode="rand",
                  recount=2, drop_path_rate=0.2, drop_rate=0.1, ema=True, ema_decay=0.9, ema_warmup=True,
                  grad_accum_steps=2)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(path)[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(run: Path, volatile: tuple[str, ...] = ("epoch_seconds", "steps_per_s", "tokens_per_s")) -> list:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in volatile} for x in lines]


def test_a_seed_outside_the_generators_range_trains_as_its_residue_modulo_2_64(tmp_path: Path) -> None:
    """``--seed 18446744073709551621`` (2**64 + 5; Python ints and the CLI take it) stopped ``gmlp train``
    (and ``compare-vit``) at the model's init with a bare ``ValueError: Overflow when unpacking long long``
    traceback: torch's generators take seeds in [-2**63, 2**64). The data order and the step seeds already
    reduced the seed modulo 2**64; the init now does too, so the run is seed 5's, bit for bit (and every
    seed in range inits as before: torch reads a negative seed modulo 2**64 itself)."""
    cfg = VisionTrainConfig(**{**TINY, "epochs": 1}, output=str(tmp_path / "big"), seed=2**64 + 5)
    train_vision(cfg)
    train_vision(dataclasses.replace(cfg, seed=5, output=str(tmp_path / "five")))
    name = "model.safetensors"
    assert _same(_weights(tmp_path / "big" / name), _weights(tmp_path / "five" / name))
    assert _records(tmp_path / "big") == _records(tmp_path / "five")


def test_the_same_seed_repeats_bit_for_bit_and_another_changes_the_init_and_the_data_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every stochastic feature on, two runs of one seed give the same weights, EMA weights and metrics,
    bit for bit; another seed starts from other weights and reads the data in another order."""
    seen: dict[str, dict[str, Any]] = {}
    current = {"run": ""}
    build, global_batch = vision.build_model, vision.StepBatches.global_batch

    def recording_build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build(*args, **kwargs)
        seen[current["run"]]["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def recording_batch(self: Any, step: int) -> torch.Tensor:
        batch = global_batch(self, step)
        seen[current["run"]]["order"].append(batch.tolist())
        return batch

    monkeypatch.setattr(vision, "build_model", recording_build)
    monkeypatch.setattr(vision.StepBatches, "global_batch", recording_batch)
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        current["run"], seen[run] = run, {"order": []}
        train_vision(VisionTrainConfig(**TINY, **STOCHASTIC, seed=seed, output=str(tmp_path / run)))
    a, b, c = (tmp_path / r for r in "abc")
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert _same(_weights(a / name), _weights(b / name)), name
        assert not _same(_weights(a / name), _weights(c / name)), name
    assert _records(a) == _records(b)
    assert _same(seen["a"]["init"], seen["b"]["init"]) and seen["a"]["order"] == seen["b"]["order"]
    assert len(seen["a"]["order"]) == 6
    # another seed: other initial weights (every randomly initialised matrix: not the zero-initialised head)
    # and another order in each epoch
    matrices = [k for k, v in seen["a"]["init"].items() if v.dim() >= 2 and v.std() > 0]
    assert matrices and all(not torch.equal(seen["a"]["init"][k], seen["c"]["init"][k]) for k in matrices)
    for epoch in range(2):
        steps = slice(3 * epoch, 3 * epoch + 3)
        assert seen["a"]["order"][steps] != seen["c"]["order"][steps]


def test_a_resume_at_an_epoch_boundary_in_bf16_with_grad_checkpointing_turned_on_is_exact(
    tmp_path: Path,
) -> None:
    """``grad_checkpointing`` may change at a resume without a warning (it changes memory, not results): a run
    stopped at the end of its first epoch and resumed with it, in bf16 autocast, with drop path and dropout
    (whose masks the recomputation in backward must replay), ends with the uninterrupted run's weights and
    per-epoch metrics, bit for bit."""
    cfg = VisionTrainConfig(**TINY, precision="bf16", drop_path_rate=0.2, drop_rate=0.1, reprob=0.5,
                            output=str(tmp_path / "full"))
    train_vision(cfg)
    cut = dataclasses.replace(cfg, output=str(tmp_path / "cut"))
    assert train_vision(dataclasses.replace(cut, max_steps=3))["step"] == 3
    train_vision(dataclasses.replace(cut, grad_checkpointing=True), resume=True)
    name = "model.safetensors"
    assert _same(_weights(tmp_path / "full" / name), _weights(tmp_path / "cut" / name))
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    assert [r["epoch"] for r in _records(tmp_path / "full")] == [1, 2]


ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
TEXT = dict(arch=ARCH, layers=2, hidden=32, ffn=64, seq_len=32, batch_size=4, progress=False, dropout=0.1)


def test_pretraining_resumes_bit_for_bit_in_bf16_with_accumulation(tmp_path: Path) -> None:
    """bf16 autocast on the CPU with two micro-batches a step and dropout: a run stopped between two
    checkpoints and log records resumes to the uninterrupted run's weights and records, bit for bit (the
    docs said "to float tolerance")."""
    corpus, tok = corpus_and_tokenizer(tmp_path)
    opts = dict(TEXT, corpus=[str(corpus)], tokenizer=str(tok), steps=5, grad_accum=2, precision="bf16",
                warmup=2, log_every=2, save_every=2, eval_every=4, eval_batches=1, valid_fraction=0.2)
    pretrain(PretrainConfig(output=str(tmp_path / "full"), **opts))
    pretrain(PretrainConfig(output=str(tmp_path / "cut"), stop_after_steps=3, **opts))
    pretrain(PretrainConfig(output=str(tmp_path / "cut"), resume=True, **opts))
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("full", "cut"))
    assert _same(a, b)
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


def test_finetuning_resumes_bit_for_bit_across_an_epoch_boundary_with_accumulation(tmp_path: Path) -> None:
    """A finetuning run (dropout, two micro-batches a step, 2.5 epochs of 3 steps) stopped mid-epoch and
    resumed ends with the uninterrupted run's weights and records (per-epoch validation included), bit for
    bit; test_finetune_resume checks the weights to a tolerance only."""
    _, tok = corpus_and_tokenizer(tmp_path)
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 3)))
    opts = dict(TEXT, train_file=str(data), validation_file=str(data), tokenizer=str(tok), epochs=2.5,
                grad_accum=2, batch_size=3, log_every=2)
    finetune(FinetuneConfig(output=str(tmp_path / "full"), **opts))
    finetune(FinetuneConfig(output=str(tmp_path / "cut"), stop_after_steps=4, **opts))
    finetune(FinetuneConfig(output=str(tmp_path / "cut"), resume=True, **opts))
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("full", "cut"))
    assert _same(a, b)
    records = _records(tmp_path / "full")
    assert _records(tmp_path / "cut") == records
    assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6, 8]

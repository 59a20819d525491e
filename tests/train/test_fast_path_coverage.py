"""The CPU fast path (oneDNN products of :mod:`gmlp.kernels.cpu_linear`) is taken where users run the models.

The blocks fall back to plain ops silently (hooks, autocast dtypes, torch.func, dispatch modes, ...), so a
change that made a common setting fall back would only show as a slower run. These tests count what really
runs in each setting: every product of a gMLP block's forward (``fc1``'s two halves, the token mixing and
``fc2``) must be one oneDNN call (``cpu_linear._mm``), and in fp32 training the backward of each must go
through the fast path's autograd functions (``_Linear``, ``_TokenMix``). Under CPU bf16 autocast the token
mixing stays autocast's ``addmm`` by design (see the module docstring of :mod:`gmlp.kernels.cpu_linear`), so
three products per block forward are expected there.

Settings: ``gmlp train``'s loop (plain, EMA, bf16, gradient checkpointing, evaluation), a model wrapped in
DistributedDataParallel and sharded by FSDP2 (a one-process gloo group), ``gmlp pretrain`` / ``finetune``
(accelerate), transformers' ``Trainer``, inference (``no_grad``, ``inference_mode``) and timm-style usage
(``ModelEmaV3``, gradient checkpointing, ``forward_features`` / ``forward_head``, ``forward_intermediates``,
``features_only``). The product sizes of the default ``gmlp train`` / ``gmlp pretrain`` runs are checked
against the default ``ONEDNN_MIN_FLOPS`` too (the tiny models here run with the threshold at 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from text_corpus import SENTENCES, corpus_and_tokenizer
from torch import nn

import gmlp.kernels.cpu_linear as cpu_linear
from gmlp import create_model
from gmlp.nn.block import GMLPBlock

pytestmark = pytest.mark.skipif(
    not cpu_linear._HAS_ONEDNN_LINEAR
    or not torch.backends.mkldnn.enabled
    or os.environ.get("GMLP_DISABLE_CPU_FUSION") == "1",  # a run of the suite on the plain ops
    reason="the oneDNN path is unavailable or switched off",
)
needs_bf16 = pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_BF16, reason="oneDNN has no bf16 on this CPU")

#: oneDNN products per block forward: fc1's two halves, the token mixing, fc2 (bf16 autocast: no token mixing)
PRODUCTS = 4
PRODUCTS_BF16 = 3


@dataclass
class Counts:
    """What ran: block forwards, oneDNN products and reference calls inside them, fast-path backwards."""

    block_forwards: int = 0
    block_onednn: int = 0
    block_reference: int = 0
    linear_backward: int = 0
    token_mix_backward: int = 0

    def check_forwards(self, per_block: int = PRODUCTS) -> None:
        """Every block forward ran ``per_block`` oneDNN products (and, in fp32, no reference op)."""
        assert self.block_forwards > 0
        assert self.block_onednn == per_block * self.block_forwards, self
        if per_block == PRODUCTS:
            assert self.block_reference == 0, self

    def check_backward(self, token_mixes: int, extra_linear: range = range(1)) -> None:
        """``token_mixes`` fast-path token-mixing backwards, three linear ones for each (plus
        ``extra_linear``: a head that goes through :func:`cpu_linear.apply_linear`)."""
        assert self.token_mix_backward == token_mixes, self
        assert self.linear_backward - 3 * token_mixes in extra_linear, self


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    """Count, with the oneDNN path on for every product size (the models here are tiny)."""
    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_FLOPS", 0.0)
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "0")  # on any CPU (as the suite's conftest does)
    c = Counts()
    depth = 0

    def wrap(fn: Callable[..., Any], field: str | None) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if field is not None and depth:
                setattr(c, field, getattr(c, field) + 1)
            return fn(*args, **kwargs)

        return counted

    block_forward = GMLPBlock._forward

    def forward(self: GMLPBlock, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal depth
        c.block_forwards += 1
        depth += 1
        try:
            return block_forward(self, *args, **kwargs)
        finally:
            depth -= 1

    def backward_counter(fn: Callable[..., Any], field: str) -> staticmethod:
        def backward(ctx: Any, grad: torch.Tensor) -> Any:
            setattr(c, field, getattr(c, field) + 1)
            return fn(ctx, grad)

        return staticmethod(backward)

    monkeypatch.setattr(GMLPBlock, "_forward", forward)
    monkeypatch.setattr(cpu_linear, "_mm", wrap(cpu_linear._mm, "block_onednn"))
    for name in ("fused_linear_reference", "token_mix_reference"):
        monkeypatch.setattr(cpu_linear, name, wrap(getattr(cpu_linear, name), "block_reference"))
    monkeypatch.setattr(cpu_linear._Linear, "backward", backward_counter(cpu_linear._Linear.backward,
                                                                         "linear_backward"))
    monkeypatch.setattr(cpu_linear._TokenMix, "backward", backward_counter(cpu_linear._TokenMix.backward,
                                                                           "token_mix_backward"))
    yield c


# --- gmlp train ---------------------------------------------------------------------------------------------

VISION = dict(model="gmlp_micro4_28", dataset="digits", train_subset=32, test_subset=16, epochs=1,
              batch_size=16, eval_batch_size=16, workers=0, progress=False, plot=False, tensorboard=False,
              warmup_steps=0, augment=False, device="cpu", threads=1)
VISION_DEPTH = 4  # gmlp_micro4_28's blocks


@pytest.mark.parametrize(
    "option",
    [{}, {"ema": True}, {"grad_checkpointing": True}, {"grad_accum_steps": 2},
     pytest.param({"precision": "bf16"}, marks=needs_bf16)],
    ids=["plain", "ema", "grad_checkpointing", "grad_accum", "bf16"],
)
def test_gmlp_train_loop_takes_the_fast_path(tmp_path: Path, counts: Counts, option: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Training steps and the end-of-epoch evaluation (of the EMA weights too) of ``gmlp train``."""
    from gmlp.train import vision

    evaluated: list[Counts] = []
    real_evaluate = vision._evaluate_tensors

    def evaluate(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
        before = counts.block_forwards
        result = real_evaluate(model, *args, **kwargs)
        evaluated.append(Counts(block_forwards=counts.block_forwards - before))
        return result

    monkeypatch.setattr(vision, "_evaluate_tensors", evaluate)
    result = vision.train_vision(vision.VisionTrainConfig(output=str(tmp_path / "run"), **VISION, **option))
    bf16 = option.get("precision") == "bf16"
    counts.check_forwards(PRODUCTS_BF16 if bf16 else PRODUCTS)
    assert len(evaluated) == (2 if option.get("ema") else 1)  # the model's and the EMA's evaluation
    assert all(e.block_forwards == VISION_DEPTH for e in evaluated)  # (16 test images: one batch)
    if not bf16:
        micro_steps = result["step"] * option.get("grad_accum_steps", 1)
        counts.check_backward(VISION_DEPTH * micro_steps)


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group (in memory: no port)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_ddp_and_fsdp_models_take_the_fast_path(counts: Counts, process_group: None, wrapper: str) -> None:
    """``gmlp train --strategy ddp`` wraps the model in DistributedDataParallel, ``fsdp`` shards it with
    FSDP2's ``fully_shard`` (per block: hooks on the blocks, none on their Linear modules)."""
    from torch.nn.parallel import DistributedDataParallel

    from gmlp.train.distributed import DistEnv, shard_model

    model = create_model("gmlp_micro4_28")
    if wrapper == "ddp":
        model = DistributedDataParallel(model)
    else:
        shard_model(model, DistEnv(rank=0, world_size=1))
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert counts.block_forwards == 2 * VISION_DEPTH
    counts.check_forwards()
    counts.check_backward(VISION_DEPTH)


def test_default_gmlp_train_products_are_above_the_onednn_threshold(counts: Counts,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default ``ONEDNN_MIN_FLOPS``, ``gmlp train``'s default model takes oneDNN for every block
    product at its default micro-batch and evaluation batch (the default 28x28 Fashion-MNIST images)."""
    from gmlp.train.vision import VisionTrainConfig

    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_FLOPS", cpu_linear._DEFAULT_ONEDNN_MIN_FLOPS)
    cfg = VisionTrainConfig()
    model = create_model(cfg.model).eval()
    blocks = len(model.blocks)
    model.blocks = model.blocks[:1]  # product sizes do not depend on the depth: one block is enough
    with torch.no_grad():
        for batch in (cfg.batch_size // cfg.grad_accum_steps, cfg.eval_batch_size):
            model(torch.zeros(batch, 1, 28, 28))
    assert blocks > 1 and counts.block_forwards == 2
    counts.check_forwards()


# --- gmlp pretrain / finetune (accelerate) ------------------------------------------------------------------

TEXT = dict(arch="gmlp", layers=2, hidden=32, ffn=64, seq_len=32, batch_size=4, progress=False, device="cpu",
            save_every=0)
TEXT_DEPTH = 2


@pytest.fixture(scope="module")
def corpus_and_tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path_factory.mktemp("text"))


@pytest.mark.parametrize(
    "option",
    [{}, {"grad_checkpointing": True}, pytest.param({"precision": "bf16"}, marks=needs_bf16)],
    ids=["plain", "grad_checkpointing", "bf16"],
)
def test_gmlp_pretrain_takes_the_fast_path(tmp_path: Path, corpus_and_tok: tuple[Path, Path], counts: Counts,
                                           option: dict[str, Any]) -> None:
    """accelerate's ``prepare`` (with bf16: its autocast wrapper of ``forward``) leaves the blocks' Linear
    modules plain; the held-out evaluation at the end runs on the fast path too."""
    from gmlp.train.text import PretrainConfig, pretrain

    corpus, tok = corpus_and_tok
    steps = 2
    pretrain(PretrainConfig(output=str(tmp_path / "run"), corpus=[str(corpus)], tokenizer=str(tok),
                            steps=steps, log_every=steps, eval_every=0, eval_batches=1, valid_fraction=0.2,
                            **TEXT, **option))
    bf16 = option.get("precision") == "bf16"
    counts.check_forwards(PRODUCTS_BF16 if bf16 else PRODUCTS)
    recomputed = steps if option.get("grad_checkpointing") else 0
    assert counts.block_forwards == TEXT_DEPTH * (steps + recomputed + 1)  # the steps, the evaluation
    if not bf16:  # the MLM decoder (into the vocabulary) runs through apply_linear: one more per step
        counts.check_backward(TEXT_DEPTH * steps, extra_linear=range(steps + 1))


def test_gmlp_finetune_takes_the_fast_path(tmp_path: Path, corpus_and_tok: tuple[Path, Path],
                                           counts: Counts) -> None:
    from gmlp.train.text import FinetuneConfig, finetune

    _, tok = corpus_and_tok
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    steps = 2
    finetune(FinetuneConfig(output=str(tmp_path / "ft"), train_file=str(data), validation_file=str(data),
                            steps=steps, tokenizer=str(tok), **TEXT))
    counts.check_forwards()
    assert counts.block_forwards > TEXT_DEPTH * steps  # and the evaluation
    counts.check_backward(TEXT_DEPTH * steps)


# --- transformers Trainer -----------------------------------------------------------------------------------


def _tiny_mlm() -> nn.Module:
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    return GMLPForMaskedLM(GMLPConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=TEXT_DEPTH, max_position_embeddings=32))


@pytest.mark.parametrize(
    "option", [{}, {"gradient_checkpointing": True}, pytest.param({"bf16": True}, marks=needs_bf16)],
    ids=["plain", "gradient_checkpointing", "bf16"],
)
def test_transformers_trainer_takes_the_fast_path(tmp_path: Path, counts: Counts,
                                                  option: dict[str, Any]) -> None:
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(5, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "labels": i} for i in ids]
    steps = 2
    checkpointing = bool(option.get("gradient_checkpointing"))
    if checkpointing and hasattr(TrainingArguments, "activation_checkpointing"):  # transformers >= 5.x name
        option = {"activation_checkpointing": True}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, **option)
    trainer = Trainer(model=_tiny_mlm(), args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    trainer.evaluate()
    bf16 = bool(option.get("bf16"))
    counts.check_forwards(PRODUCTS_BF16 if bf16 else PRODUCTS)
    recomputed = steps if checkpointing else 0
    assert counts.block_forwards == TEXT_DEPTH * (steps + recomputed + 1)
    if not bf16:  # dense MLM: the decoder's backward is one more per step
        counts.check_backward(TEXT_DEPTH * steps, extra_linear=range(steps, steps + 1))


# --- inference and timm-style usage -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_takes_the_fast_path(counts: Counts, mode: str) -> None:
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    vision, mlm = create_model("gmlp_micro4_28").eval(), _tiny_mlm().eval()
    with context():
        vision(torch.randn(2, 1, 28, 28))
        mlm(input_ids=torch.randint(5, 100, (2, 32)))
    assert counts.block_forwards == VISION_DEPTH + TEXT_DEPTH
    counts.check_forwards()


def test_timm_style_usage_takes_the_fast_path(counts: Counts) -> None:
    """timm's ModelEmaV3 (update and evaluation of the copy), set_grad_checkpointing, forward_features /
    forward_head, forward_intermediates and a features_only model."""
    from timm.utils import ModelEmaV3

    model = create_model("gmlp_micro4_28")
    x = torch.randn(2, 1, 28, 28)
    ema = ModelEmaV3(model, decay=0.9)
    model.set_grad_checkpointing(True)
    model.forward_head(model.forward_features(x)).sum().backward()  # forward, recomputed forward, backward
    ema.update(model, step=1)
    model.set_grad_checkpointing(False)
    final, maps = model.forward_intermediates(x, indices=2)
    (final.sum() + sum(m.sum() for m in maps)).backward()
    with torch.no_grad():
        ema.module(x)
        create_model("gmlp_micro4_28", features_only=True).eval()(x)
    assert counts.block_forwards == VISION_DEPTH * 5
    counts.check_forwards()
    counts.check_backward(2 * VISION_DEPTH)


@needs_bf16
def test_bf16_autocast_inference_takes_the_fast_path(counts: Counts) -> None:
    model = create_model("gmlp_micro4_28").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 28, 28))
    assert out.dtype is torch.bfloat16
    counts.check_forwards(PRODUCTS_BF16)

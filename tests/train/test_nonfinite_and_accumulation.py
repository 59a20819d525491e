"""Training loops under non-finite values: a NaN/inf loss, gradient norm, weight or held-out loss stops the
run with one clear error naming the step, before it is logged or saved, and the last good checkpoint stays
the one ``--resume`` continues from (twenty-fourth session: each test failed before its fix: the text
loops trained on to the end on NaN weights, wrote them into every checkpoint and ``final/`` and reported
the run completed; ``gmlp train`` saved the NaN weights of a step whose loss was finite, and recorded a NaN
test loss beside an accuracy as if the model were fine)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, corpus_and_tokenizer

from gmlp.train import text as pipelines
from gmlp.train import vision
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain
from gmlp.train.vision import VisionTrainConfig, train_vision

ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
TINY = dict(layers=2, hidden=32, ffn=64, seq_len=32, batch_size=4, progress=False)
# 2 optimizer steps per epoch
DIGITS = dict(dataset="digits", batch_size=32, warmup_steps=1, progress=False, train_subset=64,
              test_subset=32, threads=1, tensorboard=False, plot=False)


class _NanGrad(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan


def _poison(kind: str, value: torch.Tensor) -> torch.Tensor:
    if kind == "loss":
        return value * math.nan
    if kind == "grad":
        return _NanGrad.apply(value)
    return value * math.inf  # "outputs": +-inf (NaN where 0) logits


def _poisoning(factory: Callable[..., Any], kind: str, at_call: int | None) -> Callable[..., Any]:
    """``factory`` whose model has a forward hook: the ``at_call``-th training forward (one per optimizer
    step without accumulation) returns a poisoned loss (text) or logits (vision) of ``kind``; with ``kind``
    "outputs", every evaluation forward returns infinite logits instead."""

    def make(*args: Any, **kwargs: Any) -> Any:
        model = factory(*args, **kwargs)
        calls = [0]

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
            if kind == "outputs":
                if module.training:
                    return None
            else:
                if not module.training:
                    return None
                calls[0] += 1
                if calls[0] != at_call:
                    return None
            if isinstance(output, torch.Tensor):  # vision: the logits
                return _poison(kind, output)
            name = "logits" if kind == "outputs" else "loss"  # text: a transformers ModelOutput
            setattr(output, name, _poison(kind, getattr(output, name)))
            return output

        model.register_forward_hook(hook)
        return model

    return make


def _finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _latest_step(run: Path) -> int | None:
    path = latest_checkpoint(run)
    return None if path is None else load_checkpoint(path).state["step"]


# --- text: gmlp pretrain / finetune ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_and_tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path_factory.mktemp("text"))


def _pretrain_cfg(corpus: Path, tok: Path, out: Path, **kw: Any) -> PretrainConfig:
    opts: dict[str, Any] = dict(TINY, arch=ARCH, steps=4, log_every=4, save_every=2, eval_every=0,
                                eval_batches=0, valid_fraction=0.2)
    opts.update(kw)
    return PretrainConfig(output=str(out), corpus=[str(corpus)], tokenizer=str(tok), **opts)


@pytest.mark.parametrize(
    ("kind", "at", "clip", "message"),
    [
        ("loss", 3, 1.0, r"gradient norm was not finite at step 3/4 \(loss nan, gradient norm nan\)"),
        ("grad", 4, 1.0, r"gradient norm was not finite at step 4/4 \(loss \d[\d.]*, gradient norm nan\)"),
        ("grad", 4, 0.0, r"weights are not finite after step 4/4 \(a non-finite gradient; --clip-grad is"),
    ],
)
def test_pretrain_stops_at_a_non_finite_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    kind: str, at: int, clip: float, message: str,
) -> None:
    """A NaN loss (step 3), or a NaN gradient under a finite loss in the last step (clipped: its norm is
    NaN; unclipped: only the weights show it), stops the run with the step named; the checkpoint of step 2
    stays the latest, nothing of the bad step is saved, and --resume from it ends as an uninterrupted run."""
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(pipelines, "_prepare_mpnet", _poisoning(pipelines._prepare_mpnet, kind, at))
        with pytest.raises(FloatingPointError, match=message) as err:
            pretrain(_pretrain_cfg(corpus, tok, run, clip_grad=clip, log_every=1))
    assert "the last checkpoint (step 2) is kept as it was" in str(err.value)
    assert _latest_step(run) == 2 and _finite(load_checkpoint(run).model)
    assert not (run / "final").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[:2] == [1, 2] and all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    if kind == "loss":  # (a NaN gradient under a finite loss: that loss is logged before a save finds it)
        assert at not in steps

    pretrain(_pretrain_cfg(corpus, tok, run, clip_grad=clip, log_every=1, resume=True))
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "straight", clip_grad=clip, log_every=1))
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (run, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_stops_at_a_non_finite_validation_loss_before_saving(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite training losses but held-out outputs that overflow: the NaN validation loss was logged with a
    masked accuracy as if fine, and the model saved; now the run stops there."""
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    monkeypatch.setattr(pipelines, "_prepare_mpnet", _poisoning(pipelines._prepare_mpnet, "outputs", None))
    with pytest.raises(FloatingPointError, match=r"validation loss is nan at step 2/4 .*no checkpoint"):
        pretrain(_pretrain_cfg(corpus, tok, run, eval_every=2, eval_batches=4))
    assert _latest_step(run) is None and not (run / "final").exists()


def test_finetune_stops_at_a_nan_loss(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finetuning loop is the same: a NaN loss stops it (it trained on and wrote a NaN final model)."""
    _, tok = corpus_and_tok
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    monkeypatch.setattr(pipelines, "_prepare_mpnet", _poisoning(pipelines._prepare_mpnet, "loss", 2))
    out = tmp_path / "ft"
    with pytest.raises(FloatingPointError, match=r"not finite at step 2/3 \(loss nan.*no checkpoint"):
        finetune(FinetuneConfig(**TINY, arch=ARCH, train_file=str(data), validation_file=str(data),
                                test_file=str(data), steps=3, tokenizer=str(tok), output=str(out)))
    assert _latest_step(out) is None and not (out / "final").exists()


def test_finetune_stops_at_non_finite_validation_outputs(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finetuning scores its dev split by the logits' argmax (no loss): infinite logits were scored as
    classes (an accuracy of 0.5), the run reported itself completed and wrote final/."""
    _, tok = corpus_and_tok
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    monkeypatch.setattr(pipelines, "_prepare_mpnet", _poisoning(pipelines._prepare_mpnet, "outputs", None))
    out = tmp_path / "ft"
    with pytest.raises(FloatingPointError, match=r"outputs on the validation split are not finite at step "
                                                 r"\d+/\d+: the run stops without saving; no checkpoint"):
        finetune(FinetuneConfig(**TINY, arch=ARCH, train_file=str(data), validation_file=str(data),
                                test_file=str(data), steps=3, tokenizer=str(tok), output=str(out),
                                save_every=0))
    assert _latest_step(out) is None and not (out / "final").exists()


def test_pretrain_warns_when_the_warmup_outlasts_the_run(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--warmup 5 over 2 steps: the lr never reaches --lr (step s trains at (s + 1) / 5 of it) nor decays;
    gmlp train warned about this, pretrain / finetune said nothing."""
    corpus, tok = corpus_and_tok
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "run", steps=2, save_every=0, warmup=5))
    err = capsys.readouterr().err
    assert "warning: --warmup 5 is 5 steps, more than the run's 2: the learning rate never reaches" in err
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "run2", steps=2, save_every=0, warmup=2))
    assert "warning: --warmup" not in capsys.readouterr().err  # (2 of 2: the last step trains at --lr)


def test_a_resumed_run_takes_the_learning_rate_given_now(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The message of a non-finite stop says to resume with a lower --lr; the optimizer's and scheduler's
    states brought back the run's own lr over it (the resumed steps replayed the old schedule while a
    warning said the result would differ). Unchanged options still resume bit for bit (the test above)."""
    corpus, tok = corpus_and_tok
    run = tmp_path / "run"
    pretrain(_pretrain_cfg(corpus, tok, run, lr=1e-3, log_every=1, warmup=0, stop_after_steps=2))
    pretrain(_pretrain_cfg(corpus, tok, run, lr=1e-5, log_every=1, warmup=0, resume=True))
    assert "lr" in capsys.readouterr().err  # the warning names the changed option
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    # linear decay over 4 steps, logged after each step: lr x (4 - step) / 4
    assert lrs == pytest.approx({1: 1e-3 * 0.75, 2: 1e-3 * 0.5, 3: 1e-5 * 0.25, 4: 0.0})


# --- vision: gmlp train --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        (1.0, r"not finite at step 3 \(loss \d[\d.]*, gradient norm nan\)"),
        (0.0, r"weights are not finite after step 3 \(a non-finite gradient; grad_clip is off\)"),
    ],
)
def test_train_vision_never_saves_the_weights_of_a_nan_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: float, message: str
) -> None:
    """A NaN gradient under a finite loss in step 3 (of 4, a checkpoint every step): the loss check let it
    through, so checkpoint step 3 held NaN weights and became the one --resume took (the run stopped only
    at step 4's NaN loss). Now the run stops at step 3 (its NaN gradient norm, or, unclipped, its weights)
    with step 2's checkpoint intact, and --resume from it ends as an uninterrupted run."""
    def cfg(out: Path) -> VisionTrainConfig:
        return VisionTrainConfig(model="gmlp_micro4_28", output=str(out), grad_clip=clip, epochs=2,
                                 checkpoint_every=1, **DIGITS)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(vision, "build_model", _poisoning(vision.build_model, "grad", 3))
        with pytest.raises(FloatingPointError, match=message) as err:
            train_vision(cfg(run))
    assert "the last checkpoint (step 2) is kept as it was" in str(err.value)
    assert _latest_step(run) == 2 and _finite(load_checkpoint(run).model)
    assert not (run / "model.safetensors").exists()

    train_vision(cfg(run), resume=True)
    train_vision(cfg(tmp_path / "straight"))
    a, b = (load_file(str(r / "model.safetensors")) for r in (run, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_vision_stops_at_a_non_finite_test_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite weights whose test outputs overflow (as lr 1e6 gives after one epoch): the epoch's record
    said test_loss NaN beside a test accuracy, and its checkpoint was written; now the run stops there."""
    monkeypatch.setattr(vision, "build_model", _poisoning(vision.build_model, "outputs", None))
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"test loss is nan after epoch 1 \(step 2; .*no checkpoint"):
        train_vision(VisionTrainConfig(model="gmlp_micro4_28", output=str(run), epochs=2, **DIGITS))
    assert _latest_step(run) is None
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


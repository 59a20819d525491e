"""Text training loop: resume keeps the logged losses, grad accumulation averages over the masked tokens,
unreadable checkpoints and unusable options give clear errors (eighteenth session: each test failed before
its fix)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, corpus_and_tokenizer

from gmlp.train import text as pipelines
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gmlp.train.recipe import ConfigError
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain
from gmlp.utils.io import CheckpointError

TINY = dict(layers=2, hidden=32, ffn=64, seq_len=32, batch_size=4, progress=False)
ARCH = "gmlp" if pipelines.gmlp_available() else "bert"


@pytest.fixture
def corpus_and_tok(tmp_path: Path) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path)


def _pretrain_cfg(corpus: Path, tok: Path, out: Path, **kw: object) -> PretrainConfig:
    opts = dict(TINY, arch=ARCH, steps=4, log_every=4, save_every=0, eval_every=0, valid_fraction=0.2)
    opts.update(kw)
    return PretrainConfig(output=str(out), corpus=[str(corpus)], tokenizer=str(tok), **opts)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_between_log_steps_logs_the_uninterrupted_losses(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """A run stopped at step 1 (not a multiple of --log-every 4) logs, at step 4, the mean loss of steps
    1-4, as the uninterrupted run does (it logged the mean of steps 2-4 only)."""
    corpus, tok = corpus_and_tok
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    pretrain(_pretrain_cfg(corpus, tok, full, dropout=0.1))
    pretrain(_pretrain_cfg(corpus, tok, stopped, dropout=0.1, stop_after_steps=1))
    pretrain(_pretrain_cfg(corpus, tok, stopped, dropout=0.1, resume=True))

    def train(run: Path) -> list[tuple[int, float, float]]:
        return [(r["step"], r["loss"], r["lr"]) for r in _records(run) if r["split"] == "train"]

    assert train(stopped) == train(full) and len(train(full)) == 1
    a, b = _weights(full), _weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((latest_checkpoint(stopped) / "state.json").read_text())["world_size"] == 1


def test_grad_accum_averages_over_masked_tokens_not_micro_batches(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-size 2 --grad-accum 2 trains as --batch-size 4 on the same sequences and masks: the step's
    loss is the mean over its masked tokens, not the mean of two micro-batch means (which weighs a masked
    token of a micro-batch with few of them more)."""
    corpus, tok = corpus_and_tok
    counts: list[int] = []

    def fixed_masks(input_ids: torch.Tensor, *, mask_token_id: int, special_ids=(), **_: object):
        # masks that depend on the sequence only (not on the micro-batch's generator), ~1/4 of the tokens
        pos = torch.arange(input_ids.shape[1])
        keep = ((input_ids * 7 + pos) % 4 == 0) & ~torch.isin(input_ids, torch.tensor(list(special_ids)))
        counts.extend(int(k.sum()) for k in keep)
        return input_ids.masked_fill(keep, mask_token_id), input_ids.masked_fill(~keep, -100)

    monkeypatch.setattr(pipelines, "mask_tokens", fixed_masks)
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(_pretrain_cfg(corpus, tok, one, steps=2, eval_batches=0, batch_size=4, grad_accum=1))
    pretrain(_pretrain_cfg(corpus, tok, two, steps=2, eval_batches=0, batch_size=2, grad_accum=2))
    assert len(set(counts)) > 1  # micro-batches with different numbers of masked tokens
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [[r["loss"] for r in _records(run) if r["split"] == "train"] for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_grad_accum_is_not_undone_by_a_dataloader_another_loop_left_in_accelerate() -> None:
    """transformers' Trainer (accelerate < 1.4) left its unfinished dataloader, at its end, in accelerate's
    process-wide GradientState: in a later run accumulate() synchronised, and the optimizer stepped, on every
    micro-batch (--grad-accum 2 trained as two steps of batch B, not one of 2B)."""
    from accelerate.state import GradientState

    class EndedLoader:  # a prepared dataloader broken off at its last batch (max_steps)
        end_of_dataloader = True
        remainder = -1

    stale = EndedLoader()
    with pipelines._restoring_accelerate_state():
        GradientState()._add_dataloader(stale)
        accelerator = pipelines._make_accelerator(PretrainConfig(grad_accum=2, device="cpu"))
        syncs = []
        for _ in range(4):
            with accelerator.accumulate(torch.nn.Linear(1, 1)):
                syncs.append(accelerator.sync_gradients)
    assert syncs == [False, True, False, True]


def _fake_run(out: Path, optimizer_state: dict) -> Path:
    return save_checkpoint(out, 1, {"w": torch.zeros(2)}, optimizer_state, {"kind": "pretrain"})


def test_unreadable_or_foreign_checkpoints_give_checkpoint_errors(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    corpus, tok = corpus_and_tok
    ckpt = _fake_run(tmp_path / "garbage", {"optimizer": {}, "scheduler": {}})
    (ckpt / "optimizer.pt").write_bytes(b"not a torch file" * 8)  # was a raw UnpicklingError
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt)
    ckpt = _fake_run(tmp_path / "no-model", {"optimizer": {}, "scheduler": {}})
    (ckpt / "model.safetensors").unlink()  # was a FileNotFoundError, the error of "nothing to resume"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(ckpt)

    # through pretrain --resume: a bad state.json (was a JSONDecodeError / KeyError after reading the data)
    for name, text in (("bad-json", "{not json"), ("no-step", "{}")):
        ckpt = _fake_run(tmp_path / name, {"optimizer": {}, "scheduler": {}})
        (ckpt / "state.json").write_text(text)
        with pytest.raises(CheckpointError, match="state.json"):
            pretrain(_pretrain_cfg(corpus, tok, tmp_path / name, resume=True))
    # a foreign optimizer.pt (was a KeyError 'optimizer', or the model's load_state_dict error)
    _fake_run(tmp_path / "foreign", {"state": {}, "param_groups": []})
    with pytest.raises(CheckpointError, match="no optimizer and scheduler state"):
        pretrain(_pretrain_cfg(corpus, tok, tmp_path / "foreign", resume=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused() -> None:
    """accelerate silently falls back to the CPU: --device cuda was accepted and ignored."""
    with pytest.raises(ConfigError, match="--device cuda"):
        PretrainConfig(device="cuda").validate()
    with pytest.raises(ConfigError, match="--device cuda"):
        FinetuneConfig(device="cuda").validate()


def test_resuming_a_finished_finetune_logs_its_test_metrics_once(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    _, tok = corpus_and_tok
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 2)))
    kw = dict(TINY, arch=ARCH, train_file=str(data), validation_file=str(data), test_file=str(data),
              steps=2, tokenizer=str(tok), output=str(tmp_path / "ft"))
    finetune(FinetuneConfig(**kw))
    finetune(FinetuneConfig(**kw, resume=True))  # nothing left to train: final and test metrics again
    assert [r["split"] for r in _records(tmp_path / "ft")].count("test") == 1


def test_resume_on_another_number_of_processes_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = PretrainConfig(output=str(tmp_path))
    state = {"kind": "pretrain", "options": json.loads(json.dumps(asdict(cfg), default=str)), "world_size": 2}
    ckpt = save_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, {}, state)
    pipelines._warn_changed_options(ckpt, cfg, 2)
    assert "warning" not in capsys.readouterr().err
    pipelines._warn_changed_options(ckpt, cfg, 1)
    assert "processes: 2 -> 1" in capsys.readouterr().err


def test_killed_while_a_resave_of_the_same_step_is_swapped_in_stays_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_checkpoint moves an existing step-N aside (.step-N.old) before renaming the new one in; killed
    between the two renames, latest.json named a missing folder and the run could not be resumed."""
    from gmlp.train import checkpoint

    save_checkpoint(tmp_path, 5, {"w": torch.ones(1)}, {}, {"x": 1})
    real = checkpoint.os.replace

    def killed(src: object, dst: object) -> None:
        if str(src).endswith(".tmp") and Path(str(dst)).name == "step-00000005":
            raise KeyboardInterrupt  # the process dies between the two renames
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, {"w": torch.ones(1) * 2}, {}, {"x": 2})
    monkeypatch.setattr(checkpoint.os, "replace", real)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state["x"] == 1 and ckpt.model["w"].item() == 1.0


def test_a_micro_batch_without_masked_tokens_does_not_make_the_logged_loss_nan(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A micro-batch with no masked token has a NaN mean loss: it made the step's logged loss NaN although
    the step's other micro-batch had targets; now it adds nothing (NaN only when the whole step has none)."""
    corpus, tok = corpus_and_tok
    real, any_target = pipelines.mask_tokens, []

    def recording(*args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = real(*args, **kw)
        any_target.append(bool((labels != -100).any()))
        return inputs, labels

    monkeypatch.setattr(pipelines, "mask_tokens", recording)
    run = tmp_path / "run"
    pretrain(_pretrain_cfg(corpus, tok, run, steps=8, log_every=1, eval_batches=0, batch_size=1, grad_accum=2,
                           mlm_probability=0.02))
    per_step = [any_target[i] or any_target[i + 1] for i in range(0, len(any_target), 2)]
    assert len(per_step) == 8 and not all(any_target) and any(per_step)
    losses = [r["loss"] for r in _records(run) if r["split"] == "train"]
    assert [loss == loss for loss in losses] == per_step  # finite exactly where the step had a target
    assert all(torch.isfinite(v).all() for v in _weights(run).values())


def test_tokenizer_training_options_with_a_given_tokenizer_warn(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--vocab-size / --tokenizer-kind with --tokenizer were accepted and silently ignored."""
    corpus, tok = corpus_and_tok
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "run", steps=1, eval_batches=0, vocab_size=4000))
    err = capsys.readouterr().err
    assert "--vocab-size only applies to a tokenizer the command trains; the tokenizer comes from" in err
    assert "--tokenizer-kind" not in err
    pretrain(_pretrain_cfg(corpus, tok, tmp_path / "plain", steps=1, eval_batches=0))
    assert "only appl" not in capsys.readouterr().err


def test_resume_refuses_another_global_batch_and_continues_the_same_one_otherwise_split(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Step N reads examples N x G to (N + 1) x G of the data order (G = --batch-size x --grad-accum x
    processes): a resume with another G repeated or skipped examples after only the generic changed-options
    warning; now it is refused, naming both. The same G otherwise split continues to the uninterrupted
    run's weights (to rounding: the gradients are summed in another order), with a note instead of the
    warning."""
    corpus, tok = corpus_and_tok
    full, run = tmp_path / "full", tmp_path / "run"
    pretrain(_pretrain_cfg(corpus, tok, full))
    pretrain(_pretrain_cfg(corpus, tok, run, stop_after_steps=2))
    with pytest.raises(ConfigError, match=r"global batch of 2 \(--batch-size 2 x --grad-accum 1 x 1 "
                                          r"process\(es\)\): the run was made with 4"):
        pretrain(_pretrain_cfg(corpus, tok, run, batch_size=2, resume=True))
    capsys.readouterr()
    pretrain(_pretrain_cfg(corpus, tok, run, batch_size=2, grad_accum=2, resume=True))
    err = capsys.readouterr().err
    assert "the same global batch, data and masks" in err and "changed options" not in err
    a, b = _weights(full), _weights(run)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

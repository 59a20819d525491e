"""The launcher's environment against gmlp's own options (twenty-sixth session: each test failed before its
fix).

``accelerate launch`` passes its settings to the program as ``ACCELERATE_*`` variables, and ``torchrun`` its
ranks as ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR``. Before: ``gmlp pretrain`` /
``finetune`` let accelerate read some of them behind the options' back (``ACCELERATE_DYNAMO_BACKEND`` wrapped
the model in ``torch.compile`` and the final model was saved with ``_orig_mod.`` keys, which
``from_pretrained`` does not load; ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` skipped optimizer steps the loop
counted) and silently ignored the rest (``ACCELERATE_MIXED_PRECISION``); launcher variables no process group
can start with made a text run wait for good, or fail deep inside ``torch.distributed``. Now a setting is
honoured as the option it stands for (and recorded as such) where that option was left at its default, loses
to an explicit option with a warning, or is refused in one line naming the variable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import corpus_and_tokenizer

from gmlp.cli import main
from gmlp.train import distributed
from gmlp.train import text as pipelines
from gmlp.train.recipe import ConfigError
from gmlp.train.text import PretrainConfig, pretrain

LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = dict(arch="gmlp" if pipelines.gmlp_available() else "bert", layers=1, hidden=16, ffn=32, seq_len=16,
            batch_size=4, steps=2, log_every=1, save_every=0, eval_every=0, valid_fraction=0.2,
            progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher or accelerate variable of the machine the tests run on."""
    import os

    for name in list(os.environ):
        if name.startswith("ACCELERATE_") or name in LAUNCHER:
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def corpus_and_tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path_factory.mktemp("launch-env"))


def _setenv(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --- accelerate launch's settings: gmlp pretrain / finetune ---------------------------------------------

REFUSED = [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {},
     r"ACCELERATE_MIXED_PRECISION is 'fp16' .* bf16 or fp32 only; .* or give --precision bf16 or fp32"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, {}, r"ACCELERATE_MIXED_PRECISION is 'fp8'"),
    ({"ACCELERATE_MIXED_PRECISION": "bf17"}, {},
     r"ACCELERATE_MIXED_PRECISION must be one of no, fp16, bf16, fp8, got 'bf17'"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, {"grad_accum": 2},
     r"ACCELERATE_GRADIENT_ACCUMULATION_STEPS is '4' but --grad-accum is 2: give --grad-accum 4"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "0"}, {},
     r"ACCELERATE_GRADIENT_ACCUMULATION_STEPS must be an integer >= 1, got '0'"),
    ({"ACCELERATE_DYNAMO_BACKEND": "aot_eager"}, {},
     r"ACCELERATE_DYNAMO_BACKEND is 'aot_eager' .* --compile"),
    ({"ACCELERATE_DYNAMO_BACKEND": "inductor", "ACCELERATE_DYNAMO_MODE": "reduce-overhead"}, {},
     r"ACCELERATE_DYNAMO_MODE is 'reduce-overhead'"),
    ({"ACCELERATE_DYNAMO_BACKEND": "inductor", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "True"}, {},
     r"ACCELERATE_DYNAMO_USE_FULLGRAPH is 'True'"),
    ({"ACCELERATE_USE_CPU": "maybe"}, {}, r"ACCELERATE_USE_CPU must be true or false, got 'maybe'"),
    ({"ACCELERATE_USE_FSDP": "true"}, {}, r"ACCELERATE_USE_FSDP is 'true' \(accelerate launch --use_fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, r"ACCELERATE_USE_DEEPSPEED is 'true'"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, {}, r"ACCELERATE_USE_MEGATRON_LM is 'true'"),
]


@pytest.mark.parametrize(("env", "opts", "message"), REFUSED)
def test_settings_gmlp_cannot_honour_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], opts: dict, message: str
) -> None:
    """Before: fp16 / fp8 and FSDP were silently ignored, DeepSpeed failed with "DeepSpeed is not
    installed", another accumulation count skipped optimizer steps, any dynamo back-end wrapped the model."""
    _setenv(monkeypatch, env)
    with pytest.raises(ConfigError, match=message):
        pipelines._make_accelerator(PretrainConfig(device="cpu", **opts))


def test_use_cpu_against_device_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate reads ACCELERATE_USE_CPU whatever it is told: --device cuda trained on the CPU."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match=r"ACCELERATE_USE_CPU is 'true' .* --device cuda asks for a GPU"):
        pipelines._from_launcher(PretrainConfig(device="cuda"))


def test_a_refused_setting_is_one_line_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``accelerate launch --mixed_precision fp16 -m gmlp pretrain ...``: a usage error, nothing written."""
    def reached(*args: object) -> None:
        raise AssertionError("the run went on to its output folder")

    monkeypatch.setattr(pipelines, "_prepare_output", reached)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    out = tmp_path / "run"
    assert main(["pretrain", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    line = r"gmlp pretrain: error: environment variable ACCELERATE_MIXED_PRECISION is 'fp16' .*\n"
    assert re.fullmatch(line, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "opts", "changed", "mixed_precision"),
    [({}, {}, {}, "no"),
     ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False",
       "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False"}, {}, {}, "no"),
     ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {}, {"precision": "bf16"}, "bf16"),
     ({"ACCELERATE_MIXED_PRECISION": "BF16"}, {"precision": "bf16"}, {}, "bf16"),
     ({"ACCELERATE_DYNAMO_BACKEND": "inductor", "ACCELERATE_DYNAMO_MODE": "default"}, {}, {"compile": True},
      "no"),
     ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, {"compile": True}, {}, "no"),
     ({"ACCELERATE_USE_CPU": "true"}, {"device": "auto"}, {"device": "cpu"}, "no"),
     ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3"}, {"grad_accum": 3}, {}, "no")],
)  # fmt: skip
def test_settings_whose_option_is_left_out_are_taken_as_that_option(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], opts: dict, changed: dict, mixed_precision: str
) -> None:
    """Honoured as the option they stand for; accelerate itself never compiles, and accumulates exactly
    ``--grad-accum`` micro-batches. (accelerate launch's defaults change nothing.)"""
    _setenv(monkeypatch, env)
    cfg = PretrainConfig(**{"device": "cpu", **opts})
    accelerator = pipelines._make_accelerator(cfg)
    assert accelerator.mixed_precision == mixed_precision
    assert accelerator.gradient_accumulation_steps == cfg.grad_accum
    assert accelerator.state.dynamo_plugin.backend.value == "NO"
    assert pipelines._from_launcher(cfg)[0] == changed


@pytest.mark.parametrize(
    ("env_value", "precision", "used", "warned"),
    [("bf16", "fp32", "no", True), ("fp16", "bf16", "bf16", True), ("fp8", "fp32", "no", True),
     ("bf16", "bf16", "bf16", False), ("no", "bf16", "bf16", False)],
)  # fmt: skip
def test_an_explicit_precision_wins_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, env_value: str, precision: str, used: str, warned: bool
) -> None:
    """(``no`` is accelerate launch's default, which cannot be told from an asked-for ``no``: no warning.)"""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env_value)
    cfg = PretrainConfig(device="cpu", precision=precision)
    changed, said = pipelines._from_launcher(cfg)
    assert changed == {}
    expected = [f"warning: ACCELERATE_MIXED_PRECISION={env_value} is ignored: --precision {precision} wins"]
    assert said == (expected if warned else [])
    assert pipelines._make_accelerator(cfg).mixed_precision == used


def test_accelerate_launchs_default_precision_leaves_auto_on_a_gpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``accelerate launch`` sets ACCELERATE_MIXED_PRECISION=no unless told otherwise: on a GPU with bf16,
    --precision auto keeps its bf16 autocast (as under torchrun), in one line saying how to turn it off."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert pipelines._from_launcher(PretrainConfig(device="auto")) == ({}, [
        "[gmlp] from accelerate launch: ACCELERATE_MIXED_PRECISION=no (accelerate launch's default) leaves "
        "--precision auto's bf16 autocast on; --precision fp32 turns it off"])
    assert pipelines._from_launcher(PretrainConfig(device="auto", precision="fp32")) == ({}, [])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # (the CPU: fp32, nothing to say)
    assert pipelines._from_launcher(PretrainConfig(device="auto")) == ({"device": "cpu"}, [
        "[gmlp] from accelerate launch: ACCELERATE_USE_CPU=true: --device cpu"])


def test_accumulation_steps_of_the_environment_do_not_override_the_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate's ``gradient_accumulation_steps=`` loses to ACCELERATE_GRADIENT_ACCUMULATION_STEPS: with
    --grad-accum 1 and the variable at 2, every other optimizer step was skipped and each loss halved, while
    the schedule and the metrics counted every step. The loop's count is now passed as a plugin (which the
    variable cannot override), and a different variable is refused (above)."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    monkeypatch.setattr(pipelines, "_from_launcher", lambda opts: ({}, []), raising=False)  # past the refusal
    accelerator = pipelines._make_accelerator(PretrainConfig(device="cpu", grad_accum=1))
    syncs = []
    for _ in range(3):
        with accelerator.accumulate(torch.nn.Linear(1, 1)):
            syncs.append(accelerator.sync_gradients)
    assert syncs == [True, True, True]


def test_honoured_settings_are_said_and_recorded_and_dynamo_compiles_in_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, corpus_and_tok: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``accelerate launch --mixed_precision bf16 --dynamo_backend inductor``: bf16 autocast and --compile,
    said on stderr and recorded in the checkpoint's options; the model is compiled in place (as --compile
    does), not wrapped by accelerate's ``torch.compile``, whose ``_orig_mod.`` keys went into the final
    model.safetensors (``from_pretrained`` then loaded a freshly initialised model, with a warning)."""
    compiled: list[str] = []

    def wrapped(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was wrapped in torch.compile")

    monkeypatch.setattr(torch, "compile", wrapped)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(repr(k)))
    _setenv(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                          "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_USE_CPU": "False"})
    corpus, tok = corpus_and_tok
    out = tmp_path / "run"
    capsys.readouterr()
    pretrain(PretrainConfig(output=str(out), corpus=[str(corpus)], tokenizer=str(tok), **TINY))
    err = capsys.readouterr().err
    assert "[gmlp] from accelerate launch: ACCELERATE_MIXED_PRECISION=bf16: --precision bf16" in err
    assert "[gmlp] from accelerate launch: ACCELERATE_DYNAMO_BACKEND=inductor: --compile" in err
    assert len(compiled) == 1
    options = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())["options"]
    assert (options["precision"], options["compile"]) == ("bf16", True)
    assert not [k for k in load_file(str(out / "final" / "model.safetensors")) if "_orig_mod" in k]


# --- torchrun's variables -------------------------------------------------------------------------------

ADDR = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
BAD_LAUNCHES = [
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", **ADDR},
     r"environment variable RANK must be below WORLD_SIZE \(2\), got 2"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", **ADDR}, r"WORLD_SIZE is 2, but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, r"WORLD_SIZE is 2, but MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **ADDR},
     r"environment variable LOCAL_RANK must be below LOCAL_WORLD_SIZE \(2\), got 2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", **ADDR},
     r"environment variable LOCAL_WORLD_SIZE must be at most WORLD_SIZE \(2\), got 4"),
]


@pytest.mark.parametrize(
    ("env", "message"),
    [*BAD_LAUNCHES,
     ({"LOCAL_RANK": "0"}, r"LOCAL_RANK is '0', so accelerate starts a process group, but MASTER_ADDR")],
)  # fmt: skip
def test_text_runs_refuse_launcher_variables_before_joining(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """Before, gmlp pretrain / finetune checked only WORLD_SIZE: RANK >= WORLD_SIZE or RANK missing waited
    for the other processes for good, and a missing MASTER_ADDR failed inside torch.distributed."""
    import accelerate

    def join(**kwargs: object) -> None:
        raise AssertionError("accelerate reached: the process would join the group")

    monkeypatch.setattr(accelerate, "Accelerator", join)
    _setenv(monkeypatch, env)
    with pytest.raises(ConfigError, match=message):
        pipelines._make_accelerator(PretrainConfig(device="cpu"))


@pytest.mark.parametrize(("env", "message"), BAD_LAUNCHES[2:])
def test_gmlp_train_refuses_launcher_variables_before_joining(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """(init_distributed already refused a bad RANK; these failed inside torch.distributed, or waited.) A
    ConfigError: the command line says it in one line, not a traceback."""

    def join(*args: object, **kwargs: object) -> None:
        raise AssertionError("init_process_group reached")

    monkeypatch.setattr(distributed.dist, "init_process_group", join)
    _setenv(monkeypatch, env)
    with pytest.raises(ConfigError, match=message):
        distributed.init_distributed("cpu")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is 2, but MASTER_PORT is not set"):
        distributed.init_distributed("cpu")


def test_gmlp_train_names_the_accelerate_settings_it_does_not_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """gmlp train runs its own loop: ``accelerate launch --mixed_precision bf16 -m gmlp train`` trained in
    the --precision of its flags without a word. accelerate launch's defaults say nothing."""
    _setenv(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                          "ACCELERATE_USE_CPU": "False", "ACCELERATE_DYNAMO_MODE": "default"})
    capsys.readouterr()
    distributed.init_distributed("cpu")
    assert capsys.readouterr().err == ""
    _setenv(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "inductor",
                          "ACCELERATE_USE_CPU": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    distributed.init_distributed("cpu", {"precision": "auto"})
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r".*: (\S+) is ignored; (.*) sets it$", r"\1 \2", line) for line in lines] == [
        "ACCELERATE_MIXED_PRECISION=bf16 --precision", "ACCELERATE_DYNAMO_BACKEND=inductor --compile",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 --grad-accum-steps",
    ]
    # flags that ask for the same: nothing to say (a warning that --device cpu was ignored was false)
    distributed.init_distributed("cpu", {"precision": "bf16", "compile": True, "grad_accum_steps": 2})
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    with pytest.raises(ConfigError, match=r"ACCELERATE_USE_FSDP is '1' .*--strategy fsdp"):
        distributed.init_distributed("cpu")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_the_warnings_judge_the_device_picked_and_what_precision_auto_means_there(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], has_bf16: bool
) -> None:
    """``--precision auto`` is bf16 on a CUDA device with bf16, and ``--device auto`` is the CPU on a machine
    without CUDA: ``ACCELERATE_MIXED_PRECISION=bf16`` / ``ACCELERATE_USE_CPU=true`` were said to be ignored
    although the run did just that (the warning read the flags' words, not the run's device)."""
    _setenv(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "true"})
    monkeypatch.setattr(distributed.torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    capsys.readouterr()
    distributed._warn_unread_accelerate_settings(
        distributed.accelerate_settings(), distributed.torch.device("cuda", 0), {"precision": "auto"}
    )
    said = [re.sub(r".*: (\S+) is ignored; .*", r"\1", line) for line in capsys.readouterr().err.splitlines()]
    assert said == ([] if has_bf16 else ["ACCELERATE_MIXED_PRECISION=bf16"]) + ["ACCELERATE_USE_CPU=true"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    distributed.init_distributed("auto", {"precision": "auto"})  # (auto: the CPU here)
    assert capsys.readouterr().err == ""


def test_a_group_the_caller_started_needs_no_master_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python caller who started the process group itself (a tcp:// or file:// init_method) has no
    MASTER_ADDR / MASTER_PORT to give: nothing is joined then, so nothing is refused."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        distributed.launcher_ranks()
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    assert distributed.launcher_ranks() == (2, 1, 0)

"""Every command line that README.md and docs/*.md show is accepted by the code it names.

The command lines come from the fenced ``bash`` / ``sh`` / ``console`` / ``shell`` blocks (backslash
continuations joined, ``$`` prompts and ``#`` comments dropped, ``a && b`` split) and from the inline code
spans of the prose that start with a command (``gmlp train ...``, ``python benchmarks/X.py ...``,
``torchrun ...``). Each is checked as far as it goes before touching data, without training or timing:

- ``gmlp train ...``: with ``--print-config``, which validates every setting the run would use;
- ``gmlp pretrain / finetune / tokenizer``: in-process up to the accelerator (``_make_accelerator``) or the
  corpus reader (``load_text_splits``), stubbed to raise :class:`_Reached`, so every option check of
  :meth:`PretrainConfig.validate` / :meth:`FinetuneConfig.validate` / ``train_tokenizer_command`` has run;
- ``gmlp eval / export / info / compare-vit / plot-*``: in-process up to the point where the weights, the
  model or the data would be read (``checkpoint_shapes``, ``build_model``, ``load_data``, the plot);
- ``torchrun`` / ``accelerate launch``: the launcher's own options with its real parser, then the
  ``-m gmlp ...`` part as above (a trailing ``...`` stands for "the usual options" and is dropped);
- ``python benchmarks/X.py ...`` / ``python scripts/X.py ...``: the script's own argparse parser (its
  ``main`` is called and stopped right after ``parse_args``);
- ``bash scripts/X.sh``: the script exists and ``bash -n`` reads it.

The paths a command needs to find (a run folder that an earlier documented command writes, a checkpoint)
are minimal stand-ins in a temporary working directory (:data:`_STAND_INS`). Placeholders (``N``, ``DIR``,
``HOST``) are replaced by :data:`_PLACEHOLDERS`; ``--device cuda`` lines run with ``torch.cuda.is_available``
answering True (the check that refuses them on a machine without CUDA is tested elsewhere). A command line
that none of these handles fails, unless listed in :data:`_NOT_CHECKED` with the reason; one the docs show as
an error is listed in :data:`_REFUSED`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "console", "shell")

#: Inline code spans of the prose that are command lines (a bare ``scripts/test.sh`` is a file named, and
#: ``gmlp train: error: ...`` a message quoted: neither matches).
_INLINE_COMMAND = re.compile(
    r"^(?:time\s+)?(?:\.venv/bin/)?(?:gmlp\s+[a-z][a-z-]*(?:\s|$)|python3?\s|torchrun(?:\s|$)|"
    r"accelerate\s+launch(?:\s|$)|bash\s+\S+\.sh|(?:benchmarks|scripts)/\S+\.py)"
)

#: Placeholder words of the docs, and what stands in for them.
_PLACEHOLDERS = {"N": "8", "DIR": "runs/main", "HOST": "10.0.0.1"}

#: Absolute folders a documented command writes to, moved into the working directory (compare-vit creates
#: its --output before it reads the data).
_MOVED = {"/tmp/": "tmp/"}

#: Command lines that are not checked, with the reason.
_NOT_CHECKED = {
    "tensorboard --logdir runs/": "TensorBoard's own command (the train extra installs it), not part of gmlp",
}

#: Command lines the docs show as refused, with the error they print (the message, word for word, is also
#: checked by tests/test_doc_examples.py::test_documented_error_messages_are_printed).
_REFUSED = {
    "gmlp train --warmup-lr -1": "gmlp train: error: warmup_lr must be >= 0, got -1.0",
}


#: Environment a script is documented to run with (its usage line), set while it is loaded.
_SCRIPT_ENV = {
    # it exits at import under the Triton interpreter, which tests/conftest.py turns on without CUDA
    "benchmarks/ptx_count.py": {"TRITON_INTERPRET": "0"},
}


@dataclass(frozen=True)
class Command:
    """A documented command line: where it is shown (``doc:line``, all places for a repeated one) and its
    words (comments, prompts and continuations resolved)."""

    where: tuple[str, ...]
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.words)

    def __str__(self) -> str:
        return f"{self.where[0]}: {self.text}"


def _split(text: str) -> Iterator[list[str]]:
    """The commands of one shell line: words without the comment, split at ``&&`` / ``;``."""
    words: list[str] = []
    for word in shlex.split(text, comments=True):
        if word in ("&&", ";", "||"):
            if words:
                yield words
            words = []
        else:
            words.append(word)
    if words:
        yield words


def _fenced(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, command text)`` of the shell blocks of ``path``: continuations joined, prompts dropped."""
    fence, pending, start = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence = line[3:].strip()
            continue
        if line.startswith("```"):
            assert not pending, f"{path.name}:{start}: a continued line runs into the end of its block"
            fence = None
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
            line = re.sub(r"^\s*\$\s+", "", line)  # a console prompt
        stripped = line.rstrip()
        if stripped.endswith("\\") and not re.search(r"\s#", stripped):  # (not a comment ending in \)
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + line, ""
        if text.strip():
            yield start, text


def _inline(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, span)`` of the inline code spans outside code blocks that start with a command; a span may
    wrap onto the next line of its paragraph."""
    text = path.read_text()
    outside = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for block in re.finditer(r"(?:[^\n]+\n?)+", outside):  # paragraphs (and table rows): no span crosses one
        for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", block.group(0)):
            code = " ".join(span.group(1).split())
            if _INLINE_COMMAND.match(code):
                line = outside.count("\n", 0, block.start() + span.start()) + 1
                yield line, code


def _commands() -> list[Command]:
    """Every documented command line, once (with every place it is shown)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for path in DOCS:
        name = str(path.relative_to(ROOT))
        for number, text in [*_fenced(path), *_inline(path)]:
            for words in _split(text):
                found.setdefault(tuple(words), []).append(f"{name}:{number}")
    return [Command(tuple(where), words) for words, where in found.items()]


COMMANDS = _commands()


# ---------------------------------------------------------------------------------------------------------
# stand-ins for the files and folders that the documented commands read


def _vision_run(folder: Path, *, ema: bool = False, **settings: object) -> None:
    """What ``gmlp train --output FOLDER`` leaves: config.json (its settings), weights, metrics."""
    from safetensors.torch import save_file

    from gmlp.train.vision_config import VisionTrainConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = VisionTrainConfig(output=str(folder), ema=ema, **settings)  # type: ignore[arg-type]
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    save_file({}, str(folder / "model.safetensors"))
    if ema:
        save_file({}, str(folder / "model_ema.safetensors"))
    (folder / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 1.0}) + "\n")


def _text_model(folder: Path, *, seq_len: int) -> None:
    """What ``gmlp pretrain`` saves as OUTPUT/final: config.json (the model's length) and its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "gmlp", "max_position_embeddings": seq_len}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")


def _weights(path: Path) -> None:
    """A weights file (its content is not read: the check stops before)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({}, str(path))


#: Path -> (how to make the stand-in, the documented command that writes the real one).
_STAND_INS = {
    "runs/fm": (lambda p: _vision_run(p, epochs=6, batch_size=128, lr=2e-3),
                "gmlp train --epochs 6 --batch-size 128 --lr 2e-3 --output runs/fm"),
    # (trained with --ema: `gmlp eval runs/fashion_mnist --ema` reads its EMA weights, as its comment says)
    "runs/fashion_mnist": (lambda p: _vision_run(p, ema=True), "gmlp train --ema (its default --output)"),
    "runs/compare_fmnist/gmlp": (_vision_run, "gmlp compare-vit -o runs/compare_fmnist"),
    "runs/in1k_s/model.safetensors": (_weights, "gmlp train --config imagenet_gmlp_s --output runs/in1k_s"),
    "gmlp_s16_224.ra3_in1k.safetensors": (_weights, "a timm checkpoint, downloaded by the user"),
    "ckpt.safetensors": (_weights, "any gmlp train run's model.safetensors"),
    "runs/pretrain/final": (lambda p: _text_model(p, seq_len=128), "gmlp pretrain (default --seq-len 128)"),
    "runs/gmlp-base/final": (lambda p: _text_model(p, seq_len=512),
                             "gmlp pretrain --preset gmlp-base --seq-len 512 ... --output runs/gmlp-base"),
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the stand-ins, made the current directory."""
    for path, (make, _) in _STAND_INS.items():
        make(tmp_path / path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
class _Reached(Exception):
    """The command got past its checks, to the data, the model, the accelerator or the plot."""


class _Parsed(Exception):
    """A script's argparse parser accepted its arguments."""


def _reached(*args: object, **kwargs: object) -> None:
    raise _Reached


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop every command where its work would start (after its option checks)."""
    import gmlp.data.text as text_data
    import gmlp.train.compare as compare
    import gmlp.train.vision as vision
    import gmlp.train.vision_tools as vision_tools
    import gmlp.viz as viz
    from gmlp.train import text as pipelines

    monkeypatch.setattr(pipelines, "_make_accelerator", _reached)  # pretrain / finetune, after validate()
    monkeypatch.setattr(pipelines, "load_text_splits", _reached)
    monkeypatch.setattr(text_data, "load_text_splits", _reached)  # tokenizer, after its checks
    monkeypatch.setattr(vision_tools, "checkpoint_shapes", _reached)  # eval / export: reads the weights
    monkeypatch.setattr(vision, "build_model", _reached)  # info MODEL: builds it
    monkeypatch.setattr(compare, "load_data", _reached)  # compare-vit, after its recipe checks
    monkeypatch.setattr(viz, "plot_spatial", _reached)
    monkeypatch.setattr(viz, "plot_metrics", _reached)


def _gmlp(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run ``gmlp ARGV`` in-process (``gmlp train`` with ``--print-config``): ``("ok", "")`` when it got
    past its checks (or printed its settings / the model list), else ``("exit N", stderr)``."""
    from gmlp.cli import main

    if argv[:1] == ["train"] and "--print-config" not in argv:
        argv = [*argv, "--print-config"]
    capsys.readouterr()
    try:
        status = main(argv)
    except _Reached:
        return "ok", ""
    except SystemExit as err:  # argparse's own usage errors
        status = err.code if isinstance(err.code, int) else 1
    return ("ok", "") if status == 0 else (f"exit {status}", capsys.readouterr().err.strip())


def _load_script(path: Path) -> ModuleType:
    """The module of a benchmark or script file (as tests/test_benchmark_smoke.py loads them)."""
    name = "doc_command_" + "_".join(path.relative_to(ROOT).with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_script(path: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    """The script's own parser accepts ``args``; its work is not run."""
    file = ROOT / path
    assert file.is_file(), f"{path}: no such file"
    if file.suffix == ".sh":
        assert not args, f"{path} takes no arguments here, got {args}"
        done = subprocess.run(["bash", "-n", str(file)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return
    for name, value in _SCRIPT_ENV.get(path, {}).items():
        monkeypatch.setenv(name, value)
    module = _load_script(file)
    assert hasattr(module, "main"), f"{path} has no main(argv) to parse the documented arguments with"
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self: argparse.ArgumentParser, *a: object, **kw: object) -> None:
        raise _Parsed(parse(self, *a, **kw))  # type: ignore[arg-type]

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    capsys.readouterr()
    try:
        module.main(args)
    except _Parsed:
        return
    except SystemExit as err:
        pytest.fail(f"{path} {shlex.join(args)}: usage error {err.code}: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{path}: main() returned without parsing its arguments")


def _launched(words: list[str]) -> tuple[str, list[str]]:
    """``(launcher, gmlp argv)`` of a ``torchrun`` / ``accelerate launch`` line, its options parsed by the
    launcher's own parser (a line without a program names the launcher only: its gmlp argv is empty)."""
    if words[0] == "torchrun":
        from torch.distributed.run import parse_args as torchrun_args

        launcher, options = "torchrun", words[1:]
        parse = torchrun_args
    else:
        from accelerate.commands.launch import launch_command_parser

        launcher, options = "accelerate launch", words[2:]
        parse = launch_command_parser().parse_args
    named = "-m" in options or any(not w.startswith("-") and w.endswith(".py") for w in options)
    try:
        args = parse(options if named else [*options, "-m", "gmlp"])
    except SystemExit:
        pytest.fail(f"{launcher} refuses its options {options}")
    assert args.module and args.training_script == "gmlp", f"{launcher} does not run -m gmlp: {options}"
    return launcher, list(args.training_script_args) if named else []


def _takes_a_path(subcommand: str) -> bool:
    """Whether ``gmlp SUBCOMMAND`` needs a positional argument (so that, alone, it names the command)."""
    from gmlp.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert subcommand in commands, f"gmlp has no command {subcommand!r}"
    return any(not a.option_strings and a.required for a in commands[subcommand]._actions)


def _expand(words: tuple[str, ...]) -> list[str]:
    """The words with placeholders filled in and the ``.venv/bin/`` / ``time`` prefixes dropped."""
    out = []
    for word in words:
        key, eq, value = word.rpartition("=")
        if eq and value in _PLACEHOLDERS:
            word = f"{key}={_PLACEHOLDERS[value]}"
        word = _PLACEHOLDERS.get(word, word)
        for old, new in _MOVED.items():
            word = new + word[len(old):] if word.startswith(old) else word
        out.append(word)
    while out and (out[0] == "time" or re.fullmatch(r"[A-Z_]+=\S*", out[0])):
        out = out[1:]
    if out:
        out[0] = out[0].removeprefix(".venv/bin/")
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_line_is_accepted(
    command: Command,
    workdir: Path,
    no_work: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if command.text in _NOT_CHECKED:
        pytest.skip(_NOT_CHECKED[command.text])
    words = _expand(command.words)
    program = words[0]
    if program in ("python", "python3"):
        _check_script(words[1], words[2:], monkeypatch, capsys)
        return
    if program == "bash" or re.fullmatch(r"(benchmarks|scripts)/\S+\.py", program):
        script = words[1] if program == "bash" else program
        _check_script(script, words[2:] if program == "bash" else words[1:], monkeypatch, capsys)
        return
    if program == "torchrun" or words[:2] == ["accelerate", "launch"]:
        launcher, argv = _launched(words)
        if argv[-1:] == ["..."]:  # "the usual options": the command with its defaults
            argv = argv[:-1]
        if not argv:
            return  # the launcher named alone (its options checked)
    else:
        assert program == "gmlp", (
            f"{command.where}: {command.text!r} is not a command this test can check: add a check, or list "
            f"it in _NOT_CHECKED with the reason"
        )
        argv = words[1:]
    assert "..." not in argv, f"{command.where}: a template this test cannot fill in: {command.text!r}"
    if len(argv) == 1 and _takes_a_path(argv[0]):  # `gmlp export` in prose: the command's name
        return
    if "--device" in argv and argv[argv.index("--device") + 1 :][:1] == ["cuda"]:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (a GPU machine's line)
    outcome, err = _gmlp(argv, capsys)
    if command.text in _REFUSED:
        assert (outcome, err) == ("exit 2", _REFUSED[command.text]), f"{command}: {outcome} {err}"
        return
    assert outcome == "ok", f"{', '.join(command.where)}: gmlp {shlex.join(argv)}: {outcome}: {err}"


def test_the_lists_name_documented_lines_and_stand_ins_are_used() -> None:
    """Each entry of _NOT_CHECKED / _REFUSED is still a documented command line, each stand-in is named by
    one, and the extraction found the blocks it should (so the parametrized test cannot silently check
    nothing)."""
    texts = {c.text for c in COMMANDS}
    for listed in (*_NOT_CHECKED, *_REFUSED):
        assert listed in texts, f"{listed!r} is no longer shown in the docs: remove it from the list"
    for path in _STAND_INS:
        assert any(path in c.words or path in " ".join(c.words) for c in COMMANDS), f"unused stand-in {path}"
    programs = {_expand(c.words)[0] for c in COMMANDS}
    assert {"gmlp", "torchrun", "accelerate", "bash"} <= programs, programs
    subcommands = {_expand(c.words)[1] for c in COMMANDS if _expand(c.words)[0] == "gmlp"}
    assert {"train", "pretrain", "finetune", "tokenizer", "eval", "info", "export", "compare-vit",
            "plot-spatial", "plot-metrics"} <= subcommands, subcommands
    assert len(COMMANDS) > 80


def test_no_command_line_hides_in_a_block_of_another_language() -> None:
    """A command line in a fenced block that is not a shell block (``text``, no language) would not be
    checked: such a block must hold none (or be marked ``bash``)."""
    hidden = []
    for path in DOCS:
        fence = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
            elif fence is not None and fence not in (*SHELL_FENCES, "python") and _INLINE_COMMAND.match(
                re.sub(r"^\s*\$\s+", "", line)
            ):
                hidden.append(f"{path.relative_to(ROOT)}:{number} (```{fence}): {line.strip()}")
    assert not hidden, hidden


def test_extraction_joins_continuations_and_drops_comments_and_prompts(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `gmlp info gmlp_s16_224 --throughput` or\n`torchrun --nproc_per_node=N -m gmlp train\n...`, "
        "not `gmlp train: error: x` nor `scripts/test.sh`.\n\n"
        "```bash\n$ gmlp train --epochs 2 \\\n    --lr 1e-3   # a comment \\\n"
        "bash scripts/setup.sh && .venv/bin/gmlp train  # two\n```\n"
        "```python\ngmlp = 1\n```\n"
    )
    assert list(_fenced(doc)) == [
        (6, "gmlp train --epochs 2      --lr 1e-3   # a comment \\"),
        (8, "bash scripts/setup.sh && .venv/bin/gmlp train  # two"),
    ]
    assert list(_inline(doc)) == [
        (1, "gmlp info gmlp_s16_224 --throughput"), (2, "torchrun --nproc_per_node=N -m gmlp train ..."),
    ]
    assert [list(_split(t)) for _, t in _fenced(doc)] == [
        [["gmlp", "train", "--epochs", "2", "--lr", "1e-3"]],
        [["bash", "scripts/setup.sh"], [".venv/bin/gmlp", "train"]],
    ]
    assert _expand(("time", ".venv/bin/gmlp", "train", "--output", "DIR")) == ["gmlp", "train", "--output",
                                                                               "runs/main"]
    assert _expand(("torchrun", "--nproc_per_node=N")) == ["torchrun", "--nproc_per_node=8"]
    assert _expand(("gmlp", "compare-vit", "-o", "/tmp/cmp")) == ["gmlp", "compare-vit", "-o", "tmp/cmp"]

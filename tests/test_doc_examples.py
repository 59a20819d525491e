"""Every Python example of README.md and docs/*.md, executed, and the claims written next to them checked.

Each example is found by its file, the heading it sits under and a piece of its text; one that disappears (or
is no longer unique) fails :func:`_example`, so no test here can silently run nothing. Examples that need a
GPU, a hub download or minutes are listed in ``_NOT_RUN_HERE`` with the reason; a new example must be added
to one of the two lists (``test_every_python_example_is_run_or_accounted_for``). Where an example is too big
for a unit test it is shrunk by a named text substitution (each must match, see :func:`_shrink`): fewer
layers, a smaller model of the same family. Expression statements are evaluated and their values kept, so
the comments beside them ("# (B, 196, 256)") can be checked.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Example:
    """A fenced ``python`` block: its file (relative to the repository), the heading above it, its code and
    the line of its first code line."""

    doc: str
    heading: str
    code: str
    line: int


def _examples() -> list[Example]:
    """Every ```python block of the docs, with the last heading before it (headings inside code blocks,
    such as a shell comment, do not count)."""
    found = []
    for path in DOCS:
        heading, fence, start, body = "", None, 0, []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if fence is None:
                if line.startswith("```"):
                    fence, start, body = line[3:].strip(), number + 1, []
                elif line.startswith("#"):
                    heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                if fence == "python":
                    found.append(Example(str(path.relative_to(ROOT)), heading, "\n".join(body) + "\n", start))
                fence = None
            else:
                body.append(line)
    return found


def _matches(example: Example, doc: str, heading: str, marker: str) -> bool:
    return example.doc == doc and example.heading == heading and marker in example.code


def _example(doc: str, heading: str, marker: str) -> Example:
    """The one example of ``doc`` under ``heading`` whose code holds ``marker``; fails loudly otherwise."""
    hits = [e for e in _examples() if _matches(e, doc, heading, marker)]
    assert len(hits) == 1, f"{doc}: {len(hits)} python examples under {heading!r} hold {marker!r}, not 1"
    return hits[0]


def _shrink(example: Example, old: str, new: str) -> Example:
    """``example`` with every ``old`` replaced by ``new``; ``old`` must occur (a stale shrink fails)."""
    assert old in example.code, f"{example.doc}:{example.line}: the example no longer holds {old!r}"
    return Example(example.doc, example.heading, example.code.replace(old, new), example.line)


def _run(example: Example, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute ``example`` statement by statement in ``namespace``. Returns ``{source: value}`` for each
    expression statement (its value; a dict or list as it was then, since a later statement may change it)
    and each assignment to one name (the value assigned), so the claims in the comments can be checked;
    tracebacks name the doc file and line."""
    values: dict[str, Any] = {}
    tree = ast.parse(example.code)
    for node in tree.body:
        source = ast.get_source_segment(example.code, node) or ""
        ast.increment_lineno(node, example.line - 1)
        where = f"{example.doc} (example at line {example.line})"
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
            values[source] = type(value)(value) if isinstance(value, (dict, list)) else value
            continue
        exec(compile(ast.Module([node], type_ignores=[]), where, "exec"), namespace)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[source] = namespace[node.targets[0].id]
    return values


def _value(values: dict[str, Any], start: str) -> Any:
    """The value of the one statement of an example that starts with ``start``."""
    hits = [v for source, v in values.items() if source.startswith(start)]
    assert len(hits) == 1, f"{len(hits)} statements start with {start!r}: {list(values)}"
    return hits[0]


# ---------------------------------------------------------------------------------------------------------
# (doc, heading, marker) of the examples run here, and of those that are not, with the reason
_RUN_HERE = [
    ("README.md", "Vision models (timm-style)", "gmlp.create_model(\"gmlp_s16_224\", num_classes=10"),
    ("README.md", "Language models (Hugging Face transformers)", "clf.resize_sequence_length(64)"),
    ("README.md", "Weight import and resolution change", "gmlp.convert.from_timm(timm_state_dict)"),
    ("README.md", "CUDA graphs: a whole step in one launch", "CUDAGraphStep(loss_fn, opt, max_grad_norm="),
    ("docs/text_models.md", "gMLP / aMLP language models for Hugging Face transformers",
     "AutoModelForMaskedLM.from_pretrained(\"out/amlp\")"),
    ("docs/text_training.md", "Python API", "pretrain(PretrainConfig("),
]
_NOT_RUN_HERE = {
    ("README.md", "Layers", "block = GMLPBlock("):
        "run by tests/test_docs.py::test_readme_layers_example_runs_and_keeps_its_promise",
    ("docs/text_models.md", "Converting g-mlp-pytorch language models", "from_g_mlp_pytorch(source)"):
        "run by tests/test_docs.py::test_text_models_conversion_example_runs",
}


def test_every_python_example_is_run_or_accounted_for() -> None:
    """Each python example of the docs is run here or listed with the reason it is not, and each entry of
    the two lists still names exactly one example."""
    entries = [*_RUN_HERE, *_NOT_RUN_HERE]
    for doc, heading, marker in entries:
        _example(doc, heading, marker)
    unaccounted = [
        f"{e.doc}:{e.line} ({e.heading})" for e in _examples() if not any(_matches(e, *k) for k in entries)
    ]
    assert not unaccounted, f"python examples neither run nor listed in _NOT_RUN_HERE: {unaccounted}"
    assert len(_examples()) == len(entries)


# ---------------------------------------------------------------------------------------------------------
def test_readme_vision_example_runs_and_its_comments_hold() -> None:
    """README "Vision models": the shapes, lists and settings its comments give (one 224 image)."""
    example = _example(*_RUN_HERE[0])
    images = torch.randn(1, 3, 224, 224)
    namespace: dict[str, Any] = {"images": images}
    with torch.no_grad():
        values = _run(example, namespace)
    assert _value(values, "gmlp.list_models()")[:4] == [
        "gmlp_b16_224", "gmlp_micro4_28", "gmlp_nano4_28", "gmlp_s16_224"
    ]
    assert _value(values, "gmlp.list_models(\"gmlp_*16*\"") == ["gmlp_s16_224", "gmlp_ti16_224"]
    assert namespace["gmlp"].list_models(pretrained=True) == []  # "pretrained=True: [] (no hub)"
    assert _value(values, "feats =").shape == (1, 196, 256)
    assert _value(values, "pooled =").shape == (1, 256)
    cfg = _value(values, "model.pretrained_cfg")
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == ((3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 0.875)
    final, maps = namespace["final"], namespace["maps"]
    assert final.shape == (1, 196, 256) and [m.shape for m in maps] == [(1, 256, 14, 14)] * 2
    assert _value(values, "backbone.feature_info.channels()") == [256, 256, 256]
    with torch.no_grad():
        assert [m.shape for m in namespace["backbone"](images)] == [(1, 256, 14, 14)] * 3
    model = namespace["model"]
    assert model.get_classifier().out_features == 100 and model.grad_checkpointing
    # set_input_size(img_size=256): "resamples every block's W and b to the 16x16 grid"
    assert all(b.sgu.proj.weight.shape == (256, 256) and b.sgu.proj.bias.shape == (256,)
               for b in model.blocks)
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 256, 256)).shape == (1, 100)


def test_readme_language_example_runs_and_its_comments_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README "Language models", shrunk to 2 of amlp-base's 36 blocks: the MLM decoder is tied to the
    embedding, save_pretrained writes config.json + model.safetensors, and the classifier cut to 64 tokens
    keeps the pretrained body's outputs on inputs of at most 64 tokens."""
    example = _shrink(_example(*_RUN_HERE[1]), "max_position_embeddings=128)",
                      "max_position_embeddings=128, num_hidden_layers=2)")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    _run(example, namespace)
    model, clf = namespace["model"].eval(), namespace["clf"].eval()
    assert model.config.tiny_attn_size == 64 and model.config.max_position_embeddings == 128
    assert model.decoder.weight is model.gmlp.embed.weight
    assert sorted(p.name for p in (tmp_path / "out/amlp").iterdir()) == ["config.json", "model.safetensors"]
    assert type(clf).__name__ == "GMLPForSequenceClassification" and clf.config.num_labels == 2
    assert clf.config.max_position_embeddings == 64
    proj = clf.gmlp.blocks[0].sgu.proj
    assert proj.weight.shape == (2 * 64 - 1,) and proj.bias.shape == (64,)
    ids = torch.randint(5, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(clf.gmlp(input_ids=ids).last_hidden_state,
                                   model.gmlp(input_ids=ids).last_hidden_state)


def test_text_models_first_example_runs_and_reloads_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/text_models.md's first example (2 blocks): the Auto class loads the saved model unchanged."""
    example = _shrink(_example(*_RUN_HERE[4]), "max_position_embeddings=128)",
                      "max_position_embeddings=128, num_hidden_layers=2)")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    values = _run(example, namespace)
    saved, loaded = _value(values, "model = GMLPForMaskedLM(").eval(), namespace["model"].eval()
    assert type(loaded) is type(saved)
    ids = torch.randint(5, saved.config.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)


def test_readme_weight_import_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README "Weight import", on gMLP-Ti/16 instead of S/16 (same 14x14 grid, a quarter of the size): the
    timm file gives timm's outputs, our file is resampled to the 16x16 grid as ``resample_spatial_weight``
    does, and ``from_timm`` gives our keys."""
    import timm

    import gmlp

    example = _shrink(_example(*_RUN_HERE[2]), "gmlp_s16_224", "gmlp_ti16_224")
    monkeypatch.chdir(tmp_path)
    source = timm.create_model("gmlp_ti16_224").eval()
    with torch.no_grad():
        for p in source.parameters():  # timm zero-initialises its head: logits would all be 0
            p.normal_(0, 0.05)
    torch.save(source.state_dict(), "gmlp_ti16_224.ra3_in1k.pth")
    ours = gmlp.create_model("gmlp_ti16_224")
    torch.save(ours.state_dict(), "gmlp_ti16_224.pth")
    W224 = ours.blocks[3].sgu.proj.weight.detach()  # noqa: N806 (the example's name)
    namespace: dict[str, Any] = {"gmlp": gmlp, "timm_state_dict": source.state_dict(), "W224": W224}
    values = _run(example, namespace)
    from_timm_file = _value(values, "model = gmlp.create_model(\"gmlp_ti16_224\", pretrained=").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(from_timm_file(x), source(x), rtol=1e-5, atol=1e-5)
    resized = namespace["model"]
    assert resized.blocks[3].sgu.proj.weight.shape == (256, 256)
    torch.testing.assert_close(resized.blocks[3].sgu.proj.weight.detach(), namespace["W256"])
    assert set(namespace["sd"]) == set(ours.state_dict())


def test_readme_cuda_graph_example_builds_its_objects_on_the_cpu() -> None:
    """README "CUDA graphs" needs a GPU to step; on the CPU its objects still build as written (a tiny MLM,
    an empty loader), the optimizer is made capturable, and a CPU batch is refused with a ValueError."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM
    from gmlp.train.cuda_graph import CUDAGraphInference, CUDAGraphStep

    model = GMLPForMaskedLM(GMLPConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, max_position_embeddings=8))
    namespace: dict[str, Any] = {"torch": torch, "model": model, "loader": []}
    _run(_example(*_RUN_HERE[3]), namespace)
    step, predict = namespace["step"], namespace["predict"]
    assert isinstance(step, CUDAGraphStep) and isinstance(predict, CUDAGraphInference)
    assert all(group["capturable"] for group in namespace["opt"].param_groups)
    ids = torch.randint(5, 50, (2, 8))
    with pytest.raises(ValueError, match="CUDA tensors"):
        step(ids, ids)


def test_text_training_python_api_example_configs_are_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/text_training.md "Python API": the imports and both configs as written are valid (``validate``,
    which each command runs first); the training itself reads the offline corpora (seconds of CPU each), so
    ``pretrain`` here only validates and leaves a small model in ``OUTPUT/final`` for ``finetune`` to find."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    monkeypatch.chdir(tmp_path)
    example = _example(*_RUN_HERE[5])
    imports = Example(example.doc, example.heading,
                      "".join(line + "\n" for line in example.code.splitlines() if "import" in line),
                      example.line)
    calls = Example(example.doc, example.heading,
                    "".join(line + "\n" for line in example.code.splitlines() if "import" not in line),
                    example.line)
    namespace: dict[str, Any] = {}
    _run(imports, namespace)
    seen: list[Any] = []

    def pretrain(cfg: Any) -> None:
        cfg.validate()
        seen.append(cfg)
        GMLPForMaskedLM(GMLPConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   max_position_embeddings=8)).save_pretrained(Path(cfg.output) / "final")

    def finetune(cfg: Any) -> None:
        cfg.validate()
        seen.append(cfg)

    _run(calls, {**namespace, "pretrain": pretrain, "finetune": finetune})
    assert [type(c).__name__ for c in seen] == ["PretrainConfig", "FinetuneConfig"]
    assert seen[0].arch == "amlp" and seen[1].model == str(Path(seen[0].output) / "final")


# ---------------------------------------------------------------------------------------------------------
def _prose(doc: str) -> str:
    """The text of ``doc`` outside fenced code blocks, lines joined (a claim may wrap)."""
    text = re.sub(r"^```.*?^```", "", (ROOT / doc).read_text(), flags=re.S | re.M)
    return re.sub(r"\s*\n\s*", " ", text)


@pytest.mark.parametrize(
    ("doc", "claim", "argv"),
    [
        ("README.md", r"`gmlp train --warmup-lr -1` prints `(gmlp train: error: [^`]+)`",
         ["train", "--warmup-lr", "-1"]),
        ("docs/text_training.md", r"stops the command with `(gmlp finetune: error: --clip-grad [^`]+)`",
         ["finetune", "--clip-grad", "-1"]),
    ],
    ids=["train-warmup-lr", "finetune-clip-grad"],
)
def test_documented_error_messages_are_printed(
    doc: str, claim: str, argv: list[str], capsys: pytest.CaptureFixture
) -> None:
    """The usage errors the docs quote are printed word for word, with exit status 2."""
    from gmlp.cli import main

    found = re.search(claim, _prose(doc))
    assert found, f"{doc}: the quoted error message is gone ({claim})"
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == found.group(1)


def test_fashion_mnist_recipe_is_the_defaults_written_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """docs/vision_training.md: ``gmlp train --config fashion_mnist  # = gmlp train (the defaults, written
    out)``: both resolve to the same settings."""
    from gmlp.cli import main

    assert "gmlp train --config fashion_mnist                  # = gmlp train (the defaults" in (
        ROOT / "docs/vision_training.md"
    ).read_text()
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", "fashion_mnist", "--print-config"]) == 0
    from_recipe = capsys.readouterr().out
    assert main(["train", "--print-config"]) == 0
    assert capsys.readouterr().out == from_recipe and "epochs: 6" in from_recipe

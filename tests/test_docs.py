"""The documentation against the code: README.md and docs/*.md.

Guards against the drift that the docs audits kept finding: lines past the 110-column limit, relative links
and anchors that lead nowhere, imports, ``gmlp.*`` names, ``GMLP_*`` switches and repository paths that no
longer exist, and self-contained code examples that no longer run. (Every documented ``gmlp`` command line is
parsed by ``tests/test_cli.py::test_documented_commands_parse``.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINE = 110


def _code_blocks(doc: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", doc.read_text(), re.S | re.M)


def _prose(doc: Path) -> str:
    """The text of ``doc`` outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of ``doc``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", _prose(doc), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_prose_lines_fit_the_line_limit(doc: Path) -> None:
    """Outside code blocks and tables no line is longer than the project's 110 columns."""
    long = [
        f"{doc.name}:{n}: {len(line)} chars"
        for n, line in enumerate(_prose_lines(doc), 1)
        if line is not None and len(line) > MAX_LINE and not line.startswith("|")
    ]
    assert not long, long


def _prose_lines(doc: Path) -> list[str | None]:
    """``doc``'s lines with those inside fenced code blocks (and the fences) as None, numbering kept."""
    lines: list[str | None] = []
    fenced = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            lines.append(None)
        else:
            lines.append(None if fenced else line)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(link)
    assert not broken, f"{doc.name}: {broken}"


def test_imports_of_the_python_examples_resolve() -> None:
    """Every ``import`` line of every Python example runs (a renamed class or module breaks them)."""
    failed = []
    for doc in DOCS:
        for block in _code_blocks(doc, "python"):
            for line in block.splitlines():
                statement = line.split("#")[0].strip()
                if re.match(r"(from\s+\S+\s+)?import\s", statement):
                    try:
                        exec(statement, {})
                    except ImportError as error:
                        failed.append(f"{doc.name}: {statement}: {error}")
    assert not failed, failed


# ``gmlp.<name>`` in backticks that are parameter names of the text models, not Python objects
_PARAMETER_NAMES = {"gmlp.embed", "gmlp.token_type_embed", "gmlp.norm", "gmlp.blocks.N"}


def test_named_gmlp_objects_exist() -> None:
    """Every ``gmlp.a.b`` named in backticks is a module or an attribute chain that exists."""
    missing = []
    for doc in DOCS:
        for name in set(re.findall(r"`(gmlp(?:\.\w+)+)", doc.read_text())) - _PARAMETER_NAMES:
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(f"{doc.name}: {name}")
    assert not missing, missing


def test_named_environment_switches_exist() -> None:
    """Every ``GMLP_*`` variable the docs name is read somewhere in the code, scripts or benchmarks."""
    sources = "".join(
        p.read_text()
        for folder in ("src", "scripts", "benchmarks", "tests")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in {".py", ".sh"} and p.is_file()
    )
    named = {v for doc in DOCS for v in re.findall(r"\bGMLP_[A-Z0-9_]*[A-Z0-9]", doc.read_text())}
    assert named
    assert not {v for v in named if v not in sources}, sorted(v for v in named if v not in sources)


_REPO_PATH = r"(?<![\w/.])((?:benchmarks|scripts|recipes|tests|src|docs|\.ci)/[\w./{},*-]+)"
# files the docs name as outputs of a documented command, not files of the repository
_OUTPUT_FILES = {"docs/results_text.md"}


def test_named_repository_paths_exist() -> None:
    """Every ``benchmarks/...``, ``scripts/...``, ``recipes/...``, ``tests/...``, ``src/...`` or ``docs/...``
    path in backticks exists (``{a,b}`` alternatives and ``*`` globs expanded)."""
    missing = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            for path in re.findall(_REPO_PATH, span):
                path = path.rstrip(".,")
                if path in _OUTPUT_FILES:
                    continue
                stem, _, rest = path.partition("{")
                options = rest.split("}")[0].split(",") if rest else [""]
                tail = rest.split("}", 1)[1] if rest else ""
                if not any(list(ROOT.glob(stem + option + tail)) for option in options):
                    missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def _block_containing(doc: str, text: str) -> str:
    blocks = [b for b in _code_blocks(ROOT / doc, "python") if text in b]
    assert len(blocks) == 1, f"{doc}: the example with {text!r} is gone"
    return blocks[0]


def test_readme_layers_example_runs_and_keeps_its_promise() -> None:
    """The README's layer example runs as written, and its padded tokens influence no real token."""
    import torch

    namespace: dict = {}
    exec(_block_containing("README.md", "block = GMLPBlock("), namespace)
    block, x, mask, y = (namespace[k] for k in ("block", "x", "mask", "y"))
    assert y.shape == x.shape and namespace["W"].shape == (100, 100)
    noisy = x.clone()
    noisy[60:, 3] = torch.randn(40, 256) * 100
    torch.testing.assert_close(block(noisy, mask)[:60, 3], y[:60, 3], rtol=0, atol=0)


def test_text_models_conversion_example_runs() -> None:
    """docs/text_models.md's g-mlp-pytorch conversion runs as written and keeps the source's logits."""
    import torch

    pytest.importorskip("g_mlp_pytorch")
    namespace: dict = {}
    exec(_block_containing("docs/text_models.md", "from_g_mlp_pytorch(source)"), namespace)
    source, model = namespace["source"].eval(), namespace["model"].eval()
    assert set(namespace["state"]) == set(model.state_dict())
    ids = torch.randint(0, 20000, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(ids), rtol=1e-5, atol=1e-5)

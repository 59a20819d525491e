"""Packaging: what the base install (torch, numpy, safetensors, tqdm) can do without the extras, and the
clear one-line error a command gives when it needs an extra that is not installed.

A missing package is simulated in a fresh interpreter by putting None into ``sys.modules`` for it (``import``
then raises ``ModuleNotFoundError``, as when it is not installed). One subprocess runs every check that needs
a fresh interpreter (its cost is one ``import torch``); the rest run in-process.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gmlp import cli
from gmlp.cli import OPTIONAL_PACKAGES, missing_optional_package
from gmlp.cli import vision as cli_vision

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gmlp"
# What `pip install gmlp` brings (pyproject's dependencies), by module name; triton comes with torch (Linux)
# and gmlp.kernels imports it only if it is there.
BASE_MODULES = {"torch", "numpy", "safetensors", "tqdm"}
TORCH_OWN = {"triton"}

# The fresh-interpreter checks: every optional package missing. Prints one JSON object.
_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    for name in OPTIONALS:
        sys.modules[name] = None
    out = {}
    import torch
    before = set(sys.modules)
    import gmlp.nn
    out["nn_new_modules"] = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    block = gmlp.nn.GMLPBlock(dim=8, dim_ffn=16, seq_len=5)
    out["block_shape"] = list(block(torch.randn(5, 2, 8)).shape)

    import gmlp
    out["models"] = gmlp.list_models()
    model = gmlp.create_model("gmlp_micro4_28", num_classes=3).eval()
    gmlp.save_model(model, "m.safetensors")
    with open("metrics.jsonl", "w") as f:
        f.write('{"step": 1, "epoch": 1, "train_loss": 1.0}\\n')
    again = gmlp.create_model("gmlp_micro4_28", num_classes=3, pretrained="m.safetensors").eval()
    x = torch.randn(2, model.in_chans, 28, 28)
    out["round_trip"] = bool(torch.equal(model(x), again(x)))
    out["convert"] = callable(gmlp.convert.from_timm) and callable(gmlp.convert.from_g_mlp_pytorch)

    try:
        import gmlp.models.text  # noqa: F401
        out["text"] = None
    except ImportError as err:
        out["text"] = [type(err).__name__, str(err)]

    from gmlp.cli import main

    def run(*argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code
            except BaseException as exc:
                rc = "raised " + type(exc).__name__ + ": " + str(exc)
        return [rc, stdout.getvalue(), stderr.getvalue()]

    out["cli"] = {
        "info": run("info"),
        "train --help": run("train", "--help"),
        "pretrain --help": run("pretrain", "--help"),
        "train --print-config": run("train", "--print-config"),
        "pretrain": run("pretrain"),
        "info timm:resnet18": run("info", "timm:resnet18"),
        "export": run("export", "m.safetensors", "--model", "gmlp_micro4_28", "-o", "m.onnx"),
        "plot-metrics": run("plot-metrics", "metrics.jsonl"),
    }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The results of :data:`_SCRIPT`, run in a fresh interpreter with every optional package missing."""
    cwd = tmp_path_factory.mktemp("no_extras")
    script = f"OPTIONALS = {sorted(OPTIONAL_PACKAGES)!r}\n{_SCRIPT}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "GMLP_DATA": str(cwd / "data"),
           "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gmlp_nn_imports_torch_alone(without_extras: dict) -> None:
    """``import gmlp.nn`` after ``import torch`` loads gmlp and the standard library only (and triton, which
    comes with torch, where it is installed): not safetensors, not the model registry, no extra."""
    outside = set(without_extras["nn_new_modules"]) - set(sys.stdlib_module_names) - {"gmlp"} - TORCH_OWN
    # sysconfig's platform data module (the standard library's too, under a per-platform name; torch 2.11's
    # triton imports it)
    outside = {name for name in outside if not name.startswith("_sysconfigdata_")}
    assert not outside, f"import gmlp.nn imported {sorted(outside)}"
    assert without_extras["block_shape"] == [5, 2, 8]


def test_base_install_models_and_weights_work_without_extras(without_extras: dict) -> None:
    assert "gmlp_micro4_28" in without_extras["models"] and "gmlp_s16_224" in without_extras["models"]
    assert without_extras["round_trip"] is True  # save_model + create_model(pretrained=...) reproduce it
    assert without_extras["convert"] is True
    rc, stdout, _ = without_extras["cli"]["info"]
    assert rc == 0 and stdout.split() == without_extras["models"]
    for command in ("train --help", "pretrain --help"):
        rc, stdout, _ = without_extras["cli"][command]
        assert rc == 0 and stdout.startswith("usage: gmlp"), command


def test_text_models_without_transformers_name_the_extra(without_extras: dict) -> None:
    kind, message = without_extras["text"]
    assert kind == "ModuleNotFoundError"
    assert "transformers" in message and 'pip install "gmlp[train]"' in message


@pytest.mark.parametrize(
    ("command", "package", "extra"),
    [
        ("train --print-config", "pyyaml", "train"),
        ("pretrain", "transformers", "train"),
        ("info timm:resnet18", "timm", "train"),
        ("export", "onnx", "export"),
        ("plot-metrics", "matplotlib", "train"),
    ],
)
def test_commands_without_their_extra_print_one_line(
    without_extras: dict, command: str, package: str, extra: str
) -> None:
    """A command that needs a missing extra exits with status 2 and one line naming the package and the
    ``pip install`` of the extra: no traceback."""
    rc, _, stderr = without_extras["cli"][command]
    assert rc == 2, (rc, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    name = command.split()[0]
    assert lines[0].startswith(f"gmlp {name}: error: this needs the {package} package")
    assert lines[0].endswith(f'pip install "gmlp[{extra}]"')


# --- in-process: the error mapping and the declared extras ------------------------------------------------


@pytest.mark.parametrize("module", sorted(OPTIONAL_PACKAGES))
def test_missing_optional_package_follows_import_errors(module: str) -> None:
    missing = ModuleNotFoundError(f"No module named {module!r}", name=module)
    assert missing_optional_package(missing) == module
    hinted = ImportError("this needs it")  # raised from the import error (export.py), or from None inside
    hinted.__cause__ = missing  # its except block (train/vision.py: --tensorboard): __context__ only
    assert missing_optional_package(hinted) == module
    suppressed = ImportError("this needs it")
    suppressed.__context__, suppressed.__suppress_context__ = missing, True
    assert missing_optional_package(suppressed) == module
    wrapped = RuntimeError("--arch gmlp needs gmlp.models.text")
    wrapped.__cause__ = hinted
    assert missing_optional_package(wrapped) == module
    # an unrelated error raised while a failed optional import was being handled is not a missing package
    unrelated = KeyError("oops")
    unrelated.__context__ = missing
    assert missing_optional_package(unrelated) is None
    # a sub-module missing from an installed package is a version mismatch, not a missing extra
    assert missing_optional_package(ModuleNotFoundError("x", name=f"{module}.nonexistent")) is None


def test_main_maps_a_missing_extra_and_re_raises_other_import_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def needs(name: str):
        def command(args: object) -> int:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        return command

    monkeypatch.setattr(cli_vision, "_info", needs("sklearn"))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == (
        "gmlp info: error: this needs the scikit-learn package (module 'sklearn'), which is not installed: "
        'pip install "gmlp[train]"\n'
    )
    for name in ("gmlp.nonexistent", "some_unknown_package", "timm.nonexistent"):
        monkeypatch.setattr(cli_vision, "_info", needs(name))
        with pytest.raises(ModuleNotFoundError, match=re.escape(name)):
            cli.main(["info"])


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower() for r in requirements}


def test_optional_packages_are_declared_in_their_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for module, (package, extra) in OPTIONAL_PACKAGES.items():
        assert package in _requirement_names(extras[extra]), f"{package} (module {module}) not in [{extra}]"
    assert _requirement_names(project["dependencies"]) == BASE_MODULES


def test_every_third_party_import_is_a_base_dependency_or_mapped_to_an_extra() -> None:
    """A new optional import in the package gets its extra (and its one-line error) in OPTIONAL_PACKAGES."""
    known = set(sys.stdlib_module_names) | {"gmlp"} | BASE_MODULES | TORCH_OWN | set(OPTIONAL_PACKAGES)
    unknown = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            tops = {name.split(".")[0] for name in names}
            unknown |= {f"{top} ({path.relative_to(SRC)})" for top in tops - known}
    assert not unknown, sorted(unknown)


def test_top_level_names_resolve_lazily_as_the_eager_imports_did() -> None:
    """``gmlp`` imports its public names on first use (so ``import gmlp.nn`` stays torch-only); they, and the
    sub-packages, are the same objects as before, and an unknown name is still an AttributeError."""
    import gmlp
    import gmlp.convert
    import gmlp.models
    import gmlp.models.loading
    import gmlp.nn
    import gmlp.utils.io

    namespace: dict = {}
    exec("from gmlp import *", namespace)
    assert set(gmlp.__all__) <= set(namespace) and set(gmlp.__all__) <= set(dir(gmlp))
    assert namespace["create_model"] is gmlp.create_model is gmlp.models.create_model
    assert gmlp.list_models is gmlp.models.list_models
    assert gmlp.load_pretrained is gmlp.models.loading.load_pretrained
    assert gmlp.save_model is gmlp.models.loading.save_model
    assert gmlp.CheckpointError is gmlp.utils.io.CheckpointError
    assert gmlp.nn.GMLPBlock is not None and gmlp.convert.to_gmlp is not None
    assert gmlp.models.vision.GMLPVision is gmlp.models.GMLPVision
    for name in ("no_such_name", "_private", "__wrapped__"):
        with pytest.raises(AttributeError, match=name):
            getattr(gmlp, name)


def test_lazy_attributes_that_are_not_there_are_attribute_errors() -> None:
    """``getattr(gmlp, NAME, default)`` and ``hasattr`` answer, for names that are not sub-modules too (a
    dotted name made ``find_spec`` import parent packages and raise ModuleNotFoundError)."""
    import gmlp

    assert getattr(gmlp, "nope.x", None) is None
    assert not hasattr(gmlp, "no_such_module")
    with pytest.raises(AttributeError, match="no attribute '_private'"):
        gmlp._private  # noqa: B018

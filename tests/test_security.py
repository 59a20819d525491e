"""Untrusted inputs: checkpoints, recipes and run folders made by someone else run no code, leave nothing
outside the run folder removed, and fail with a clear error (never a traceback of the parser, a hang or an
out-of-memory kill) where they are corrupt or crafted."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gmlp import create_model
from gmlp.convert import to_gmlp
from gmlp.models.loading import load_pretrained, restore_normalisation, save_model
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint, remove_run_files, save_checkpoint
from gmlp.train.recipe import RecipeError, load_recipe
from gmlp.train.vision_config import VisionTrainConfig
from gmlp.utils.io import CheckpointError, atomic_dir, load_state_dict_file

_MODEL = "gmlp_nano4_28"


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a crafted pickle does to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (str(self.marker),))


# -- code execution from data ---------------------------------------------------------------------------


def test_a_torch_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    """Weights and optimizer state load with ``weights_only=True``: a pickle whose ``__reduce__`` runs a
    function is refused (CheckpointError) and the function never runs."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": _RunsCode(marker)}, tmp_path / "evil.pth")
    expected = r"refusing to read .*would call \S*mkdir.*made to run code.*Do not load it with weights_only"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_state_dict_file(tmp_path / "evil.pth")
    assert "corrupt" not in str(info.value)  # (it was "truncated or corrupt", with torch's advice to load it
    # with weights_only=False, which "will likely succeed")
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 1, {"w": torch.zeros(2)}, {}, {})
    torch.save({"state": _RunsCode(marker)}, ckpt / "optimizer.pt")
    with pytest.raises(CheckpointError, match=expected) as info:
        load_checkpoint(run)
    assert "optimizer.pt" in str(info.value) and "corrupt" not in str(info.value)
    assert not marker.exists()


def test_a_recipe_with_python_tags_is_refused_without_running_code(tmp_path: Path) -> None:
    """Recipes are read with ``yaml.safe_load``: a ``!!python/object/apply`` tag is a RecipeError."""
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"lr: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(recipe, VisionTrainConfig)
    assert not marker.exists()


# -- paths: removing and replacing never follows a symbolic link -----------------------------------------


@pytest.mark.parametrize("kind", ["folder", "file", "dangling"])
def test_remove_run_files_removes_a_symlink_itself_not_its_target(tmp_path: Path, kind: str) -> None:
    """``--overwrite`` on a run folder whose ``tensorboard`` (say) is a link to a folder elsewhere: the
    link goes, what it points to stays. ``shutil.rmtree`` refused the link with an OSError (a traceback
    from ``gmlp train --overwrite``)."""
    outside = tmp_path / "outside"
    if kind == "folder":
        outside.mkdir()
        (outside / "keep.txt").write_text("x")
    elif kind == "file":
        outside.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "tensorboard")
    with pytest.warns(UserWarning, match=r"tensorboard is a symbolic link \(to .*outside\): --overwrite"):
        remove_run_files(run, ("tensorboard", "missing"))  # (said: the run's files now go elsewhere)
    assert not os.path.lexists(run / "tensorboard")
    if kind == "folder":
        assert (outside / "keep.txt").read_text() == "x"
    elif kind == "file":
        assert outside.read_text() == "x"


def test_atomic_dir_replaces_a_symlinked_destination_every_time(tmp_path: Path) -> None:
    """A destination folder that is a link (``final`` on another disk) is replaced by the new folder, and
    the folder it pointed to is left as it was. The first save left the link behind as ``.final.old``,
    which ``rmtree`` could not remove: every later save failed with NotADirectoryError."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    dest = tmp_path / "final"
    os.symlink(elsewhere, dest)
    for i in range(3):
        with atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text(str(i))
        assert (dest / "a.txt").read_text() == str(i) and not dest.is_symlink()
        assert sorted(os.listdir(tmp_path)) == ["elsewhere", "final"]
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"]


def test_atomic_dir_replaces_a_leftover_temporary_that_is_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / ".final.tmp")
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "final" / "a.txt").read_text() == "new"
    assert os.listdir(elsewhere) == []


def test_pruning_never_follows_a_symlinked_checkpoint(tmp_path: Path) -> None:
    """``keep_last`` pruning removes old checkpoint folders of the run only: a ``step-*`` link to a folder
    outside (or a stale ``.step-*`` one) is not followed into."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(outside, run / "checkpoints" / "step-00000000")
    os.symlink(outside, run / "checkpoints" / ".step-00000000.x.tmp")
    for step in (1, 2, 3):
        save_checkpoint(run, step, {"w": torch.zeros(2)}, {}, {}, keep_last=1)
    assert (outside / "keep.txt").read_text() == "x"
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000003"


# -- crafted JSON, YAML and metadata: a clear error, quickly -------------------------------------------


def test_deeply_nested_checkpoint_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    """``latest.json`` / ``state.json`` nested thousands of levels deep raised RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 1, {"w": torch.zeros(2)}, {}, {})
    (ckpt / "state.json").write_text(deep)
    with pytest.raises(CheckpointError, match="state.json does not load"):
        load_checkpoint(run)
    (run / "checkpoints" / "latest.json").write_text(deep)
    with pytest.raises(CheckpointError, match="latest.json is corrupt"):
        latest_checkpoint(run)


def test_deeply_nested_recipe_is_a_recipe_error(tmp_path: Path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("model_kwargs: {a: " + "[" * 2000 + "]" * 2000 + "}\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(recipe, VisionTrainConfig)


def _alias_bomb(levels: int) -> str:
    lines = ["model_kwargs:", "  l0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_a_recipe_of_nested_aliases_is_refused_before_it_expands(tmp_path: Path) -> None:
    """A 1 kB recipe of nested YAML aliases holds 10**9 values: loading it was instant, but copying the
    config (``dataclasses.asdict``, written to config.json) then took minutes and all memory (10**7 values
    took 10 s). So is a recipe whose alias holds itself (which recursed without end)."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_alias_bomb(9))
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="more than 100,000 values"):
        load_recipe(recipe, VisionTrainConfig)
    assert time.perf_counter() - start < 2
    recipe.write_text("model_kwargs: {a: &x [1, *x]}\n")
    with pytest.raises(RecipeError, match="contains itself"):
        load_recipe(recipe, VisionTrainConfig)


def test_a_recipe_with_small_aliases_still_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(_alias_bomb(3) + "betas: &b [0.9, 0.99]\n")
    loaded = load_recipe(recipe, VisionTrainConfig)
    assert loaded["betas"] == (0.9, 0.99) and len(loaded["model_kwargs"]["l2"]) == 10


@pytest.fixture(scope="module")
def _weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    save_model(create_model(_MODEL), path)
    state, metadata = load_state_dict_file(path)
    return state, metadata


_METADATA_TEXT = st.one_of(
    st.text(alphabet="0123456789,.-+eEinfa x", max_size=12),
    st.sampled_from(["7,7", "a,b", "7", "1,2,3", "0,49", "49,1", "-7,-7", "7,7,", "nan", "inf,1,1", "0,0,0",
                     "0.5", "0.5,0.5", "1e309", " 7, 7", "٧,٧"]),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(key=st.sampled_from(["grid_size", "mean", "std"]), value=_METADATA_TEXT)
def test_crafted_weights_metadata_loads_or_fails_cleanly_and_atomically(
    tmp_path_factory: pytest.TempPathFactory, _weights: tuple[dict[str, torch.Tensor], dict[str, str]],
    key: str, value: str,
) -> None:
    """Whatever a weights file's ``grid_size`` / ``mean`` / ``std`` metadata holds, ``load_pretrained``
    either loads it (finite normalisation, std > 0) or raises CheckpointError naming the key, and then
    leaves the model as it was. Malformed values raised a bare ValueError ("too many values to unpack",
    "could not convert string to float") -- for mean/std after the weights were already loaded -- and
    ``nan`` / ``inf`` normalisation was accepted."""
    state, metadata = _weights
    path = tmp_path_factory.mktemp("m") / "crafted.safetensors"
    save_file(state, str(path), metadata={**metadata, key: value})
    model = create_model(_MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg_before = dict(model.pretrained_cfg)
    try:
        load_pretrained(model, path)
    except CheckpointError as err:
        assert key in str(err)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert model.pretrained_cfg == cfg_before
        return
    for name in ("mean", "std"):
        values = model.pretrained_cfg[name]
        assert all(torch.isfinite(torch.tensor(v)) for v in values)
        assert name == "mean" or all(v > 0 for v in values)


def test_restore_normalisation_refuses_malformed_metadata_and_changes_nothing() -> None:
    model = create_model(_MODEL)
    cfg_before = dict(model.pretrained_cfg)
    for metadata in ({"mean": "x,y"}, {"std": "0.5,-1"}, {"mean": "0.5,0.5", "std": "0.5"}):
        with pytest.raises(CheckpointError, match="mean|std"):
            restore_normalisation(model, metadata)
        assert model.pretrained_cfg == cfg_before
    restore_normalisation(model, {"mean": "0.25", "std": "0.5"})
    assert model.pretrained_cfg["mean"] == (0.25,) and model.pretrained_cfg["std"] == (0.5,)


@pytest.mark.parametrize("shape", [(4, 3, 4), (4,), (4, 0)])
def test_a_g_mlp_pytorch_patch_embedding_of_a_wrong_shape_is_refused(shape: tuple[int, ...]) -> None:
    """A 3-d ``to_patch_embed.1.weight`` raised "too many values to unpack"; an empty one converted to a
    0x0 patch."""
    state = {"to_patch_embed.1.weight": torch.zeros(shape), "layers.0.fn.fn.sgu.weight": torch.zeros(1, 4, 4)}
    with pytest.raises(CheckpointError, match="to_patch_embed.1.weight"):
        to_gmlp(state)


def test_a_safetensors_header_claiming_huge_tensors_is_refused_without_allocating(tmp_path: Path) -> None:
    """A header that claims terabytes of data (or a terabyte-long header) in a file of a few bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}})
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10**15) + b"{" + bytes(16))
    for name in ("huge", "long"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_state_dict_file(tmp_path / f"{name}.safetensors")


def test_a_legacy_torch_file_claiming_a_huge_storage_is_a_checkpoint_error(tmp_path: Path) -> None:
    """The pre-zip torch format sizes storages by what its pickle claims: 10**12 floats is a clear error."""

    class Claims(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, torch.storage.TypedStorage | torch.UntypedStorage):
                return ("storage", torch.FloatStorage, "0", "cpu", 10**12, None)
            return None

    import io

    out = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(obj, out, protocol=2)
    Claims(out, protocol=2).dump({"w": torch.zeros(4)})
    pickle.dump(["0"], out, protocol=2)
    (tmp_path / "claims.pth").write_bytes(out.getvalue() + struct.pack("<q", 10**12) + bytes(16))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict_file(tmp_path / "claims.pth")


def test_pil_decompression_bomb_limit_is_kept() -> None:
    """The image pipelines (and timm, which they import) leave PIL's ``MAX_IMAGE_PIXELS`` guard on: an
    image bomb fails to decode (skipped as corrupt, or a clear error with --strict-images)."""
    from PIL import Image

    import gmlp.data.folders  # noqa: F401
    import gmlp.train.vision  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2**28


def test_a_tokenizer_folder_naming_custom_code_loads_without_running_it(tmp_path: Path) -> None:
    """A ``tokenizer_config.json`` whose ``auto_map`` names a Python file of the folder: transformers asks
    whether to run it (a terminal) or refuses (none), which load_tokenizer reported as a corrupt folder; the
    tokenizer now loads from its standard files and the folder's code never runs."""
    pytest.importorskip("transformers")
    from gmlp.train.tokenizer import load_tokenizer, train_tokenizer

    folder, ran = tmp_path / "tok", tmp_path / "ran"
    tok = train_tokenizer(["the whale swam", "a gating unit"] * 5, vocab_size=40, model_max_length=16)
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).mkdir()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tok = load_tokenizer(folder)
    assert not ran.exists()
    assert type(tok).__module__.startswith("transformers.") and tok("the whale")["input_ids"]


def test_save_tokenizer_replaces_a_leftover_temporary_that_is_a_symlink(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gmlp.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / ".tok.tmp").symlink_to(target, target_is_directory=True)
    tok = train_tokenizer(["the whale swam", "a gating unit"] * 5, vocab_size=40, model_max_length=16)
    save_tokenizer(tok, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").vocab_size == tok.vocab_size
    assert (target / "keep.txt").read_text() == "x" and not (tmp_path / ".tok.tmp").exists()


def test_a_recorded_grid_is_checked_against_the_spatial_weights(tmp_path: Path) -> None:
    """``gmlp eval``/``export`` read a weights file's sizes from it: a malformed ``grid_size`` was a bare
    ValueError, and one contradicting the weights was trusted (a model of any size was built)."""
    from gmlp.train.vision_tools import checkpoint_shapes

    model = create_model("gmlp_micro4_28", num_classes=3)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    assert checkpoint_shapes(path)["img_size"] == (28, 28)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = (("a,b", "grid_size must be two ints"), ("70,70", "does not fit its spatial weights"))
    for grid, message in bad:
        save_file(state, str(path), metadata={"grid_size": grid})
        with pytest.raises(CheckpointError, match=message):
            checkpoint_shapes(path)


def test_a_model_folder_naming_custom_code_loads_without_running_it(tmp_path: Path) -> None:
    """``finetune --model`` / ``pretrain --init-from`` load a folder whose ``config.json`` has an ``auto_map``
    naming a Python file of the folder: gmlp's classes load it (its ``model_type``), the file never runs (a
    guard: transformers takes a registered class without asking; the commands now also say so explicitly)."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForMaskedLM

    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM
    from gmlp.train.text import _LOCAL_ONLY

    folder, ran = tmp_path / "model", tmp_path / "ran"
    GMLPForMaskedLM(GMLPConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                               max_position_embeddings=8)).save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForMaskedLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).mkdir()\n")
    assert isinstance(AutoConfig.from_pretrained(str(folder), **_LOCAL_ONLY), GMLPConfig)
    assert isinstance(AutoModelForMaskedLM.from_pretrained(str(folder), **_LOCAL_ONLY), GMLPForMaskedLM)
    assert not ran.exists()

"""gmlp.utils.io: atomic writes, bit-exact round trips, tied tensors, clear errors on bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from gmlp import CheckpointError
from gmlp.utils.io import atomic_write, load_state_dict_file, save_state_dict_file


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_keeps_old_file_when_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as tmp:
        tmp.write_bytes(b"half-written new cont")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old contents"
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_on_success(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.bin"  # parent folders are created
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_bytes(b"new")
        assert not path.exists()  # nothing visible before the body finishes
    assert path.read_bytes() == b"new"
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"newer")
    assert path.read_bytes() == b"newer"
    assert leftovers(path.parent) == []


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_state_dict_file({"a": torch.arange(4.0)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises for a non-tensor
        save_state_dict_file({"a": torch.arange(4.0), "b": "not a tensor"}, path)  # type: ignore[dict-item]
    state, _ = load_state_dict_file(path)
    assert torch.equal(state["a"], torch.arange(4.0)) and list(state) == ["a"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    state = {
        "f32": torch.randn(5, 7),
        "f64": torch.randn(3, dtype=torch.float64),
        "f16": torch.randn(4, 4).half(),
        "bf16": torch.randn(4, 4).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (6,)),
        "u8": torch.randint(0, 255, (3,), dtype=torch.uint8),
        "bool": torch.rand(5) > 0.5,
        "scalar": torch.tensor(3.5),
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]),
        "transposed": torch.randn(3, 4).t(),  # non-contiguous
    }
    path = tmp_path / "x.safetensors"
    save_state_dict_file(state, path, metadata={"note": "hello"})
    loaded, metadata = load_state_dict_file(path)
    assert metadata == {"note": "hello"}
    assert set(loaded) == set(state)
    for key, value in state.items():
        got = loaded[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        # bit-exact, NaN and -0.0 included
        assert got.reshape(-1).view(torch.uint8).equal(value.reshape(-1).view(torch.uint8)), key


def test_tied_and_overlapping_tensors_save_fine(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    buf = torch.randn(12)
    state = {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: the same tensor twice
        "flat": emb.view(-1),  # a view of the same storage
        "a": buf[2:8],  # overlapping slices of one storage
        "b": buf[5:11],
    }
    path = tmp_path / "tied.safetensors"
    save_state_dict_file(state, path)
    loaded, _ = load_state_dict_file(path)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_model_with_tied_parameters(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Linear(3, 6, bias=False))
    model[1].weight = model[0].weight
    save_state_dict_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded, _ = load_state_dict_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])


def test_torch_pickles_and_wrappers(tmp_path: Path) -> None:
    state = {"w": torch.randn(3), "b": torch.randn(2)}
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        torch.save({wrapper: state, "epoch": 3}, tmp_path / "c.pth")
        loaded, metadata = load_state_dict_file(tmp_path / "c.pth")
        assert metadata == {} and loaded.keys() == state.keys()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    loaded, _ = load_state_dict_file(tmp_path / "ddp.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------------
# bad files (issue item 11)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_state_dict_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_state_dict_file(tmp_path)  # a folder without model.safetensors


def test_truncated_safetensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_state_dict_file({"a": torch.randn(64, 64), "b": torch.randn(10)}, good)
    data = good.read_bytes()
    for cut in (0, 4, 8, 30, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.safetensors.*truncated or corrupt"):
            load_state_dict_file(bad)


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_state_dict_file(bad)


def test_truncated_pth(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"a": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.pth"):
            load_state_dict_file(bad)


@pytest.mark.parametrize("seed", range(8))
def test_corrupt_pth(tmp_path: Path, seed: int) -> None:
    """Random bytes make the unpickler fail in many ways (UnpicklingError, IndexError, ...): always ours."""
    bad = tmp_path / "random.pth"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="random.pth"):
        load_state_dict_file(bad)


def test_flipped_bytes_in_a_real_pth(tmp_path: Path) -> None:
    path = tmp_path / "flipped.pth"
    torch.save({"a": torch.randn(8, 8)}, path)
    data = bytearray(path.read_bytes())
    for i in range(0, 200):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pth"):
        load_state_dict_file(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_state_dict_file(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "content", [{}, {"a": 1}, [torch.ones(2)], torch.ones(3), {"a": torch.ones(2), "b": "text"}],
    ids=["empty", "int", "list", "bare-tensor", "mixed"],
)
def test_not_a_state_dict(tmp_path: Path, content) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="odd.pth"):
        load_state_dict_file(path)


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_a_sound_pickle_with_python_objects_is_not_called_corrupt(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "timm_train.pth.tar"  # what timm's train.py writes: weights plus its arguments
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="holds Python objects.*weights_only=True refuses") as info:
        load_state_dict_file(path)
    assert "corrupt" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# permissions, formats told by content, wrapper prefixes, clear errors


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_written_files_get_the_umask_mode_and_keep_a_replaced_ones(tmp_path: Path, umask: int) -> None:
    """As with a plain open(): 0666 less the umask (mkstemp's and safetensors' own 0600 must not stick)."""
    import stat

    from gmlp.train.checkpoint import save_checkpoint

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    old = os.umask(umask)
    try:
        save_state_dict_file({"a": torch.ones(2)}, tmp_path / "new.safetensors")
        with atomic_write(tmp_path / "new.json") as tmp:
            tmp.write_text("{}")
        ckpt = save_checkpoint(tmp_path / "run", 3, {"w": torch.ones(2)}, {}, {})
    finally:
        os.umask(old)
    for path in (tmp_path / "new.safetensors", tmp_path / "new.json", ckpt / "model.safetensors",
                 ckpt / "optimizer.pt", ckpt / "state.json", ckpt.parent / "latest.json"):  # fmt: skip
        assert mode(path) == 0o666 & ~umask, (path.name, oct(mode(path)))
    assert mode(ckpt) == 0o777 & ~umask == mode(ckpt.parent)
    path = tmp_path / "shared.safetensors"
    path.write_bytes(b"")
    os.chmod(path, 0o664)
    save_state_dict_file({"a": torch.ones(2)}, path)
    assert mode(path) == 0o664


def test_writing_onto_a_directory_names_it(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=r"'.*out'.* is a directory"):
        save_state_dict_file({"a": torch.ones(2)}, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saving_a_non_tensor_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state_dict\['b'\].*str, not a tensor"):
        save_state_dict_file({"a": torch.ones(2), "b": "text"}, tmp_path / "m.safetensors")  # type: ignore[dict-item]


@pytest.mark.parametrize("seed", range(4))
def test_the_format_is_told_by_content_not_name(tmp_path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {f"k{i}": torch.randn(int(torch.randint(1, 6, (1,), generator=g)), generator=g) for i in range(3)}
    save_state_dict_file(state, tmp_path / "weights.bin", metadata={"m": "1"})  # safetensors, torch's name
    torch.save(state, tmp_path / "weights.safetensors")  # the other way round
    torch.save(state, tmp_path / "legacy", _use_new_zipfile_serialization=False)  # no suffix at all
    for name, metadata in (("weights.bin", {"m": "1"}), ("weights.safetensors", {}), ("legacy", {})):
        loaded, got = load_state_dict_file(tmp_path / name)
        assert got == metadata and loaded.keys() == state.keys(), name
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name


@pytest.mark.parametrize("seed", range(8))
def test_corrupt_pth_is_not_called_a_sound_file_with_objects(tmp_path: Path, seed: int) -> None:
    """Bad bytes fail torch's weights-only unpickler too: they must not read as a trusted-file hint."""
    bad = tmp_path / "random.pth"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_state_dict_file(bad)
    assert "Python objects" not in str(info.value) and "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("prefixes", [("_orig_mod.",), ("module.", "_orig_mod."), ("_orig_mod.", "module.")])
def test_torch_compile_and_ddp_prefixes_are_removed(tmp_path: Path, prefixes: tuple[str, ...]) -> None:
    """As timm's clean_state_dict: the state dict of a compiled (and/or DDP) model loads by its plain keys."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prefix = "".join(prefixes)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "c.pth")
    loaded, _ = load_state_dict_file(tmp_path / "c.pth")
    assert loaded.keys() == model.state_dict().keys()
    if prefixes == ("_orig_mod.",):  # the real thing
        compiled = torch.compile(model)
        assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
        save_state_dict_file(compiled.state_dict(), tmp_path / "c.safetensors")
        loaded, _ = load_state_dict_file(tmp_path / "c.safetensors")
        model.load_state_dict(loaded)


@pytest.mark.parametrize(
    "content",
    [
        {0: torch.ones(2)},
        {"module.a": torch.ones(2), 1: torch.ones(1)},
        {"state_dict": {(1, 2): torch.ones(1)}},
    ],
    ids=["int-keys", "mixed-keys", "wrapped-tuple-key"],
)
def test_a_dict_of_tensors_with_non_string_keys_is_not_a_state_dict(tmp_path: Path, content) -> None:
    """The annotation promises ``dict[str, Tensor]``: other keys got an AttributeError from the prefix
    stripping (``int.startswith``), not the CheckpointError of a file that holds no state dict."""
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="odd.pth.*parameter names"):
        load_state_dict_file(path)

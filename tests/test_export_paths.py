"""Export and serving paths: ``gmlp export`` (what it writes and refuses) and the text models' exported graphs
(dynamic batch, padding, causality) compared with eager PyTorch."""

from __future__ import annotations

import io
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp import create_model
from gmlp.cli import main
from gmlp.models.loading import save_model


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture, message: str) -> None:
    """``gmlp ARGV`` exits with status 2 and one line naming the problem (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmlp export: error: ") and "\n" not in err, err
    assert message in err, err


def _fake_exporter(monkeypatch: pytest.MonkeyPatch, opset: int = 18) -> None:
    """torch.onnx.export replaced by one that writes a tiny valid ONNX file of ``opset`` at once (the real
    exporter takes seconds; these tests are about what happens to the file around it)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    def save(target: str) -> None:
        onnx.save(proto, target)

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: types.SimpleNamespace(save=save))


@pytest.fixture
def vision_weights(tmp_path: Path) -> Path:
    path = tmp_path / "v.safetensors"
    save_model(create_model("gmlp_micro4_28", depth=1), path)
    return path


def test_a_failed_check_leaves_the_previous_file(
    vision_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnxruntime check ran on the file already moved into place: an export that failed it raised, and
    left the wrong model where the previous (good) export was."""
    pytest.importorskip("onnxruntime")
    import gmlp.export as export

    _fake_exporter(monkeypatch)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")

    def differs(*args: object, **kwargs: object) -> float:
        raise RuntimeError("ONNX outputs differ from PyTorch's by 0.5 (> 0.0001)")

    monkeypatch.setattr(export, "verify_onnx", differs)
    with pytest.raises(RuntimeError, match=r"differ from PyTorch's by 0.5 .*'.*m.onnx' was not written"):
        export.export_checkpoint(vision_weights, out, model="gmlp_micro4_28", model_kwargs={"depth": 1})
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "v.safetensors"]  # no temporary left
    monkeypatch.setattr(export, "verify_onnx", lambda *a, **k: 0.0)  # a file that passes replaces it
    export.export_checkpoint(vision_weights, out, model="gmlp_micro4_28", model_kwargs={"depth": 1})
    assert out.read_bytes() != b"the previous export"


def test_export_refusals_are_one_line(
    vision_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An opset the exporter cannot write and an output under a file were tracebacks (a ValueError, a
    FileExistsError after the whole export); a text model's checkpoint was "not a training run: pass
    --model NAME", and the --model it asked for was then refused as a text model."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    _fake_exporter(monkeypatch, opset=18)
    micro = [str(vision_weights), "--model", "gmlp_micro4_28", "--model-kwargs", '{"depth": 1}',
             "--no-verify"]
    out = tmp_path / "m.onnx"
    _usage_error(["export", *micro, "--opset", "17", "-o", str(out)], capsys,
                 "opset 17: the exporter could not convert the model to it (it wrote opset 18)")
    assert not out.exists()
    under_a_file = vision_weights / "m.onnx"
    _usage_error(["export", *micro, "-o", str(under_a_file)], capsys,
                 f"cannot be written: {str(vision_weights)!r} is a file, not a folder")
    config = GMLPConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                        max_position_embeddings=4)
    GMLPForMaskedLM(config).save_pretrained(tmp_path / "text")
    bare = tmp_path / "bare.safetensors"  # no config.json beside it: known by its keys
    shutil.copy(tmp_path / "text" / "model.safetensors", bare)
    capsys.readouterr()  # (save_pretrained's progress bar)
    for text in (tmp_path / "text", bare):
        _usage_error(["export", str(text), "-o", str(out)], capsys,
                     "holds a text model (gmlp.models.text), and gmlp export exports vision models")
    assert main(["export", *micro, "--opset", "18", "-o", str(out)]) == 0  # the fake file: opset 18
    assert out.exists()


def test_verify_onnx_sees_a_difference_beside_an_infinite_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output that is inf in both ONNX and PyTorch made that batch's difference NaN (inf - inf), which
    max() skipped: a graph off by 0.5 elsewhere in the batch "verified" with a difference of 0."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import gmlp.export as export

    _fake_exporter(monkeypatch)
    path = tmp_path / "m.onnx"
    torch.onnx.export().save(str(path))  # (the fake: an Identity graph, images (batch, 10) -> logits)

    class InfFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.full_like(x[:, :1], float("inf")), x[:, 1:]], dim=1)

    real_run = ort.InferenceSession.run

    def off_by_half(self, names, feeds):  # noqa: ANN001, ANN202
        (out,) = real_run(self, names, feeds)
        out[:, 0] = np.inf
        out[:, 1] += 0.5
        return [out]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_half)
    with pytest.raises(RuntimeError, match=r"differ from PyTorch's by 0.5"):
        export.verify_onnx(InfFirst(), path, (10,))


class _Logits(torch.nn.Module):
    """A text model as a function of (input_ids, attention_mask) -> logits, for the exporters."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _causal_lm(max_len: int = 8) -> _Logits:
    from gmlp.models.text import GMLPConfig, GMLPForCausalLM

    torch.manual_seed(0)
    config = GMLPConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                        max_position_embeddings=max_len, causal=True, tiny_attn_size=8)
    model = GMLPForCausalLM(config).eval()
    with torch.no_grad():  # (W near zero and b = 1 at init: nothing would be mixed across tokens)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return _Logits(model).eval()


def _padded(batch: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a 0/1 mask with right, left and inner padding in different rows (row 0 unpadded)."""
    ids = torch.randint(1, 40, (batch, n), generator=gen)
    mask = (torch.rand(batch, n, generator=gen) > 0.35).long()
    mask[:, 0] = 1
    mask[0] = 1
    return ids, mask


@pytest.mark.filterwarnings("ignore:# The axis name")  # (one Dim for both inputs' batch axis, as meant)
def test_causal_amlp_onnx_dynamic_batch_matches_eager_with_padding() -> None:
    """torch.onnx.export (dynamo=True, the default exporter) of an aMLP causal LM with a dynamic batch axis:
    equal to eager at every real token for other batch sizes and any padding, and causal in the graph."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    wrapped = _causal_lm()
    gen = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, _padded(3, 6, gen), dynamo=True, verbose=False,
                      input_names=["input_ids", "attention_mask"],
                      dynamic_shapes=({0: batch}, {0: batch})).save(buffer)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])

    def run(ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

    for size in (1, 2, 5):
        ids, mask = _padded(size, 6, gen)
        with torch.no_grad():
            want = wrapped(ids, mask).numpy()
        real = mask.bool().numpy()
        np.testing.assert_allclose(run(ids, mask)[real], want[real], atol=1e-4)
    ids, mask = _padded(4, 6, gen)
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 7) % 39 + 1  # other tokens from position 4 on
    before = mask[:, :4].bool().numpy()
    np.testing.assert_allclose(run(later, mask)[:, :4][before], run(ids, mask)[:, :4][before], atol=1e-5)


def test_jit_trace_of_a_text_model_keeps_the_padding() -> None:
    """The model read the mask's layout on the host (all real? a pad before a real token?), and a trace
    keeps the branch its example took: one made with an unpadded mask ignored padding (off by 0.5-0.9)."""
    wrapped = _causal_lm()
    gen = torch.Generator().manual_seed(1)
    ids, mask = _padded(3, 6, gen)
    with pytest.warns(Warning):  # (the tracer's own warnings)
        traced = torch.jit.trace(wrapped, (ids, torch.ones_like(mask)), check_trace=False)
    with torch.no_grad():
        want = wrapped(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(traced(ids, mask)[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torchscript_onnx_of_a_toeplitz_amlp_runs_in_onnxruntime_with_padding() -> None:
    """``torch.onnx.export(dynamo=False)`` of a causal aMLP with Toeplitz W: onnxruntime refused the graph
    (a Gemm shape mismatch from unfold's trace, and no bool ``EyeLike`` for tiny attention's diagonal); now
    it loads and equals eager at real tokens, traced with an unpadded mask and run with padded ones."""
    ort = pytest.importorskip("onnxruntime")
    wrapped = _causal_lm()
    gen = torch.Generator().manual_seed(2)
    ids, mask = _padded(3, 6, gen)
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, (ids, torch.ones_like(mask)), buffer, dynamo=False,
                      input_names=["input_ids", "attention_mask"], dynamic_axes={"input_ids": [0],
                                                                                "attention_mask": [0]})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for size in (3, 5):
        ids, mask = _padded(size, 6, gen)
        with torch.no_grad():
            want = wrapped(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        real = mask.bool().numpy()
        np.testing.assert_allclose(got[real], want[real], atol=1e-4)


@pytest.mark.parametrize("max_len", [8, 300])
def test_torch_export_keeps_the_sequence_length_of_a_toeplitz_model_dynamic(max_len: int) -> None:
    """``torch.export`` with a dynamic sequence axis: unfold's window specialised ``n`` to the example's
    length ("specialized it to be a constant"), and from 256 tokens on (the diagonal-sum backward's
    threshold) the range of ``n`` was split ("Constraints violated"); the exported program now runs shorter
    and longer inputs, up to ``max_position_embeddings``."""
    wrapped = _causal_lm(max_len)
    gen = torch.Generator().manual_seed(3)
    ids, mask = _padded(2, 6, gen)
    batch, n = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("n", min=2, max=max_len)
    program = torch.export.export(wrapped, (ids, mask), dynamic_shapes=({0: batch, 1: n}, {0: batch, 1: n}))
    for size, length in ((1, 3), (4, min(max_len, 280)), (2, 2)):
        ids, mask = _padded(size, length, gen)
        with torch.no_grad():
            want = wrapped(ids, mask)
        got = program.module()(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)

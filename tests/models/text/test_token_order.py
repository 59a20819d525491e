"""The text model's reordering of padded rows (real tokens first) without a sort, and what that buys: the
model with an attention mask exports to ONNX (which has no stable sort) and runs there as in PyTorch."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.models.text import GMLPConfig, GMLPModel
from gmlp.models.text.modeling_gmlp import _kept_first


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_kept_first_is_the_stable_sort_and_its_inverse(rows: list[list[bool]]) -> None:
    keep = torch.tensor(rows)
    order, dest = _kept_first(keep)
    assert torch.equal(order, torch.argsort((~keep).to(torch.int32), dim=1, stable=True))
    assert torch.equal(dest, torch.argsort(order, dim=1))
    assert torch.equal(order.gather(1, dest), torch.arange(keep.shape[1]).expand_as(keep))


def test_masked_text_model_exports_to_onnx_and_matches() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    config = GMLPConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                        max_position_embeddings=8)
    model = GMLPModel(config).eval()
    ids = torch.randint(5, 50, (3, 8))
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 0, 0]])

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrapped = Wrapped().eval()
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, (ids, mask), dynamo=True, verbose=False).save(buffer)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()), strict=True)))[0]
    with torch.no_grad():
        want = wrapped(ids, mask)
    real = mask.bool()
    assert torch.allclose(torch.from_numpy(got)[real], want[real], atol=1e-4)

"""The fused AdamW choice of the training commands and benchmarks, and that it trains like the default."""

from __future__ import annotations

import torch

from gmlp import create_model
from gmlp.train.optim import fused_adamw


def test_fused_adamw_choice() -> None:
    assert fused_adamw("cuda") and fused_adamw(torch.device("cuda", 1)) and fused_adamw("cuda", sharded=True)
    assert fused_adamw("cpu") and not fused_adamw("cpu", sharded=True)
    assert not fused_adamw("meta")


def test_fused_cpu_adamw_takes_the_default_steps() -> None:
    """Given the same gradients, five fused AdamW steps on the CPU land on the default (for-each)
    implementation's weights and moments."""
    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1, num_classes=3)
    twin = create_model("gmlp_micro4_28", img_size=8, in_chans=1, num_classes=3)
    twin.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    fused_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    assert fused_opt.param_groups[0]["fused"] is True
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(5):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        ref_opt.step()
        fused_opt.step()
        ref_opt.zero_grad()
        fused_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(ref_opt.state.values(), fused_opt.state.values(), strict=True):
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    assert max((p - b).abs().max().item() for p, b in zip(model.parameters(), start, strict=True)) > 1e-2

"""Where one training step's time goes: torch.profiler over a few steps of gmlp's and timm's gMLP.

    python benchmarks/profile_step.py --device cuda --size b --batch 256      # on the GPU (bf16 autocast)
    python benchmarks/profile_step.py --device cpu --size smoke --batch 2     # dry run (the tests do this)

For each model prints the share of device time in matrix products, the Triton kernel, normalisation,
elementwise work and copies, then the top kernels by total time (long CUDA kernel names shortened to
their head and the functors they name, so that two ``elementwise_kernel`` instances can be told apart),
then the operators that launched the most device time, with their input shapes (on the CPU: the
operators' own time): which ``copy_`` of which tensor a copy kernel comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402
from kernel_sweep import _shape  # noqa: E402
from run import MaskedLMStep, timm_gmlp  # noqa: E402

from gmlp import create_model  # noqa: E402
from gmlp.train.optim import fused_adamw  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402

SIZES = {"s": (256, 30, 224, 16), "b": (512, 30, 224, 16), "smoke": (32, 2, 32, 8)}
CATEGORIES = (  # first match wins; matched against the lower-cased kernel / operator name
    ("triton (ours)", ("_fwd_kernel", "_bwd_kernel")),
    ("norm", ("layer_norm", "layernorm", "gammabeta")),
    (
        "matrix products",
        (
            "gemm",
            "cutlass",
            "nvjet",
            "xmma",
            "cublas",
            "aten::mm",
            "addmm",
            "bmm",
            "matmul",
            "linear",
            "conv",
        ),
    ),
    ("copies", ("copy", "cat", "contiguous", "transpose", "clone")),
    ("optimizer", ("adam", "multi_tensor", "optimizer")),
    ("elementwise", ("elementwise", "gelu", "mul", "add", "vectorized", "reduce", "fill", "where")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


_TAGS = re.compile(r"\w*(?:[Ff]unctor|KernelImpl|Kernel\w*Template|ReduceOp|func_wrapper|_kernel)\w*")


def short_name(name: str, width: int = 90) -> str:
    """``name`` if it fits in ``width`` characters, else its head and the functor / kernel names found in
    it (CUDA kernel names are templates whose telling part comes last)."""
    if len(name) <= width:
        return name
    tags = list(dict.fromkeys(t for t in _TAGS.findall(name) if t not in ("elementwise_kernel",)))
    short = f"{name[:40]}.. [{', '.join(tags)}]" if tags else name
    return short if len(short) <= 2 * width else short[: 2 * width - 2] + ".."


def op_rows(prof: profile, device: torch.device) -> list[tuple[str, str, int, float]]:
    """(operator, input shapes, calls, microseconds) per operator and input shapes (the profile must record
    shapes): on CUDA the device time of the kernels each operator launched itself, on the CPU its self
    time."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0:
            rows.append((e.key, str(e.input_shapes), e.count, t))
    return rows


def print_op_rows(prof: profile, device: torch.device, steps: int, top: int) -> None:
    """The ``top`` rows of :func:`op_rows` as a table, per step."""
    what = "device" if device.type == "cuda" else "cpu"
    print(f"| operator | input shapes | calls/step | {what} ms/step |\n|---|---|---|---|")
    for key, shapes, count, t in sorted(op_rows(prof, device), key=lambda r: -r[3])[:top]:
        print(f"| {key} | {short_name(shapes, 120)} | {count / steps:.0f} | {t / steps / 1e3:.2f} |")


def time_rows(prof: profile, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) per kernel: device kernels only on CUDA (operators would count their kernels
    twice), operators' self time on the CPU."""
    events = prof.key_averages()
    if device.type == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        return [(e.key, e.self_device_time_total) for e in events
                if e.device_type == cuda and e.self_device_time_total > 0]  # fmt: skip
    return [(e.key, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]


def profile_model(
    name: str,
    model: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    steps: int,
    top: int,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    params: torch.nn.Module | None = None,
) -> None:
    """Profile ``steps`` training steps (bf16 autocast and fused AdamW on CUDA) after three warm-ups.
    ``model`` may be any callable when ``params`` holds the parameters to train."""
    device = x.device
    opt = torch.optim.AdamW((params or model).parameters(), lr=1e-4, fused=fused_adamw(device))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    if loss_fn is None:
        loss_fn = lambda out: F.cross_entropy(out.float(), target)  # noqa: E731

    def step() -> None:
        with autocast:
            loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = time_rows(prof, device)
    total = sum(t for _, t in rows) or 1.0
    shares: dict[str, float] = {}
    for key, t in rows:
        shares[category(key)] = shares.get(category(key), 0.0) + t
    print(f"\n## {name}: {total / steps / 1e3:.1f} ms of {device.type} time per step")
    print(" | ".join(f"{k} {v / total:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    print("| kernel | ms/step | share | category |\n|---|---|---|---|")
    for key, t in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"| {short_name(key)} | {t / steps / 1e3:.2f} | {t / total:.1%} | {category(key)} |")
    print(f"\nOperators by {device.type} time, with input shapes:")
    print_op_rows(prof, device, steps, top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="b")
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--triton-config", default=None, help="JSON launch parameters of the fused kernels")
    parser.add_argument(
        "--text",
        default=None,
        type=lambda text: _shape(text, 5, "LAYERS,DIM,FFN,SEQ,BATCH (positive ints)", sep=","),
        metavar="LAYERS,DIM,FFN,SEQ,BATCH",
        help="also profile gmlp's masked LM of this shape (the GPU suite's: 48,512,3072,512,32)",
    )
    args = parser.parse_args(argv)
    if args.triton_config:
        from gmlp.kernels import sgu_triton

        sgu_triton.set_launch_config(**json.loads(args.triton_config))
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_malloc()  # as run.py and the training commands do
    dim, depth, img, patch = SIZES[args.size]
    timm_name = f"gmlp_{'s' if args.size == 'smoke' else args.size}16_224"
    over = {"embed_dim": dim, "depth": depth, "img_size": img, "patch_size": patch}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, img, img, device=device)
    for name, build in (
        (f"gmlp {timm_name}", lambda: create_model(timm_name, **over)),
        (f"timm {timm_name}", lambda: timm_gmlp(dim, depth, img, patch)),
    ):
        model = build().to(device).train()
        profile_model(name, model, x, args.steps, args.top)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.text:
        from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

        layers, width, ffn, seq, batch = args.text
        cfg = GMLPConfig(
            vocab_size=30522,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            max_position_embeddings=seq,
            toeplitz=True,
            sparse_prediction=True,  # as `gmlp pretrain` trains it
        )
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        labels = torch.where(torch.rand(batch, seq, device=device) < 0.15, ids, -100)
        model = MaskedLMStep(GMLPForMaskedLM(cfg), internal=True).to(device).train()
        name = "gmlp GMLPForMaskedLM (sparse prediction)"
        profile_model(name, lambda x: model(x, labels), ids, args.steps, args.top, lambda loss: loss, model)


if __name__ == "__main__":
    main()

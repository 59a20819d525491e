"""One gMLP block, forward and forward+backward, on each kernel path, at the suite's shapes; and where the
block's device time goes on each path (torch.profiler, top kernels).

    python benchmarks/block_paths.py --device cuda                      # bf16 autocast, the H200 shapes
    python benchmarks/block_paths.py --device cpu --shapes 196x16x256x1536x0 --peers   # gMLP-S/16 on the CPU

Paths on CUDA: "fused gating" (``GMLP_FUSED_GATING_MIN_ELEMENTS=0``: at any size), "split kernel"
(``GMLP_DISABLE_FUSED_GATING=1``), "plain ops" (``GMLP_DISABLE_TRITON=1``); ``--configs`` adds the fused path
under other launch configurations. On the CPU (fp32): "oneDNN" (the default) and "plain ops"
(``GMLP_DISABLE_CPU_FUSION=1``). ``--peers`` adds timm's gMLP block of the same shape (batch-major input, as
timm runs it). The profiles list device kernels (on the CPU: operators) and, on CUDA, the host operators: the
MLM block is bound by the host (see benchmarks/RESULTS.md). Each profile also gives the time in matrix
products and their rate (the block's product FLOPs, forward and backward, over that time). A shape is
``tokens x batch x dim x d_ffn x toeplitz`` (toeplitz 0/1): the defaults are a gMLP-B/16 block at batch 256
and a gMLP-base MLM block at 32 x 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402
from kernel_sweep import _shapes, _time_ms  # noqa: E402
from profile_step import category, short_name, time_rows  # noqa: E402
from run import environment  # noqa: E402

from gmlp.kernels import sgu_triton  # noqa: E402
from gmlp.nn import GMLPBlock  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402

_FUSED = {"GMLP_FUSED_GATING_MIN_ELEMENTS": "0"}
PATHS = {
    "fused gating": _FUSED,
    "fused gating, fc1 bias folded": {**_FUSED, "GMLP_FOLD_FC1_BIAS": "1"},
    "fused gating, residual grad fused": {**_FUSED, "GMLP_FUSE_RESIDUAL_GRAD": "1"},
    "fused gating, token bias in GEMM": {**_FUSED, "GMLP_TOKEN_BIAS_IN_GEMM": "1"},
    "split kernel": {"GMLP_DISABLE_FUSED_GATING": "1"},
    "plain ops": {"GMLP_DISABLE_TRITON": "1"},
}
CPU_PATHS = {"oneDNN": {"GMLP_DISABLE_CPU_FUSION": "0"}, "plain ops": {"GMLP_DISABLE_CPU_FUSION": "1"}}
PEER = "timm block"


def product_flops(n: int, batch: int, dim: int, ffn: int) -> int:
    """FLOPs of one block's matrix products, forward and backward (three products' worth each): ``fc1``
    (dim -> ffn), ``fc2`` (ffn / 2 -> dim) and the token mixing (n x n over batch x ffn / 2 columns)."""
    rows = n * batch
    forward = 2 * rows * dim * ffn + 2 * rows * (ffn // 2) * dim + 2 * n * n * batch * (ffn // 2)
    return 3 * forward


def _timm_block(n: int, dim: int, ffn: int) -> torch.nn.Module:
    """timm's gMLP block (``SpatialGatingBlock``, as in its ``gmlp_*`` models) of the same shape."""
    from timm.models.mlp_mixer import SpatialGatingBlock

    return SpatialGatingBlock(dim, n, mlp_ratio=ffn / dim)


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool) -> Callable[[], None]:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda)

    def run() -> None:
        with autocast:
            out = block(x)
        if backward:
            out.backward(grad)

    return run


def _profile(fn: Callable[[], None], device: torch.device, top: int, flops: int) -> list[str]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = time_rows(prof, device)
    total = sum(t for _, t in rows) or 1.0
    products = sum(t for key, t in rows if category(key) == "matrix products")
    rate = f", {flops / (products / 3) / 1e3:.0f} GFLOP/s" if products else ""  # products: us per 3 steps
    what = "device" if device.type == "cuda" else "cpu"
    lines = [f"{what} busy {total / 3e3:.3f} ms per step; matrix products {products / 3e3:.3f} ms "
             f"({products / total:.0%}{rate})", "| kernel | ms/step | share | category |",
             "|---|---|---|---|"]  # fmt: skip
    for key, t in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"| {short_name(key)} | {t / 3e3:.3f} | {t / total:.1%} | {category(key)} |")
    if device.type == "cuda":  # the host side: what keeps the CPU busy between launches
        host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        busy = sum(e.self_cpu_time_total for e in host)
        lines += [f"\nhost busy {busy / 3e3:.3f} ms per step; top host operators by self time",
                  "| operator | calls/step | host ms/step |", "|---|---|---|"]  # fmt: skip
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]:
            lines.append(f"| {short_name(e.key)} | {e.count / 3:.0f} | {e.self_cpu_time_total / 3e3:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--shapes",
        type=_shapes(5, "tokens x batch x dim x d_ffn x toeplitz (0 or 1)", flag_last=True),
        default="196x256x512x3072x0,512x32x512x3072x1,512x32x512x3072x0",
    )
    parser.add_argument("--configs", default="", help="';'-separated JSON launch configurations to add")
    parser.add_argument("--triton-config", default=None, help="JSON launch parameters for every path")
    parser.add_argument("--reps", type=positive_int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per profile (0 = no profile)")
    parser.add_argument("--peers", action="store_true", help="add timm's gMLP block of the same shape")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_malloc()  # as run.py and the training commands do
    configs = [json.loads(c) for c in args.configs.split(";") if c.strip()]
    if args.triton_config:
        sgu_triton.set_launch_config(**json.loads(args.triton_config))
    default = asdict(sgu_triton.launch_config)
    for n, batch, dim, ffn, toeplitz in args.shapes:
        torch.manual_seed(0)
        block = GMLPBlock(dim, ffn, n, toeplitz=bool(toeplitz)).to(device)
        x = torch.randn(n, batch, dim, device=device, requires_grad=True)
        grad = torch.randn(n, batch, dim, device=device)
        print(f"\n## block {n} tokens x batch {batch}, dim {dim}, d_ffn {ffn}, toeplitz={bool(toeplitz)} "
              f"(fc1 output {n * batch * ffn:.2e} elements)")  # fmt: skip
        print("| path | fwd ms | fwd+bwd ms | fwd+bwd vs first row |\n|---|---|---|---|")
        paths = PATHS if device.type == "cuda" else CPU_PATHS
        cases = [(name, env, None) for name, env in paths.items()]
        if device.type == "cuda":
            cases += [(f"fused gating {json.dumps(c)}", PATHS["fused gating"], c) for c in configs]
        if args.peers:
            cases.append((PEER, {}, None))
        flops = product_flops(n, batch, dim, ffn)
        base = None
        profiles = []
        for name, env, config in cases:
            model, inp, out_grad = block, x, grad
            if name == PEER:  # batch-major, as timm runs it
                model = _timm_block(n, dim, ffn).to(device)
                inp = x.detach().transpose(0, 1).contiguous().requires_grad_()
                out_grad = grad.transpose(0, 1).contiguous()
            try:
                sgu_triton.set_launch_config(**(config or {}))
                with environment(env):
                    with torch.no_grad():
                        fwd = _time_ms(_step(model, inp, out_grad, False), device, args.reps)
                    both = _time_ms(_step(model, inp, out_grad, True), device, args.reps)
                    if args.top and config is None:
                        lines = _profile(_step(model, inp, out_grad, True), device, args.top, flops)
                        profiles.append((name, lines))
            finally:
                sgu_triton.set_launch_config(**default)
            base = base or both
            print(f"| {name} | {fwd:.3f} | {both:.3f} | {both / base:.2f}x |", flush=True)
        for name, lines in profiles:
            print(f"\n### {name}: top kernels of forward+backward\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

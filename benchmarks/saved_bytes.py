"""Bytes one GMLPBlock saves for backward, through each path: fused gating, split kernel, plain ops.

    TRITON_INTERPRET=1 python benchmarks/saved_bytes.py --device cpu     # here (kernels interpreted)
    python benchmarks/saved_bytes.py --device cuda --batch 256            # on the GPU, gMLP-B/16 shapes

Counts the distinct storages autograd keeps (saved-tensor hooks; parameters excluded, their autocast
copies included) during one forward of a block of gMLP-B/16's widths (dim 512, d_ffn 3072, 196 tokens by
default). At training batch sizes activations dominate, so this is what training memory per block scales
with. Prints one line per path and the ratios. Off CUDA, "plain ops" is the CPU path (``fc1`` as two GEMMs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

import gmlp.nn.block as block_module  # noqa: E402
from gmlp.nn import GMLPBlock  # noqa: E402

PATHS = {"fused gating": (True, True), "split kernel": (True, False), "plain ops": (False, False)}


def saved_bytes(block: GMLPBlock, x: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes of the distinct storages saved for backward by one forward of ``block`` (autocast if dtype),
    not counting the parameters themselves (resident anyway)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(x)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--ffn", type=positive_int, default=3072)
    parser.add_argument("--tokens", type=positive_int, default=196)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast (default: float32)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    block = GMLPBlock(args.dim, args.ffn, args.tokens).to(device)
    x = torch.randn(args.tokens, args.batch, args.dim, device=device, requires_grad=True)
    saved = block_module.triton_enabled, block_module.fused_gating_enabled
    out: dict[str, int] = {}
    try:
        for path, (kernels, fused) in PATHS.items():
            block_module.triton_enabled = lambda t, on=kernels: on
            block_module.fused_gating_enabled = lambda *_, on=fused: on
            out[path] = saved_bytes(block, x, torch.bfloat16 if args.bf16 else None)
    finally:
        block_module.triton_enabled, block_module.fused_gating_enabled = saved
    activation = args.tokens * args.batch * (args.ffn // 2) * (2 if args.bf16 else 4)
    print(f"block dim {args.dim}, d_ffn {args.ffn}, {args.tokens} tokens, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'} on {device}")  # fmt: skip
    for path, n in out.items():
        print(f"{path:>13}: {n / 2**20:8.2f} MiB saved = {n / activation:.2f} activations of "
              f"tokens x batch x d_ffn/2; {n / out['fused gating']:.2f}x the fused path")  # fmt: skip
    return out


if __name__ == "__main__":
    main()

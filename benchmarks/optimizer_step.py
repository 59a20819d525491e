"""Time one AdamW step over a model's parameters: torch's default, for-each, for-loop and fused updates.

    python benchmarks/optimizer_step.py                      # gMLP-S/16 parameters on the CPU
    python benchmarks/optimizer_step.py --device cuda --model gmlp_b16_224

The implementations step in interleaved rounds (the order rotated each round, so none always runs first);
prints the median of ``--reps`` rounds (after one warm-up round) per implementation and its speed-up over the
default; the gradients are random (the update's cost does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

from gmlp import create_model  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402

VARIANTS = {
    "default": {},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "fused": {"fused": True},
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gmlp_s16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=positive_int, default=10)
    args = parser.parse_args(argv)
    tune_malloc()
    device = torch.device(args.device)
    params = list(create_model(args.model).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4, **kw) for name, kw in VARIANTS.items()}
    names, samples = list(optimizers), {name: [] for name in optimizers}
    for round_ in range(args.reps + 1):  # interleaved, the order rotated each round (as run.py)
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(rounds[1:]) * 1e3 for name, rounds in samples.items()}
    count = sum(p.numel() for p in params)
    print(
        f"AdamW step over {args.model}'s {count / 1e6:.1f}M parameters on {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}:"
    )
    for name, ms in times.items():
        print(f"  {name:9s} {ms:8.2f} ms  {times['default'] / ms:5.2f}x")
    return times


if __name__ == "__main__":
    main()

"""Tune the fused GELU+split+LayerNorm kernels: time every launch configuration at the real shapes.

    python benchmarks/kernel_sweep.py --best-json best.json          # on the GPU
    TRITON_INTERPRET=1 python benchmarks/kernel_sweep.py --device cpu --shapes 9x24 \
        --gating-shapes 12x2x24 --reps 1                             # dry run

For each shape (rows x C, bf16) times the forward and the backward kernel of every configuration of
:class:`gmlp.kernels.sgu_triton.LaunchConfig` in the grid below, next to the plain PyTorch ops, checks
each configuration's outputs and gradients against the float32 reference, and prints the achieved
memory bandwidth. Then the best forward and the best backward settings (least total time over the shapes)
are timed again with and without ``ln_split`` (rows in two power-of-two pieces). The best of all go to
``--best-json``, in the form ``benchmarks/run.py --triton-config`` takes.

Then, at each ``--gating-shapes`` (tokens x batch x C, bf16), the whole gating after ``fc1`` three ways,
forward and forward+backward: the fused :func:`gmlp.kernels.spatial_gating` (the default on CUDA) at
each tile of GATE_GRID (``gate_rows`` x ``gate_cols``; the best joins ``--best-json``), the
GELU+split+LayerNorm kernel followed by plain gating ops (``GMLP_DISABLE_FUSED_GATING=1``), and plain ops
only; each checked against the float32 reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

from gmlp.kernels import (  # noqa: E402
    gelu_split_layernorm,
    gelu_split_layernorm_reference,
    sgu_triton,  # noqa: E402
    spatial_gating,
    spatial_gating_reference,
)

# fwd_warps 16 was the slowest or near it at every forward setting of the sixth session's H200 sweep
# (benchmarks/RESULTS.md); its place goes to fwd_prefetch, which only a looping program (fwd_programs_per_sm
# set) uses
FWD_GRID = {
    "fwd_rows": (1, 2, 4),
    "fwd_warps": (4, 8),
    "fwd_programs_per_sm": (None, 8, 32),
    "fwd_prefetch": (None, 1),
}
BWD_GRID = {"bwd_warps": (4, 8, 16), "bwd_programs_per_sm": (4, 8, 16, 32), "bwd_prefetch": (None, 1)}
# gate_cols: 512 is the default (None); 2048 is the whole row at the suite's C = 1536
GATE_GRID: dict[str, tuple[int | None, ...]] = {"gate_rows": (1, 4), "gate_cols": (256, 512, 2048)}


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _grid(grid: dict[str, tuple[int, ...]]) -> list[dict[str, int]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _fwd_configs() -> list[dict[str, int]]:
    """FWD_GRID without the prefetch settings of one-tile programs (the same kernel as without)."""
    return [c for c in _grid(FWD_GRID) if not (c["fwd_prefetch"] and c["fwd_programs_per_sm"] is None)]


def sweep_shape(
    rows: int,
    c: int,
    device: torch.device,
    reps: int,
    fwd_configs: list[dict[str, int | None]],
    bwd_configs: list[dict[str, int | None]],
) -> tuple[dict[str, float], dict[str, float], float, float, list[str]]:
    """Times ``fwd_configs`` on the forward kernel and ``bwd_configs`` on the backward kernel. Returns
    forward and backward milliseconds per configuration (keyed by its JSON), the plain ops' forward and
    backward milliseconds, and a list of configurations whose results were wrong."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    u = (2 * torch.randn(rows, 2 * c, device=device)).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    seeds = [torch.randn(rows, c, device=device, dtype=dtype) for _ in range(2)]
    leaves = [t.detach().float().requires_grad_() for t in (u, w, b)]
    ref_out = gelu_split_layernorm_reference(*leaves, 1e-5)
    ref_grads = torch.autograd.grad(ref_out, leaves, [s.float() for s in seeds])
    bad: list[str] = []

    def check(key: str, outs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...]) -> None:
        for got, want in zip((*outs, *grads), (*ref_out, *ref_grads), strict=True):
            scale = want.abs().max().item() + 1e-6
            if (got.float() - want).abs().max().item() / scale > 5e-2:
                bad.append(key)
                return

    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}
    saved = asdict(sgu_triton.launch_config)
    try:
        for config in fwd_configs:
            sgu_triton.set_launch_config(**config)
            key = json.dumps(config)
            with torch.no_grad():
                fwd[key] = _time_ms(
                    lambda: gelu_split_layernorm(u, w, b, 1e-5, use_triton=True), device, reps
                )
            outs = gelu_split_layernorm(u, w, b, 1e-5, use_triton=True)
            check(key, outs, torch.autograd.grad(outs, [u, w, b], seeds))
        sgu_triton.set_launch_config(**saved)
        outs = gelu_split_layernorm(u, w, b, 1e-5, use_triton=True)
        for config in bwd_configs:
            sgu_triton.set_launch_config(**config)
            key = json.dumps(config)
            bwd[key] = _time_ms(
                lambda: torch.autograd.grad(outs, [u, w, b], seeds, retain_graph=True), device, reps
            )
            check(key, outs, torch.autograd.grad(outs, [u, w, b], seeds, retain_graph=True))
    finally:
        sgu_triton.set_launch_config(**saved)
    with torch.no_grad():
        plain_f = _time_ms(lambda: gelu_split_layernorm(u, w, b, 1e-5, use_triton=False), device, reps)
    plain_out = gelu_split_layernorm(u, w, b, 1e-5, use_triton=False)
    plain_b = _time_ms(
        lambda: torch.autograd.grad(plain_out, [u, w, b], seeds, retain_graph=True), device, reps
    )
    return fwd, bwd, plain_f, plain_b, bad


def _split_kernel_gating(
    u: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The unfused-gating path: GELU+split+LayerNorm kernel, then the token GEMM and product in plain ops."""
    z1, z2n = gelu_split_layernorm(u, nw, nb, 1e-5, use_triton=True)
    gate = torch.addmm(b.to(u.dtype).unsqueeze(1), w.to(u.dtype), z2n.reshape(u.shape[0], -1))
    return z1 * gate.view_as(z1)


def _plain_gating(
    u: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The reference ops as a model runs them: under bf16 autocast (float32 parameters, bf16 ``u``)."""
    with torch.autocast(u.device.type, dtype=torch.bfloat16):
        return spatial_gating(u, nw, nb, 1e-5, w, b, use_triton=False)


def time_gating(
    n: int, batch: int, c: int, device: torch.device, reps: int, totals: dict[str, float], wrong: set[str]
) -> list[str]:
    """Markdown rows: forward and forward+backward milliseconds of the gating paths at one shape, the
    fused one at every GATE_GRID tile (added to ``totals``; wrong results go to ``wrong``)."""
    torch.manual_seed(0)
    u = (2 * torch.randn(n, batch, 2 * c, device=device)).to(torch.bfloat16).requires_grad_()
    params = [1 + 0.1 * torch.randn(c, device=device), 0.1 * torch.randn(c, device=device),
              torch.randn(n, n, device=device) / n**0.5, 1 + 0.1 * torch.randn(n, device=device)]  # fmt: skip
    params = [p.requires_grad_() for p in params]
    nw, nb, w, b = params
    leaves = [t.detach().float().requires_grad_() for t in (u, *params)]
    seed = torch.randn(n, batch, c, device=device)
    ref = spatial_gating_reference(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], leaves[4])
    ref_grads = torch.autograd.grad(ref, leaves, seed)
    fused = lambda: spatial_gating(u, nw, nb, 1e-5, w, b, use_triton=True)
    paths: list[tuple[str, Callable[[], torch.Tensor], dict[str, int | None] | None]] = [
        (f"fused gating {json.dumps(tile)}", fused, tile) for tile in _grid(GATE_GRID)
    ]
    paths += [
        ("split kernel + plain gating", lambda: _split_kernel_gating(u, nw, nb, w, b), None),
        ("plain ops", lambda: _plain_gating(u, nw, nb, w, b), None),
    ]
    seed16 = seed.to(torch.bfloat16)
    rows, base = [], None
    saved = asdict(sgu_triton.launch_config)
    try:
        for name, fn, tile in paths:
            if tile is not None:
                sgu_triton.set_launch_config(**tile)
            out = fn()
            got = (out, *torch.autograd.grad(out, [u, *params], seed16))
            error = max(
                ((g.float() - r).abs().max() / (r.abs().max() + 1e-6)).item()
                for g, r in zip(got, (ref, *ref_grads), strict=True)
            )
            with torch.no_grad():
                fwd = _time_ms(fn, device, reps)
            both = _time_ms(lambda fn=fn: torch.autograd.grad(fn(), [u, *params], seed16), device, reps)
            sgu_triton.set_launch_config(**saved)
            base = base or both
            flag = " WRONG" if error > 5e-2 else ""
            if tile is not None:
                key = json.dumps(tile)
                totals[key] = totals.get(key, 0.0) + both
                if flag:
                    wrong.add(key)
            cells = (f"{n}x{batch}x{c}", f"{name}{flag}", f"{fwd:.3f}", f"{both:.3f}", f"{both / base:.2f}x",
                     f"{error:.1e}")  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    finally:
        sgu_triton.set_launch_config(**saved)
    return rows


def _print_table(
    rows: int,
    c: int,
    fwd: dict[str, float],
    bwd: dict[str, float],
    plain_f: float,
    plain_b: float,
    bad: list[str],
    totals_f: dict[str, float],
    totals_b: dict[str, float],
) -> None:
    """One shape's configurations, fastest first, with the achieved bandwidth; adds each time to its
    configuration's total over the shapes."""
    gb_f = rows * c * 2 * (2 + 2) / 1e9  # read u (2C), write z1 and z2n (C each); bf16
    gb_b = rows * c * 2 * (2 + 1 + 1 + 2) / 1e9  # read u, dz1, dz2; write du
    print("| pass | configuration | ms | GB/s | vs plain ops |\n|---|---|---|---|---|")
    for label, table, gb, plain, totals in (
        ("fwd", fwd, gb_f, plain_f, totals_f),
        ("bwd", bwd, gb_b, plain_b, totals_b),
    ):
        for key, ms in sorted(table.items(), key=lambda kv: kv[1]):
            totals[key] = totals.get(key, 0.0) + ms
            flag = " WRONG" if key in bad else ""
            print(f"| {label} | {key}{flag} | {ms:.3f} | {gb / ms * 1e3:.0f} | {plain / ms:.2f}x |")


def _with_split(
    shapes: list[tuple[int, ...]],
    device: torch.device,
    reps: int,
    best: dict[str, int | None],
    wrong: set[str],
) -> dict[str, int | None]:
    """The best forward and backward settings timed again without and with ``ln_split``; returns
    ``{"ln_split": ...}``: 1 where the split rows took less total time over the shapes in both passes
    together (and were right), else None."""
    f_best = {k: best.get(k) for k in FWD_GRID}
    b_best = {k: best.get(k) for k in BWD_GRID}
    totals: dict[int | None, float] = {None: 0.0, 1: 0.0}
    for rows, c in shapes:
        fwd_configs = [{**f_best, "ln_split": s} for s in (None, 1)]
        bwd_configs = [{**b_best, "ln_split": s} for s in (None, 1)]
        fwd, bwd, plain_f, plain_b, bad = sweep_shape(rows, c, device, reps, fwd_configs, bwd_configs)
        wrong.update(bad)
        print(f"\n## {rows} x {c}: the best settings with rows in one block and in two pieces (ln_split)")
        _print_table(rows, c, fwd, bwd, plain_f, plain_b, bad, {}, {})
        for split in (None, 1):
            totals[split] += fwd[json.dumps({**f_best, "ln_split": split})]
            totals[split] += bwd[json.dumps({**b_best, "ln_split": split})]
    split_wrong = any(json.loads(key).get("ln_split") for key in wrong)
    chosen = 1 if totals[1] < totals[None] and not split_wrong else None
    print(f"\nln_split: {totals[None]:.3f} ms one block, {totals[1]:.3f} ms two pieces -> {chosen}")
    return {"ln_split": chosen}


def _shape(text: str, fields: int, form: str, sep: str = "x", flag_last: bool = False) -> tuple[int, ...]:
    """One shape of ``fields`` positive ints joined by ``sep`` (``flag_last``: the last one 0 or 1), for
    argparse: a shape that is not raises ``ArgumentTypeError`` naming ``form``."""
    try:
        values = tuple(int(v) for v in text.split(sep))
    except ValueError:
        values = ()
    sizes, last = (values[:-1], values[-1:]) if flag_last else (values, ())
    if len(values) != fields or min(sizes, default=0) < 1 or any(v not in (0, 1) for v in last):
        raise argparse.ArgumentTypeError(f"{text!r} is not {form}")
    return values


def _shapes(fields: int, form: str, flag_last: bool = False) -> Callable[[str], list[tuple[int, ...]]]:
    """argparse type: comma-separated shapes (:func:`_shape`); an empty string, none."""
    return lambda text: [_shape(s, fields, form, flag_last=flag_last) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--shapes",
        type=_shapes(2, "rows x C"),
        default="50176x1536,16384x1536",
        help="rows x C, comma-separated (defaults: gMLP-B/16 at batch 256; the MLM at 32 x 512)",
    )
    parser.add_argument(
        "--gating-shapes",
        type=_shapes(3, "tokens x batch x C"),
        default="196x256x1536,512x32x1536",
        help="tokens x batch x C for the gating comparison (defaults: gMLP-B/16 at 256; the MLM at 32)",
    )
    parser.add_argument("--reps", type=positive_int, default=20)
    parser.add_argument("--best-json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    totals_f: dict[str, float] = {}
    totals_b: dict[str, float] = {}
    wrong: set[str] = set()
    shapes = args.shapes
    for rows, c in shapes:
        fwd, bwd, plain_f, plain_b, bad = sweep_shape(
            rows, c, device, args.reps, _fwd_configs(), _grid(BWD_GRID)
        )
        wrong.update(bad)
        print(f"\n## {rows} x {c} (bf16): plain ops forward {plain_f:.3f} ms, backward {plain_b:.3f} ms")
        _print_table(rows, c, fwd, bwd, plain_f, plain_b, bad, totals_f, totals_b)
    best: dict[str, int | None] = {}
    for totals in (totals_f, totals_b):
        ok = {k: v for k, v in totals.items() if k not in wrong}
        if ok:
            best.update(json.loads(min(ok, key=ok.__getitem__)))
    best.update(_with_split(shapes, device, args.reps, best, wrong))
    if args.gating_shapes:
        print("\n## The whole gating after fc1 (bf16): fused at each gating tile, split kernel, plain ops")
        print("| tokens x batch x C | path | fwd ms | fwd+bwd ms | fwd+bwd vs first row | max rel. error |")
        print("|---|---|---|---|---|---|")
        gate_totals: dict[str, float] = {}
        for n, batch, c in args.gating_shapes:
            print("\n".join(time_gating(n, batch, c, device, args.reps, gate_totals, wrong)), flush=True)
        ok = {k: v for k, v in gate_totals.items() if k not in wrong}
        if ok:
            best.update(json.loads(min(ok, key=ok.__getitem__)))
    print(f"\nbest (least total time over the shapes): {json.dumps(best)}")
    if wrong:
        print(f"WRONG results (excluded): {sorted(wrong)}")
    if args.best_json:
        Path(args.best_json).write_text(json.dumps(best))
    return best


if __name__ == "__main__":
    main()

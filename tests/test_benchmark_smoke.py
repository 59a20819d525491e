"""The benchmark harness runs end to end at tiny sizes (so it does not rot between real runs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_side_by_side_suite_smoke(tmp_path: Path) -> None:
    run = _load("run")
    out = tmp_path / "r.json"
    results = run.main(["--suite", "smoke", "--modes", "infer", "--json", str(out)])
    names = {r.name for r in results}
    assert any(n.startswith("gmlp ") for n in names) and any(n.startswith("timm ") for n in names)
    assert any(n.startswith("g-mlp-pytorch") for n in names) and any("Bert" in n for n in names)
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and all(r["samples_per_s"] > 0 for r in data["results"])
    # the same model config in every gMLP implementation: equal FLOPs per sample
    vision = [r for r in data["results"] if r["family"] == "vision" and "vit" not in r["name"]]
    assert len({round(r["gflop_per_sample"], 6) for r in vision}) == 1


def test_peers_are_run_like_ours_and_compared_run_the_same_way() -> None:
    """BERT without dropout (no other model has any); a peer's "best gmlp speed-up" only from our rows run
    the same way (graphed with graphed, eager with eager)."""
    run = _load("run")
    bert = next(c for c in run.text_cases(2, 32, 64, 16, 2, vocab=100) if "Bert" in c.name).build()
    assert not [m for m in bert.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]

    def row(name: str, rate: float):
        return run.Result(name, "text", "train", 2, rate, 1.0, 1.0, 1.0, None, [1.0])

    results = [row("gmlp A", 10.0), row("gmlp A (CUDA graph)", 40.0), row("peer", 5.0),
               row("peer (CUDA graph)", 8.0)]
    best = {line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |")
            for line in run.table(results).splitlines()[2:]}
    assert best["peer"] == "2.00x" and best["peer (CUDA graph)"] == "5.00x"


def test_toeplitz_crossover_smoke(capsys) -> None:
    _load("toeplitz_crossover").main(["--lengths", "8,16", "--columns", "4", "--reps", "1"])
    _load("toeplitz_crossover").main(["--matrix", "--lengths", "8,16", "--reps", "1"])
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 8 ") or line.startswith("| 16 ")
    ]
    assert len(rows) == 4  # two lengths, FFT crossover and matrix backwards
    assert all(row.rstrip(" |").endswith("x") for row in rows)


@pytest.mark.slow
def test_gpu_checks_dry_run_on_cpu(capsys: pytest.CaptureFixture) -> None:
    """The prepared GPU correctness script runs (kernels in Triton's interpreter) and every check passes."""
    from gmlp.kernels import triton_available

    if not triton_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert _load("gpu_checks").main(["--device", device, "--small"]) == 0
    out = capsys.readouterr().out
    passed = re.search(r"^(\d+)/\1 checks passed on", out, re.M)  # all of them
    assert "FAIL" not in out and passed and int(passed[1]) >= 17, out[-2000:]


def test_model_filter_and_plain_ops_ablation(tmp_path: Path) -> None:
    """--models keeps only the named models; the smoke suite adds the four inference kernel-path cases of
    ours."""
    run = _load("run")
    results = run.main(["--suite", "smoke", "--only", "vision", "--modes", "infer", "--models", "gmlp gmlp"])
    names = [r.name for r in results]
    labels = ("fused gating", "split kernel", "plain ops", "token bias in GEMM")
    assert names == ["gmlp gmlp_s16_224"] + [f"gmlp gmlp_s16_224 ({label})" for label in labels]
    results = run.main(
        ["--suite", "smoke", "--only", "vision", "--modes", "infer", "--models", "vit", "--no-ablation"]
    )
    assert [r.name for r in results] == ["timm vit_tiny_patch16_224"]


def test_host_suite_and_the_folded_bias_row() -> None:
    """``--suite host``: 48 tiny layers, ours and the peer; the folded-bias and fused-residual ablations:
    training rows only."""
    run = _load("run")
    results = run.main(["--suite", "host", "--only", "text", "--modes", "train", "--threads", "1",
                        "--models", "gmlp GMLPForMaskedLM,g-mlp-pytorch", "--no-ablation"])  # fmt: skip
    assert [r.name for r in results] == [
        "gmlp GMLPForMaskedLM", "gmlp GMLPForMaskedLM (sparse prediction)", "g-mlp-pytorch gMLP"
    ]  # fmt: skip
    assert all(r.samples_per_s > 0 and len(r.rounds) == 15 for r in results)
    cpu = torch.device("cpu")
    for label in ("fc1 bias folded", "residual grad fused"):
        assert label in run.ablation_labels(cpu, "train", "smoke")
        assert label not in run.ablation_labels(cpu, "infer", "smoke")
    assert run.ablation_labels(cpu, "train", "host") == ()


def test_compiled_suite_times_the_kernels_kept_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile times ours plain-compiled and with the fused gating kept inside the graph ("kernels
    kept", its switch set around the compiled model, so while it is traced); aot_eager keeps this quick."""
    import functools

    import gmlp.nn.block as block_module

    run = _load("run")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    traced: list[tuple[str | None, bool]] = []

    def spy(t: torch.Tensor) -> bool:  # runs (inlined) while each block is traced
        traced.append((os.environ.get("GMLP_TRITON_UNDER_COMPILE"), torch.compiler.is_compiling()))
        return False  # no CUDA here: the plain ops either way

    monkeypatch.setattr(block_module, "compiled_kernels_enabled", spy)
    results = run.main(["--suite", "smoke", "--only", "vision", "--modes", "train", "--compile", "--models",
                        "gmlp gmlp"])  # fmt: skip
    assert [r.name for r in results] == ["gmlp gmlp_s16_224", "gmlp gmlp_s16_224 (kernels kept)"]
    assert {("1", True), (None, True)} <= set(traced)
    assert "GMLP_TRITON_UNDER_COMPILE" not in os.environ


def test_compile_mode_reaches_torch_compile_and_each_step_is_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile-mode goes to torch.compile; with reduce-overhead (inductor's CUDA graphs) every timed and
    warm-up step first calls torch.compiler.cudagraph_mark_step_begin (the seventh session's crash)."""
    run = _load("run")
    modes: list[str | None] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw.get("mode")) or model)
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    args = ["--suite", "smoke", "--only", "text", "--modes", "train", "--compile"]
    args += ["--models", "g-mlp-pytorch"]
    results = run.main([*args, "--compile-mode", "reduce-overhead"])
    assert [r.name for r in results] == ["g-mlp-pytorch gMLP"] and modes == ["reduce-overhead"]
    suite = run.SUITES["smoke"]
    assert len(marks) == suite["warmup"] + suite["rounds"] * suite["steps"]
    modes.clear()
    run.main(args)  # the default mode: no marks
    assert modes == [None] and len(marks) == suite["warmup"] + suite["rounds"] * suite["steps"]


def test_block_paths_smoke(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/block_paths.py times and profiles one block on each CPU path and timm's block of the same
    shape, with the time in matrix products and their rate (the CUDA paths need a GPU)."""
    _load("block_paths").main(["--device", "cpu", "--shapes", "12x2x32x192x1", "--reps", "1", "--top", "2",
                               "--peers"])  # fmt: skip
    out = capsys.readouterr().out
    for row in ("| oneDNN |", "| plain ops |", "| timm block |"):
        assert row in out
    assert out.count("top kernels of forward+backward") == 3
    assert out.count("GFLOP/s)") == 3


@pytest.mark.parametrize("shape", [(12, 2, 32, 192), (7, 3, 16, 64)])
def test_block_paths_product_flops_match_flop_counter(shape: tuple[int, int, int, int]) -> None:
    """The product FLOPs block_paths.py divides by are those torch's FLOP counter sees in a block's
    forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from gmlp.nn import GMLPBlock

    n, batch, dim, ffn = shape
    block = GMLPBlock(dim, ffn, n)
    x = torch.randn(n, batch, dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        block(x).sum().backward()
    assert _load("block_paths").product_flops(n, batch, dim, ffn) == counter.get_total_flops()


def test_resident_bytes_counts_each_storage_once() -> None:
    """Parameters, gradients and optimizer state are counted; a tensor shared twice counts once."""
    run = _load("run")
    model = torch.nn.Linear(8, 4)  # 36 float32 parameters
    x = torch.randn(2, 8)
    assert run.resident_bytes(model) == 36 * 4
    opt = torch.optim.AdamW(model.parameters())
    model(x).sum().backward()
    opt.step()
    params_grads = 2 * 36 * 4
    moments = 2 * 36 * 4
    steps = sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())
    assert run.resident_bytes(model, opt, (x, x)) == params_grads + moments + steps + x.numel() * 4


def test_profile_step_smoke(capsys: pytest.CaptureFixture) -> None:
    """The profile script runs and reports a per-step time and category shares for both models."""
    _load("profile_step").main(
        ["--device", "cpu", "--size", "smoke", "--batch", "2", "--steps", "1", "--text", "2,32,64,16,2"]
    )
    out = capsys.readouterr().out
    assert out.count("ms of cpu time per step") == 3 and "matrix products" in out
    assert "GMLPForMaskedLM (sparse prediction)" in out


def test_kernel_sweep_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every launch configuration is timed and checked against the reference, and the best ones again with
    rows in two pieces; the best is written; the three gating paths are timed and checked."""
    from gmlp.kernels import sgu_triton, triton_available

    if not triton_available() or (
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("needs triton (on CPU with TRITON_INTERPRET=1, which tests/conftest.py sets)")
    before = dataclasses.asdict(sgu_triton.launch_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best_file = tmp_path / "best.json"
    sweep = _load("kernel_sweep")
    best = sweep.main(
        ["--device", device, "--shapes", "9x24", "--gating-shapes", "12x2x24,7x3x16", "--reps", "1",
         "--best-json", str(best_file)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "WRONG" not in out
    gating = [line for line in out.splitlines() if line.startswith(("| 12x2x24 |", "| 7x3x16 |"))]
    # at each of the two shapes: the fused path at every gating tile, the split kernel and plain ops
    assert len(gating) == 2 * (len(sweep._grid(sweep.GATE_GRID)) + 2)
    # the grid, then the best forward and backward settings without and with ln_split (4 rows a shape)
    n_configs = len(sweep._fwd_configs()) + len(sweep._grid(sweep.BWD_GRID)) + 4
    assert sum(line.startswith(("| fwd |", "| bwd |")) for line in out.splitlines()) == n_configs
    assert "ln_split: " in out and best["ln_split"] in (None, 1)
    assert json.loads(best_file.read_text()) == best and set(best) == set(before)
    assert dataclasses.asdict(sgu_triton.launch_config) == before  # the sweep restores the configuration


@pytest.mark.parametrize("c", [1536, 768])
def test_rows_in_two_pieces_compile_to_less_work(c: int) -> None:
    """benchmarks/ptx_count.py compiles the LayerNorm kernels for sm_90 (no GPU needed): with ``ln_split``
    a row of 1536 (or 768) columns takes fewer instructions per thread than one padded power-of-two block,
    forward and backward; the pre-norm backward compiles with and without the residual gradient, the gating
    kernels with and without the token bias."""
    import subprocess

    from gmlp.kernels import triton_available

    if not triton_available():
        pytest.skip("needs triton")
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import ptx_count; "
        f"print(json.dumps([ptx_count.count_variants({c}, quick=True), ptx_count.count_pre_norm({c // 2}), "
        f"ptx_count.count_gating({c})]))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, norm_rows, gate_rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("forward", "backward"):
        one, two = (r["instructions"] for r in rows if r["pass"] == name)
        # Triton 3.8: 0.80-0.88x of the one-block count; Triton 3.6 (torch 2.11): 0.91x forward at 768
        assert 0 < two < one, (name, one, two)
    # the pre-norm backward compiles with the residual gradient added in, at a few more instructions
    plain, residual = (r["instructions"] for r in norm_rows)
    assert 0 < plain < residual < 1.2 * plain, (plain, residual)
    # the gating kernels compile with the token bias added on load, also at a few more instructions
    for name in ("gating forward", "gating backward"):
        without, with_bias = (r["instructions"] for r in gate_rows if r["pass"] == name)
        assert 0 < without < with_bias < 1.2 * without, (name, without, with_bias)


@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_session.sh end to end on CPU (DRY=1): every step runs and writes its file."""
    import subprocess

    from gmlp.kernels import triton_available

    if not triton_available():
        pytest.skip("needs triton (the dry run uses its interpreter)")
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env["STEPS"] = "checks sweep suite profile crossover"  # train needs the carried .fm/ data
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"checks.txt", "sweep.txt", "suite.txt", "gpu.json", "profile.txt"} <= files
    checks = (tmp_path / "checks.txt").read_text()
    assert "checks passed on cpu" in checks and " fused gating: " in checks
    assert "unfold backward ms" in (tmp_path / "sweep.txt").read_text()  # the Toeplitz W's backwards
    profile = (tmp_path / "profile.txt").read_text()
    assert "ms of cpu time per step" in profile and "fft fwd ms" in profile  # profile, then the crossover
    assert json.loads((tmp_path / "gpu.json").read_text())["machine"]["triton_config"]


def test_saved_bytes_orders_the_kernel_paths() -> None:
    """The fused gating keeps fewer bytes for backward than the split kernel, which keeps fewer than plain
    ops; the script restores the block's routing afterwards."""
    from gmlp.kernels import triton_available

    if not triton_available() or (
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("needs triton (on CPU with TRITON_INTERPRET=1, which tests/conftest.py sets)")
    import gmlp.nn.block as block_module

    before = block_module.triton_enabled, block_module.fused_gating_enabled
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = _load("saved_bytes").main(["--device", device, "--dim", "32", "--ffn", "192", "--tokens", "12",
                                     "--batch", "4"])  # fmt: skip
    assert out["fused gating"] < out["split kernel"] < out["plain ops"]
    assert (block_module.triton_enabled, block_module.fused_gating_enabled) == before


def test_a_failing_case_is_reported_and_left_out(capsys: pytest.CaptureFixture) -> None:
    """A case that raises when built or in its warm-up steps costs only its own row."""
    run = _load("run")

    class TrainBreaks(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("kernel exploded")
            return super().forward(x)

    def cannot_build() -> torch.nn.Module:
        raise ImportError("no such peer")

    inputs = lambda device: (torch.randn(3, 4, device=device),)
    cases = [
        run.Case("broken in training", "vision", lambda: TrainBreaks(4, 2), inputs),
        run.Case("unbuildable", "vision", cannot_build, inputs),
        run.Case("fine", "vision", lambda: torch.nn.Linear(4, 2), inputs),
    ]
    results = run.run_cases(cases, "train", torch.device("cpu"), "fp32", rounds=2, steps=1, warmup=1)
    assert [r.name for r in results] == ["fine"]
    out = capsys.readouterr().out
    assert "FAILED broken in training (train): RuntimeError: kernel exploded" in out
    assert "FAILED unbuildable (train): ImportError: no such peer" in out


def test_mlm_cases_time_one_loss_and_the_table_shows_our_fastest_row() -> None:
    """Every MLM case trains on the same labelled tokens; ours with sparse prediction computes the same loss
    as the dense head + cross-entropy the peers use; the table compares peers with our fastest row too."""
    run = _load("run")
    cases = {c.name: c for c in run.text_cases(2, 32, 64, 16, 3, vocab=100, static_sparse=True)}
    dense, sparse = cases["gmlp GMLPForMaskedLM"], cases["gmlp GMLPForMaskedLM (sparse prediction)"]
    static = cases["gmlp GMLPForMaskedLM (sparse prediction, static 5/seq)"]  # 2 x 15% of 16 tokens
    assert set(cases) >= {"g-mlp-pytorch gMLP", "transformers BertForMaskedLM"}
    inputs = dense.inputs(torch.device("cpu"))
    labels = inputs[1]
    assert (labels != -100).any() and (labels == -100).any()
    torch.manual_seed(0)
    a = dense.build()
    torch.manual_seed(0)
    b = sparse.build()
    torch.manual_seed(0)
    c = static.build()
    torch.testing.assert_close(sparse.loss(b(*inputs)), dense.loss(a(*inputs)))
    torch.testing.assert_close(static.loss(c(*inputs)), dense.loss(a(*inputs)))
    with torch.no_grad():  # inference: the logits
        assert a(*inputs).shape == b(*inputs).shape == (3, 16, 100)
    assert "sparse" not in " ".join(c.name for c in run.text_cases(2, 32, 64, 16, 3, vocab=100, sparse=False))
    assert not any("static" in c.name for c in run.text_cases(2, 32, 64, 16, 3, vocab=100))  # CUDA only

    def result(name: str, rate: float):
        return run.Result(name, "text", "train", 8, rate, 1.0, 1.0, 1.0, None, [1.0])

    rows = run.table([result("gmlp A", 2.0), result("gmlp A (sparse prediction)", 6.0), result("peer", 1.0)])
    assert rows.splitlines()[-1].endswith("| peer | train | 8 | 1.0 | 1 | 1.00 | 1.000 | - | 2.00x | 6.00x |")
    assert rows.splitlines()[-2].endswith("| 0.33x | - |")  # our rows: against our default only


def test_optimizer_step_smoke(capsys: pytest.CaptureFixture) -> None:
    times = _load("optimizer_step").main(["--model", "gmlp_micro4_28", "--reps", "1"])
    assert set(times) == {"default", "foreach", "for-loop", "fused"} and all(t > 0 for t in times.values())
    assert "fused" in capsys.readouterr().out


def test_dtype_override_runs_every_model_in_bf16_autocast(tmp_path: Path) -> None:
    run = _load("run")
    out = tmp_path / "bf16.json"
    run.main(["--suite", "smoke", "--dtype", "bf16", "--only", "vision", "--modes", "train", "--models",
              "gmlp gmlp,timm gmlp", "--no-ablation", "--json", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["dtype"] == "bf16" and "gemm_tflops_bf16" in data["machine"]
    assert [r["name"] for r in data["results"]] == ["gmlp gmlp_s16_224", "timm gmlp_s16_224"]


def test_cpu_matmul_smoke(capsys: pytest.CaptureFixture) -> None:
    from gmlp.kernels import cpu_linear

    if not cpu_linear._HAS_ONEDNN_LINEAR:
        pytest.skip("torch without oneDNN linear")
    args = ["--dim", "8", "--ffn", "16", "--tokens", "4", "--batch", "2", "--reps", "1"]
    rows = _load("cpu_matmul").main(args)
    assert len(rows) == 9 and all(blas > 0 and dnn > 0 for _, blas, dnn in rows)
    assert "| token mixing weight gradient |" in capsys.readouterr().out
    if cpu_linear._HAS_ONEDNN_BF16:  # the same table in bf16
        assert len(_load("cpu_matmul").main([*args, "--dtype", "bf16"])) == 9
        assert ", bf16, median of 1" in capsys.readouterr().out
    small = _load("cpu_matmul").main(["--small", "--reps", "1"])  # the oneDNN size-threshold table
    assert len(small) == 2 * 12 and all(blas > 0 and dnn > 0 for _, blas, dnn in small)
    assert "| 1024 x 256 -> 768 | 4.0e+08 | linear + GELU |" in capsys.readouterr().out
    grads = _load("cpu_matmul").main([*args, "--weight-grad"])  # the weight-gradient orientation table
    assert [name for name, _, _ in grads] == ["fc1 half", "fc2"] and all(a > 0 and b > 0 for _, a, b in grads)
    assert "| fc2 (8 x 8) |" in capsys.readouterr().out


def test_elementwise_cost_takes_out_each_stage_and_puts_it_back(capsys: pytest.CaptureFixture) -> None:
    """Each stage taken out changes the output (the patch takes effect), the backward still reaches both
    projections of every block (the products stay), and the model is exactly itself again afterwards."""
    cost = _load("elementwise_cost")
    from gmlp import create_model
    from gmlp.nn import GMLPBlock

    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28").eval()
    blocks = [m for m in model.modules() if isinstance(m, GMLPBlock)]
    for block in blocks:  # a W that really mixes tokens, not the near-zero init
        torch.nn.init.normal_(block.sgu.proj.weight, std=0.1)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model.forward_features(x)  # the logits start at zero: the head is zero-initialised
    for stage in cost.STAGES:
        with cost.without(model, stage):
            with torch.no_grad():
                assert not torch.allclose(model.forward_features(x), ref), stage
            model.train()
            model.zero_grad(set_to_none=True)
            model.forward_features(x).square().sum().backward()
            model.eval()
            for block in blocks:  # both halves of fc1: the bypass z1 and the gate z2
                c, grad = block.sgu.gate_dim, block.fc1.weight.grad
                assert grad is not None and grad[:c].abs().sum() > 0 and grad[c:].abs().sum() > 0, stage
                assert block.fc2.weight.grad is not None, stage
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stage must be one of"), cost.without(model, "softmax"):
        pass
    cost.main(["--model", "gmlp_micro4_28", "--rounds", "1", "--infer-batch", "2", "--train-batch", "2"])
    out = capsys.readouterr().out
    assert out.count("| residual sum |") == 2 and "infer, batch 2" in out and "train, batch 2" in out
    cost.main(["--model", "gmlp_micro4_28", "--rounds", "1", "--modes", "train", "--dtype", "bf16"])
    tiny, one = 5e-324, 1.0
    assert tiny * one > 0.0  # main flushed subnormals for the rest of its caller's process (left set)
    out = capsys.readouterr().out
    assert "bf16 autocast" in out and out.count("| residual sum |") == 1


def test_rounds_rotate_the_order_of_the_cases() -> None:
    """Each timed round starts one case later: no model always runs first (eighteenth session: with a fixed
    order, our first-listed default case ran at 0.95x its "plain ops" ablation in two CPU-suite runs where
    both ran the same code)."""
    run = _load("run")
    order: list[str] = []

    class Named(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append(self.name)
            return x * self.weight

    cases = [
        run.Case(name, "vision", lambda name=name: Named(name), lambda device: (torch.ones(2, 1),))
        for name in "ABC"
    ]
    results = run.run_cases(cases, "infer", torch.device("cpu"), "fp32", rounds=3, steps=1, warmup=1)
    assert [r.name for r in results] == ["A", "B", "C"]
    assert "".join(order[-9:]) == "ABCBCACAB"


@pytest.mark.parametrize("avx512", [True, False])
def test_elementwise_cost_keeps_the_token_mixing_products_without_its_bias(
    monkeypatch: pytest.MonkeyPatch, avx512: bool
) -> None:
    """Taking the token bias out runs the very products the model runs (its docstring): also on a CPU
    without AVX-512, where the model's token mixing stays on addmm (BLAS), not oneDNN."""
    cost = _load("elementwise_cost")
    from gmlp import create_model
    from gmlp.kernels import cpu_linear

    if not cpu_linear._HAS_ONEDNN_LINEAR:
        pytest.skip("torch without oneDNN linear")
    monkeypatch.delenv("GMLP_DISABLE_CPU_FUSION", raising=False)  # (the suite forces the oneDNN path)
    monkeypatch.setattr(cpu_linear, "_ONEDNN_BY_DEFAULT", avx512)
    calls: list[torch.Size] = []
    mm = cpu_linear._mm
    monkeypatch.setattr(cpu_linear, "_mm", lambda a, b, *more: calls.append(a.shape) or mm(a, b, *more))
    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28").train()
    x = torch.randn(2, 1, 28, 28)
    counts = []
    for stage in (None, "token bias"):
        calls.clear()
        with cost.without(model, stage):
            model(x).sum().backward()
        counts.append(len(calls))
    assert counts[0] == counts[1], counts
    assert (counts[0] > 0) == avx512  # oneDNN products with AVX-512, none without (this model is narrow)


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: each benchmark script does what $FAKE_<NAME> says (the tests below set it)
case "$*" in
  *gpu_checks.py*--kernels-only*) printf '%b' "$FAKE_KERNEL_CHECKS"; exit 0 ;;
  *gpu_checks.py*) printf '%b' "$FAKE_CHECKS"; exit "${FAKE_CHECKS_RC:-0}" ;;
  *kernel_sweep.py*) [ -z "${FAKE_BEST:-}" ] || echo "$FAKE_BEST" > "$TMPDIR/best.json" ;;
  *run.py*) echo "$@" > "$OUT/run-args.txt" ;;
esac
exit 0
"""


def _session(tmp_path: Path, steps: str, **fake: str) -> tuple[int, Path]:
    """benchmarks/gpu_session.sh with a stand-in python (in a bare folder, so nothing real runs)."""
    import subprocess

    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": str(python), "TMPDIR": str(tmp_path), "STEPS": steps}
    full.update(fake)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc.returncode, out


@pytest.mark.parametrize(
    ("checks", "rc", "passed"),
    [("PASS  a\\nPASS  b\\n2/2 checks passed on cuda\\n", 0, True),
     ("PASS  a\\nFAIL  b\\n1/2 checks passed on cuda\\n", 0, False),
     ("PASS  a\\nTraceback (most recent call last):\\nRuntimeError: CUDA error\\n", 1, False),  # crashed
     ("PASS  a\\n", 124, False)],  # timed out
    ids=["pass", "fail", "crash", "timeout"],
)  # fmt: skip
def test_gpu_session_fails_unless_the_checks_finish_and_pass(
    tmp_path: Path, checks: str, rc: int, passed: bool
) -> None:
    """A gpu_checks.py that crashes or is cut off by its time limit prints no FAIL line: the session must
    still end in failure, not report correct kernels."""
    if not sys.platform.startswith("linux"):
        pytest.skip("bash and coreutils' timeout")
    code, out = _session(tmp_path, "checks", FAKE_CHECKS=checks, FAKE_CHECKS_RC=str(rc))
    assert (code == 0) == passed, (code, (out / "checks.txt").read_text())
    assert ("did not finish" in (out / "checks.txt").read_text()) == (rc != 0)


def test_gpu_session_never_takes_an_earlier_sweeps_best(tmp_path: Path) -> None:
    """A sweep that fails writes no best.json: the suite then runs the defaults, not a stale file's."""
    if not sys.platform.startswith("linux"):
        pytest.skip("bash and coreutils' timeout")
    (tmp_path / "best.json").write_text('{"fwd_rows": 4}')  # an earlier session's
    code, out = _session(tmp_path, "sweep suite")
    assert code == 0
    assert "--triton-config {} " in (out / "run-args.txt").read_text()


@pytest.mark.parametrize(
    ("kernel_checks", "passed"),
    [("PASS  a\\n1/1 checks passed on cuda\\n", True), ("FAIL  a\\n0/1 checks passed on cuda\\n", False),
     ("PASS  a\\n", False)],  # the last one crashed or timed out
    ids=["pass", "fail", "unfinished"],
)  # fmt: skip
def test_gpu_session_checks_the_sweeps_best_before_the_suite(
    tmp_path: Path, kernel_checks: str, passed: bool
) -> None:
    """The kernels are checked again on the sweep's best launch parameters: a failure there fails the
    session and marks the suite's timings, as a failure of the checks step does."""
    if not sys.platform.startswith("linux"):
        pytest.skip("bash and coreutils' timeout")
    code, out = _session(tmp_path, "sweep suite", FAKE_BEST='{"fwd_rows": 2}',
                         FAKE_KERNEL_CHECKS=kernel_checks)
    assert "--triton-config {\"fwd_rows\": 2} " in (out / "run-args.txt").read_text()
    assert (code == 0) == passed, (out / "sweep.txt").read_text()
    assert ("WARNING" in (out / "suite.txt").read_text()) == (not passed)


@pytest.mark.parametrize("broken", ["weight", "bias", "z"])
def test_gpu_checks_fft_check_catches_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """The FFT Toeplitz check compares every gradient (z, W, b) under a random seed: an FFT path whose value
    is right but one gradient is 1.5x too large fails it."""
    import gmlp.nn.sgu as sgu_module

    checks = _load("gpu_checks")
    device = torch.device("cpu")
    torch.manual_seed(0)
    checks.check_fft(device, 12, 16)  # the real FFT path passes
    mix, plain_mix = sgu_module.toeplitz_mix_fft, sgu_module.TokenProjection.mix

    def scaled(t: torch.Tensor) -> torch.Tensor:  # the same value, 1.5x the gradient
        return t + 0.5 * (t - t.detach())

    def wrong_mix(self: sgu_module.TokenProjection, z: torch.Tensor, mask: torch.Tensor | None = None):
        if not self.uses_fft(z.shape[0]):  # the dense reference stays right
            return plain_mix(self, z, mask)
        weight, bias = self.weight, self.bias[: z.shape[0], None, None]
        weight, z, bias = (scaled(t) if name == broken else t for name, t in
                           (("weight", weight), ("z", z), ("bias", bias)))  # fmt: skip
        return mix(weight, z, self.seq_len, self.causal) + bias

    monkeypatch.setattr(sgu_module.TokenProjection, "mix", wrong_mix)
    with pytest.raises(AssertionError, match=f"FFT mixing d{broken}"):
        checks.check_fft(device, 12, 16)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [("block_paths", ["--shapes", "12x2x32x192"], "--shapes: '12x2x32x192' is not tokens x batch x dim"),
     ("block_paths", ["--shapes", "12x2x32x192x2"], "toeplitz \\(0 or 1\\)"),
     ("block_paths", ["--reps", "0"], "--reps: must be at least 1, got 0"),
     ("kernel_sweep", ["--shapes", "9"], "--shapes: '9' is not rows x C"),
     ("kernel_sweep", ["--gating-shapes", "12x2x0"], "--gating-shapes: '12x2x0' is not tokens x batch x C"),
     ("profile_step", ["--text", "2,32,64,16"], "--text: '2,32,64,16' is not LAYERS,DIM,FFN,SEQ,BATCH"),
     ("profile_step", ["--steps", "0"], "--steps: must be at least 1"),
     ("toeplitz_crossover", ["--lengths", "8,0"], "--lengths: must be at least 1, got 0"),
     ("toeplitz_crossover", ["--reps", "0"], "--reps: must be at least 1"),
     ("cpu_matmul", ["--reps", "0"], "--reps: must be at least 1"),
     ("optimizer_step", ["--reps", "-1"], "--reps: must be at least 1"),
     ("elementwise_cost", ["--rounds", "0"], "--rounds: must be at least 1"),
     ("saved_bytes", ["--batch", "0"], "--batch: must be at least 1"),
     ("run", ["--threads", "0"], "--threads: must be at least 1, got 0")],  # (0 ran on torch's default)
)  # fmt: skip
def test_benchmark_arguments_are_checked_before_any_work(
    capsys: pytest.CaptureFixture, script: str, args: list[str], message: str
) -> None:
    """A bad size or count is a usage error naming the argument, not a deep unpacking error, a
    ZeroDivisionError or "no median for empty data" (profile_step's --text only after profiling the vision
    models)."""
    import re

    with pytest.raises(SystemExit) as info:
        _load(script).main(args)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cpu_attention_is_counted_like_its_matrix_products() -> None:
    """BERT's FLOPs with fused attention (``sdpa``, as the suite builds it) == with transformers' eager
    attention, whose products the counter sees: on the CPU torch's counter has no formula for the fused op,
    and BERT and ViT read up to 8% fewer FLOPs (and TFLOP/s) than they ran."""
    from transformers import BertConfig, BertForMaskedLM

    run = _load("run")
    inputs = (torch.randint(0, 100, (2, 16)),)
    flops = []
    for attn in ("sdpa", "eager"):
        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=16,
                         attn_implementation=attn)  # fmt: skip
        model = BertForMaskedLM(cfg).eval()
        flops.append([run.count_flops(model, inputs, train=train) for train in (False, True)])
    assert flops[0] == flops[1], flops


def test_rounds_balance_each_case_s_position_and_predecessor() -> None:
    """Over n rounds every case runs once in every position and right after every other case once (2n
    rounds, twice, for an odd n): a plain rotation kept B right after A in all rounds but one."""
    from collections import Counter

    run = _load("run")
    for n in range(1, 10):
        rounds = [run.round_order(n, r) for r in range(2 * n if n % 2 else n)]
        assert all(sorted(order) == list(range(n)) for order in rounds)
        assert all(sorted(order[k] for order in rounds[:n]) == list(range(n)) for k in range(n))
        pairs = Counter((a, b) for order in rounds for a, b in zip(order, order[1:], strict=False))
        assert set(pairs.values()) <= {1 if n % 2 == 0 else 2} and len(pairs) == n * (n - 1)
    order: list[str] = []  # and run_cases times them in that order

    class Named(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append(self.label)
            return super().forward(x)

    def build(label: str) -> torch.nn.Module:
        model = Named(1, 1)
        model.label = label
        return model

    cases = [run.Case(c, "vision", lambda c=c: build(c), lambda device: (torch.ones(2, 1),)) for c in "ABCD"]
    run.run_cases(cases, "infer", torch.device("cpu"), "fp32", rounds=4, steps=1, warmup=1)
    timed = "".join(order[-16:])
    assert timed == "ABDCBCADCDBADACB"
    follows = Counter(timed[k : k + 4][j : j + 2] for k in range(0, 16, 4) for j in range(3))
    assert len(follows) == 12 and set(follows.values()) == {1}


def test_best_speed_up_is_never_an_ablation_row() -> None:
    """A peer's "best gmlp speed-up" is our fastest row users can run (the default, sparse prediction), not
    the luckiest of several timings of nearly the same code (seventh session, H200: the vision inference
    "best" came from "(fused gating)", the MLM's from "(split kernel)")."""
    run = _load("run")

    def row(name: str, rate: float):
        return run.Result(name, "vision", "infer", 2, rate, 1.0, 1.0, 1.0, None, [1.0])

    results = [row("gmlp A", 10.0), *(row(f"gmlp A ({label})", 12.0) for label in run.ABLATIONS),
               row("gmlp A (sparse prediction)", 11.0), row("peer", 5.0)]  # fmt: skip
    last = run.table(results).splitlines()[-1]
    assert last.endswith("| 2.00x | 2.20x |"), last


def test_json_records_the_machine_and_settings_and_is_written_after_each_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The json names the versions (g-mlp-pytorch, triton too), the GMLP_* switches set, the timing settings
    and each row's fraction of the run's best probe; it is written after each family, so a run cut off by a
    time limit (gpu_session.sh's `timeout`) keeps the families it finished."""
    run = _load("run")
    out = tmp_path / "r.json"
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while the text family ran

    monkeypatch.setattr(run, "text_cases", cut_off)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--suite", "smoke", "--modes", "infer", "--models", "gmlp gmlp", "--no-ablation",
                  "--json", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["name"] for r in data["results"]] == ["gmlp gmlp_s16_224"]
    machine = data["machine"]
    assert machine["g-mlp-pytorch"] and machine["triton"] and machine["timm"] and machine["transformers"]
    assert machine["gmlp_env"]["GMLP_DISABLE_CPU_FUSION"] == "1" and machine["cpu_capability"]
    assert (data["rounds"], data["steps"], data["warmup"]) == (1, 1, 1) and data["compile_mode"] is None
    probe = max(v for k, v in machine.items() if k.startswith("gemm_tflops"))
    (result,) = data["results"]
    assert result["of_probe"] == pytest.approx(result["achieved_tflops"] / probe)
    # a card's probe: products long enough to reach its rate (2048^3 read 610-636 TFLOP/s on an H200)
    assert run.SUITES["gpu"]["probe"] >= 8192 and machine["gemm_probe_n"] == run.SUITES["smoke"]["probe"]


def test_a_missing_peer_costs_only_its_own_rows(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """g-mlp-pytorch not installed (the GPU machine without the carried wheel): a FAILED line for its rows,
    the other models still timed (the import at the top of vision_cases ended the whole run)."""
    run = _load("run")
    monkeypatch.setitem(sys.modules, "g_mlp_pytorch", None)  # import raises ImportError
    results = run.main(["--suite", "smoke", "--only", "vision", "--modes", "infer", "--no-ablation",
                        "--models", "gmlp gmlp,g-mlp-pytorch"])  # fmt: skip
    assert [r.name for r in results] == ["gmlp gmlp_s16_224"]
    assert "FAILED g-mlp-pytorch gMLPVision (infer): ModuleNotFoundError" in capsys.readouterr().out


def test_gpu_session_refuses_unknown_steps_and_says_what_it_skips(tmp_path: Path) -> None:
    """A misspelt STEPS name is an error before anything runs (it ran nothing and said nothing); `train`
    without the carried .fm/ says it skipped."""
    if not sys.platform.startswith("linux"):
        pytest.skip("bash and coreutils' timeout")
    import subprocess

    code, out = _session(tmp_path, "checks suiet")
    assert code == 2 and not out.exists()
    env = {**os.environ, "OUT": str(tmp_path / "o"), "STEPS": "suiet", "PYTHON": "false"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "unknown step 'suiet'" in proc.stderr
    code, out = _session(tmp_path, "train")
    assert code == 0 and (out / "train.txt").read_text().startswith("SKIP  train: no .fm/")


def test_gpu_session_marks_timings_taken_after_a_failed_check(tmp_path: Path) -> None:
    """The suite still runs after a failed check (the machine is scarce), but its output says so first."""
    if not sys.platform.startswith("linux"):
        pytest.skip("bash and coreutils' timeout")
    failing = "PASS  a\\nFAIL  b\\n1/2 checks passed on cuda\\n"
    code, out = _session(tmp_path, "checks suite", FAKE_CHECKS=failing)
    assert code != 0 and (out / "suite.txt").read_text().startswith("WARNING: 1 correctness check(s) failed")
    assert (out / "run-args.txt").exists()  # the suite ran
    (tmp_path / "ok").mkdir()
    passing = "PASS  a\\n1/1 checks passed on cuda\\n"
    code, out = _session(tmp_path / "ok", "checks suite", FAKE_CHECKS=passing)
    assert code == 0 and "WARNING" not in (out / "suite.txt").read_text()


def test_loader_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/loader_throughput.py makes its synthetic ImageFolder and times gmlp's loader and
    torchvision's, giving a ratio per cell."""
    args = ["--smoke", "--cache", str(tmp_path), "--transforms", "train-ra,eval"]
    results = _load("loader_throughput").main(args)
    assert [(r["transform"], r["workers"]) for r in results] == [("train-ra", 0), ("eval", 0)]
    assert all(r["gmlp"] > 0 and r["torchvision"] > 0 and r["ratio"] > 0 for r in results)
    out = capsys.readouterr().out
    assert "| train-ra | 0 |" in out and "load average" in out

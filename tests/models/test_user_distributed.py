"""gmlp's models inside a user's own distributed script: two gloo processes on the CPU.

``gmlp train`` / ``pretrain`` wrap the models themselves; researchers also wrap them in their own loops. Here
two spawned processes (one run for the whole file, the results checked test by test) take half of a batch
each and must match one process on the whole batch:

* ``DistributedDataParallel`` (``find_unused_parameters=False``): no "unused parameters" error for every
  variant (aMLP tiny attention, Toeplitz W by GEMM and by FFT, causal, MLM with tied embeddings, QA, token
  and sequence classification, vision with and without head and pooling), and the same gradients.
* FSDP2 ``fully_shard`` per block and on the root: the same losses and weights after two SGD steps (tied MLM
  weights stay tied in the full state dict), with the CPU fast path (``cpu_linear._mm``) taken on the
  gathered parameters; with padding, ``num_items_in_batch`` gives the whole batch's gradient.
* ``torch.distributed.checkpoint`` save/load of the sharded model and optimizer (the resumed step equals
  the uninterrupted one), and ``get_model_state_dict(full_state_dict=True)`` into a plain model with
  ``strict=True``.

``torch.compile`` of a DDP-wrapped model (``aot_eager`` and inductor) gave the same gradients when checked by
hand, but costs 10-20 s per process here: not run in this file (tests/models/test_compile_vision.py compiles
the models in one process).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

WORLD = 2
# (five of the eight variants checked by hand: each DDP wrapper costs about a second on 2 busy cores)
DDP_VARIANTS = ["mlm_amlp_causal", "mlm_heads_dense", "clm", "qa", "vis_nopool"]
FSDP_VARIANTS = ["mlm_tied", "mlm_amlp_causal", "qa", "vis_amlp"]


# --- what the two processes run (also imported by the spawned children) ------------------------------------

def _build(name: str) -> Any:
    """A tiny model of variant ``name``, the same on every process (seeded), with spatial weights and the
    vision head drawn away from their near-zero init so that every parameter gets a real gradient."""
    import torch

    from gmlp import create_model
    from gmlp.models.text import modeling_gmlp as text
    from gmlp.models.text.configuration_gmlp import GMLPConfig

    torch.manual_seed(0)
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                max_position_embeddings=8)
    texts = {
        "mlm_tied": (text.GMLPForMaskedLM, {}),
        "mlm_amlp_causal": (text.GMLPForMaskedLM, dict(tiny_attn_size=8, causal=True)),
        "mlm_heads_dense": (text.GMLPForMaskedLM,
                            dict(toeplitz=False, sgu_heads=2, tie_word_embeddings=False)),
        "mlm_mixer": (text.GMLPForMaskedLM, dict(sgu_variant="mixer")),
        "mlm_fft": (text.GMLPForMaskedLM, dict(spatial_fft_threshold=4)),
        "clm": (text.GMLPForCausalLM, dict(causal=True, tiny_attn_size=8)),
        "seqcls": (text.GMLPForSequenceClassification, dict(num_labels=3)),
        "tokcls": (text.GMLPForTokenClassification, dict(num_labels=3)),
        "qa": (text.GMLPForQuestionAnswering, {}),
    }
    if name in texts:
        cls, extra = texts[name]
        model = cls(GMLPConfig(**base, **extra))
    else:
        options = {"vis": {}, "vis_nohead": dict(num_classes=0), "vis_nopool": dict(global_pool=""),
                   "vis_nopool_nohead": dict(global_pool="", num_classes=0), "vis_amlp": dict(attn_dim=8)}
        model = create_model("gmlp_micro4_28", **options[name])
        if model.num_classes:
            torch.nn.init.normal_(model.head.weight, std=0.1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in ("TokenProjection", "TokenLinear"):
                module.weight.normal_(std=0.1)
    return model


def _loss(name: str, model: Any, rows: slice) -> Any:
    """The mean loss of ``model`` on rows ``rows`` of a fixed batch of 4."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (4, 8), generator=g)
    images = torch.randn(4, 1, 28, 28, generator=g)
    ids = ids[rows]
    if name.startswith("vis"):
        return torch.sin(3 * model(images[rows])).mean()  # (the unpooled features' mean square is ~1)
    if name.startswith("mlm") or name == "clm":
        return model(input_ids=ids, labels=ids).loss
    if name == "seqcls":
        return model(input_ids=ids, labels=ids[:, 0] % 3).loss
    if name == "tokcls":
        return model(input_ids=ids, labels=ids % 3).loss
    return model(input_ids=ids, start_positions=ids[:, 0] % 4, end_positions=ids[:, 1] % 4).loss


def _worst(pairs: Any) -> float:
    """The largest ``max |a - b|`` over the pairs of tensors, relative to ``max |b|`` of the pair or, for a
    tensor of (near-)zeros such as the gradient of a bias that a softmax ignores, to 1e-2 of the largest
    ``max |b|`` of all pairs."""
    pairs = [(a.detach().float(), b.detach().float()) for a, b in pairs]
    scale = 1e-2 * max(float(b.abs().max()) for _, b in pairs)
    return max(float((a - b).abs().max()) / max(float(b.abs().max()), scale) for a, b in pairs)


def _shard(model: Any, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ == "GMLPBlock":
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _check_ddp(rank: int, out: dict[str, Any]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    mine = slice(2 * rank, 2 * rank + 2)
    for name in DDP_VARIANTS:
        model = _build(name)
        reference = copy.deepcopy(model)
        wrapped = DistributedDataParallel(model)  # (kept alive until backward: its reducer averages)
        _loss(name, wrapped, mine).backward()
        _loss(name, reference, slice(None)).backward()
        pairs = zip(model.parameters(), reference.parameters(), strict=True)
        out[f"ddp/{name}"] = _worst((p.grad, r.grad) for p, r in pairs)


def _check_fsdp(rank: int, mesh: Any, out: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import gmlp.kernels.cpu_linear as cpu_linear

    mine = slice(2 * rank, 2 * rank + 2)
    calls = [0]
    plain_mm = cpu_linear._mm

    def counting_mm(*args: Any) -> Any:
        calls[0] += 1
        return plain_mm(*args)

    cpu_linear._mm = counting_mm
    for name in FSDP_VARIANTS:
        model = _build(name)
        reference = copy.deepcopy(model)
        _shard(model, mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(2):
            loss, ref_loss = _loss(name, model, mine), _loss(name, reference, slice(None))
            loss.backward()
            ref_loss.backward()
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append((float(total) / WORLD, float(ref_loss)))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        expected = reference.state_dict()
        out[f"fsdp/{name}"] = {
            "losses": losses,
            "keys": sorted(full) == sorted(expected),
            "weights": _worst((full[k], expected[k]) for k in expected),
        }
        if name == "mlm_tied":
            out["fsdp/tied"] = model.decoder.weight is model.gmlp.embed.weight and torch.equal(
                full["decoder.weight"], full["gmlp.embed.weight"])
    cpu_linear._mm = plain_mm
    out["fsdp/onednn_calls"] = calls[0]


def _check_padded_fsdp(rank: int, mesh: Any, out: dict[str, Any]) -> None:
    """Padding (left and right) in uneven amounts per process: ``num_items_in_batch`` (the labelled tokens of
    the whole batch over the processes, as FSDP averages gradients) gives one process's gradient."""
    import torch

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model = _build("mlm_amlp_causal")
    reference = copy.deepcopy(model)
    _shard(model, mesh)
    mine = slice(2 * rank, 2 * rank + 2)
    count = int((labels != -100).sum())
    model(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine],
          num_items_in_batch=count / WORLD).loss.backward()
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    out["fsdp/padded"] = _worst((p.grad.full_tensor(), r.grad) for p, r in pairs)


def _check_dcp(rank: int, mesh: Any, folder: str, out: dict[str, Any]) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    mine = slice(2 * rank, 2 * rank + 2)
    for name in ("mlm_tied",):
        def fresh(seed: int, name: str = name) -> tuple[Any, Any]:
            model = _build(name)
            with torch.no_grad():  # another start: the loaded checkpoint must overwrite every value
                for p in model.parameters():
                    p.add_(seed)
            _shard(model, mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(model: Any, opt: Any, name: str = name) -> None:
            _loss(name, model, mine).backward()
            opt.step()
            opt.zero_grad()

        model, opt = fresh(0)
        step(model, opt)
        model_sd, opt_sd = get_state_dict(model, opt)
        checkpoint = os.path.join(folder, name)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=checkpoint)
        resumed, resumed_opt = fresh(1)
        model_sd, opt_sd = get_state_dict(resumed, resumed_opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step(model, opt)
        step(resumed, resumed_opt)
        options = StateDictOptions(full_state_dict=True)
        full, full_resumed = (get_model_state_dict(m, options=options) for m in (model, resumed))
        plain = _build(name)
        plain.load_state_dict(full, strict=True)  # raises on a missing or unexpected key
        out[f"dcp/{name}"] = {
            "resumed": max(float((full[k] - full_resumed[k]).abs().max()) for k in full),
            "plain": max(float((v - full[k]).abs().max()) for k, v in plain.state_dict().items()),
        }


def _worker(rank: int, store: str, folder: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore")  # (FSDP2's warning about views returned by nn.Linear on 3-D inputs)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    out: dict[str, Any] = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        import time
        for check, args in ((_check_ddp, ()), (_check_fsdp, (mesh,)), (_check_padded_fsdp, (mesh,)),
                            (_check_dcp, (mesh, folder))):
            start = time.perf_counter()
            check(rank, *args, out)  # type: ignore[operator]
            out[f"seconds/{check.__name__}"] = time.perf_counter() - start
    finally:
        if rank == 0:
            Path(folder, "results.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def _main(folder: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(os.path.join(folder, "store"), folder), nprocs=WORLD)


if __name__ == "__main__":
    _main(sys.argv[1])


# --- the tests ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """One two-process run of everything above (spawned in a fresh interpreter: no process group or
    torch.compile state of this one is touched)."""
    with tempfile.TemporaryDirectory() as folder:
        fusion = os.environ.get("GMLP_DISABLE_CPU_FUSION", "0")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "GMLP_ONEDNN_MIN_FLOPS": "0", "GMLP_DISABLE_CPU_FUSION": fusion}
        run = subprocess.run([sys.executable, __file__, folder], env=env, capture_output=True, text=True,
                             timeout=300)
        path = Path(folder, "results.json")
        found = json.loads(path.read_text()) if path.exists() else {}
        if run.returncode != 0:
            pytest.fail(f"the two processes failed (results so far {found}):\n{run.stderr[-4000:]}")
        return found


@pytest.mark.parametrize("name", DDP_VARIANTS)
def test_ddp_gradients_equal_one_process(results: dict[str, Any], name: str) -> None:
    """No "parameters that were not used in producing loss" error, and each gradient (averaged by DDP over
    the two halves) equals one process's on the whole batch."""
    assert results[f"ddp/{name}"] < 1e-5


@pytest.mark.parametrize("name", FSDP_VARIANTS)
def test_fsdp2_steps_equal_one_process(results: dict[str, Any], name: str) -> None:
    found = results[f"fsdp/{name}"]
    for sharded, single in found["losses"]:
        assert sharded == pytest.approx(single, rel=1e-5, abs=1e-6)
    assert found["keys"]
    assert found["weights"] < 1e-5


def test_fsdp2_keeps_the_mlm_weights_tied_and_runs_the_fast_path(results: dict[str, Any]) -> None:
    assert results["fsdp/tied"]
    if os.environ.get("GMLP_DISABLE_CPU_FUSION") != "1":
        import gmlp.kernels.cpu_linear as cpu_linear

        if cpu_linear._HAS_ONEDNN_LINEAR:  # the gathered (plain) parameters take the oneDNN products
            assert results["fsdp/onednn_calls"] > 0


def test_fsdp2_padded_batch_with_num_items_in_batch_equals_one_process(results: dict[str, Any]) -> None:
    assert results["fsdp/padded"] < 1e-5


@pytest.mark.parametrize("name", ["mlm_tied"])
def test_dcp_resume_and_full_state_dict_into_a_plain_model(results: dict[str, Any], name: str) -> None:
    found = results[f"dcp/{name}"]
    assert found["resumed"] == 0.0
    assert found["plain"] == 0.0


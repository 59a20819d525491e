"""CUDAGraphStep: what can be checked without a GPU (argument and input errors, make_capturable, the
models' capture-time behaviour). The capture itself runs in benchmarks/gpu_checks.py on the device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gmlp.models.text import GMLPConfig, GMLPForMaskedLM, modeling_gmlp
from gmlp.nn import _checks
from gmlp.train.cuda_graph import CUDAGraphInference, CUDAGraphStep, make_capturable


def _adamw() -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.5)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_make_capturable_turns_lr_into_a_tensor_that_schedulers_update_in_place() -> None:
    opt = make_capturable(_adamw())
    group = opt.param_groups[0]
    assert group["capturable"] is True
    lr = group["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1**step)
    sched.step()
    assert group["lr"] is lr and lr.item() == pytest.approx(0.05)  # the tensor a graph would read


def test_graph_step_copies_an_assigned_lr_into_the_captured_tensor() -> None:
    # timm's schedulers assign a float: the step puts the value into the tensor and the tensor back
    step = CUDAGraphStep(lambda x: x.sum(), _adamw())
    group = step.optimizer.param_groups[0]
    lr = group["lr"]
    group["lr"] = 0.25
    step._sync_lrs()
    assert group["lr"] is lr and lr.item() == 0.25


def test_make_capturable_refuses_optimizers_without_capture_support() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="SGD has no 'capturable' option"):
        make_capturable(sgd)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"warmup_steps": 0}, "warmup_steps must be an int >= 1, got 0"),
     ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0 or None, got 0.0")],
)  # fmt: skip
def test_graph_step_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CUDAGraphStep(lambda x: x.sum(), _adamw(), **kwargs)


def test_graph_step_refuses_cpu_batches_by_name() -> None:
    step = CUDAGraphStep(lambda x: x.sum(), _adamw())
    with pytest.raises(ValueError, match="takes a batch of CUDA tensors.*got: cpu"):
        step(torch.zeros(2))
    with pytest.raises(ValueError, match="got: no arguments"):
        step()
    assert step.steps == 0 and not step.captured


def _simulate_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the models see a CUDA graph capture on the CPU, and fail on any value read back to the host
    (``bool(t)``, ``int(t)``) until ``monkeypatch.undo()``."""
    capturing = lambda t: True  # noqa: E731
    monkeypatch.setattr(_checks, "capturing", capturing)
    monkeypatch.setattr(modeling_gmlp, "capturing", capturing)

    def no_host_read(self: torch.Tensor) -> bool:
        raise AssertionError("a host read while capturing")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_host_read)
    monkeypatch.setattr(torch.Tensor, "__int__", no_host_read)


def test_mlm_skips_host_reads_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under capture (simulated on the CPU) the MLM reads no value back to the host (no ``.any()``/
    ``.all()``, no boolean indexing of the sparse prediction) and its loss equals the eager one."""
    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=12, sparse_prediction=True)  # fmt: skip
    model = GMLPForMaskedLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    labels = torch.where(torch.rand(2, 12) < 0.5, ids, -100)
    labels[0, 9:] = -100
    labels[1, 0] = ids[1, 0]
    eager = model(input_ids=ids, attention_mask=mask, labels=labels)
    _simulate_capture(monkeypatch)
    graphed = model(input_ids=ids, attention_mask=mask, labels=labels)
    monkeypatch.undo()
    assert graphed.logits.shape == (2, 12, 50)  # dense logits: no data-dependent shape
    torch.testing.assert_close(graphed.loss, eager.loss)
    torch.testing.assert_close(graphed.logits[labels != -100], eager.logits)


def test_static_sparse_prediction_runs_sparse_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``max_predictions_per_seq`` the sparse decoder stays sparse under (simulated) capture, with no
    host read; its loss equals the eager one, and a batch whose labels do not fit gives NaN."""
    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=12, sparse_prediction=True,
                     max_predictions_per_seq=5)  # fmt: skip
    model = GMLPForMaskedLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.full((2, 12), -100)
    labels[0, [1, 4, 7]] = ids[0, [1, 4, 7]]
    labels[1, :5] = ids[1, :5]
    eager = model(input_ids=ids, labels=labels)
    _simulate_capture(monkeypatch)
    graphed = model(input_ids=ids, labels=labels)
    labels[1, 5] = ids[1, 5]  # 6 labelled tokens in sequence 1: one would be left out
    overflowing = model(input_ids=ids, labels=labels)
    monkeypatch.undo()
    assert graphed.logits.shape == (2 * 5, 50)  # sparse, and the same shape for every batch
    torch.testing.assert_close(graphed.loss, eager.loss)
    torch.testing.assert_close(graphed.logits, eager.logits)
    assert torch.isnan(overflowing.loss)


def test_graph_inference_errors() -> None:
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1, got 0"):
        CUDAGraphInference(lambda x: x, warmup_steps=0)
    forward = CUDAGraphInference(lambda x: x)
    with pytest.raises(ValueError, match="CUDAGraphInference takes a batch of CUDA tensors.*got: cpu, int"):
        forward(torch.zeros(2), 3)
    assert not forward.captured


def test_capturing_is_not_queried_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo cannot trace ``torch.cuda.is_current_stream_capturing`` (a graph break on CUDA, which the
    CPU compile tests never reach): under compile the check answers False without asking."""
    cuda_like = SimpleNamespace(is_cuda=True)

    def asked() -> bool:
        raise AssertionError("is_current_stream_capturing queried under torch.compile")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", asked)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _checks.capturing(cuda_like)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _checks.capturing(cuda_like)  # type: ignore[arg-type]
    assert not _checks.host_checks_enabled(cuda_like)  # type: ignore[arg-type]


def _scheduled_lrs(make_scheduler: object, graphed: bool) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    step = CUDAGraphStep(lambda x: x.sum(), opt) if graphed else None
    scheduler = make_scheduler(opt)  # type: ignore[operator]
    lrs = []
    for t in range(8):
        scheduler.step_update(t)
        if step is not None:
            step._sync_lrs()  # what each call does before its eager step or its replay
        lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_timm_scheduler_made_after_the_graph_step_follows_its_schedule(kind: str) -> None:
    # timm's schedulers keep the object in group["lr"] as their base value: that was the tensor each scheduled
    # value is copied into, so the schedule compounded (cosine: 0.47 instead of 0.85 right after warm-up)
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    def make(opt: torch.optim.Optimizer) -> object:
        if kind == "cosine":
            return CosineLRScheduler(opt, t_initial=8, lr_min=0.0, warmup_t=2, warmup_lr_init=0.1,
                                     t_in_epochs=False)
        return StepLRScheduler(opt, decay_t=2, decay_rate=0.5, t_in_epochs=False)

    assert _scheduled_lrs(make, graphed=True) == pytest.approx(_scheduled_lrs(make, graphed=False), rel=1e-6)


def test_graph_step_refuses_settings_it_would_freeze() -> None:
    # a replay keeps the captured betas / weight decay (only the lr is a live tensor): a schedule of betas
    # (OneCycleLR's cycle_momentum) silently did nothing after the capture
    from gmlp.train import cuda_graph

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0, betas=(0.9, 0.99))
    step = CUDAGraphStep(lambda x: x.sum(), opt)
    opt.param_groups[0]["betas"] = (0.8, 0.99)  # before the capture: eager steps read it, fine
    step._sync_lrs()
    step._settings = cuda_graph._settings(opt.param_groups)  # what the capture records
    opt.param_groups[0]["lr"] = 0.5  # the lr stays live
    step._sync_lrs()
    assert float(opt.param_groups[0]["lr"]) == 0.5
    opt.param_groups[0]["betas"] = (0.85, 0.99)
    opt.param_groups[0]["weight_decay"] = 0.0
    with pytest.raises(RuntimeError, match=r"settings \['betas', 'weight_decay'\] changed after the CUDA"):
        step._sync_lrs()
    opt.param_groups[0]["betas"], opt.param_groups[0]["weight_decay"] = (0.8, 0.99), 0.01
    step._sync_lrs()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(RuntimeError, match=r"has 2 parameter groups, but had 1 when this CUDAGraphStep"):
        step._sync_lrs()


def _eager_adamw_state() -> dict:
    """The state of a plain (not capturable) AdamW after one step, as a run without graphs saves it."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.25, weight_decay=0.0)
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


def test_optimizer_state_loaded_before_the_capture_is_made_capturable_again() -> None:
    """``optimizer.load_state_dict`` (a resume) after the step was made put back the saved groups, with
    ``capturable=False``: the warm-up ran uncapturable and a foreach AdamW's capture failed (its update reads
    the step count back with ``.item()``) as if the loss synchronised with the host. Before the capture the
    loaded state is now made capturable, its lr the tensor the graph reads."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.5, weight_decay=0.0)
    step = CUDAGraphStep(lambda x: x.sum(), opt)
    opt.load_state_dict(_eager_adamw_state())
    assert opt.param_groups[0]["capturable"] is False  # what torch does
    step._sync_lrs()  # what each call does first
    group = opt.param_groups[0]
    assert group["capturable"] is True
    assert isinstance(group["lr"], torch.Tensor) and group["lr"] is step._lrs[0]
    assert group["lr"].item() == 0.25  # the loaded lr
    assert opt.state[group["params"][0]]["step"].item() == 1.0  # the loaded moments and count are kept
    group["lr"] = 0.125  # a scheduler's value still reaches the tensor the graph will read
    step._sync_lrs()
    assert group["lr"] is step._lrs[0] and step._lrs[0].item() == 0.125


def test_optimizer_state_loaded_after_the_capture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the capture the graph updates the state tensors it captured: a loaded state (here one saved by
    a graphed run, whose settings are the same) was silently never used, nor saved again."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.5, weight_decay=0.0)
    step = CUDAGraphStep(lambda x: x.sum(), opt)
    graphed_state = make_capturable(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.5,
                                                      weight_decay=0.0)).state_dict()
    monkeypatch.setattr(step, "graph", object())  # captured (simulated)
    step._settings = _settings_of(opt)
    step._sync_lrs()  # nothing changed: fine
    opt.load_state_dict(graphed_state)
    with pytest.raises(RuntimeError, match=r"optimizer's state was replaced \(optimizer.load_state_dict\?\) "
                                           r"after the CUDA graph was captured.*the first 3 calls are eager"):
        step._sync_lrs()


def _settings_of(opt: torch.optim.Optimizer) -> list[dict]:
    from gmlp.train import cuda_graph

    return cuda_graph._settings(opt.param_groups)

"""A whole training step (forward, loss, backward, optimizer update) captured once as a CUDA graph.

A deep gMLP at a small batch, such as the 48-block gMLP-base MLM at batch 32, is bound by the host: the
GPU finishes each of the thousands of small kernels of a step before Python and the dispatcher have issued
the next one (benchmarks/RESULTS.md, sixth session: the device was busy 1.2-1.9 ms of a 3.1-4.1 ms MLM
block). A CUDA graph replays the whole step with one launch, so the step takes the device time alone.

    step = CUDAGraphStep(lambda x, y: F.cross_entropy(model(x), y), optimizer)
    for x, y in loader:               # every batch of the same shape and dtype
        loss = step(x, y)             # a real optimizer step, also the warm-up steps

The first ``warmup_steps`` calls run eagerly (on a side stream, as capture requires); the next call
captures the step and replays it, and every later call copies its batch into the captured input buffers
and replays. Each call is exactly one optimizer step on its own batch: nothing runs twice.

Tested in one process on one GPU (``benchmarks/gpu_checks.py``); DDP/FSDP inside a captured step and
gradient accumulation over several micro-batches are not supported.

Requirements (checked, each with a clear error): CUDA tensors of a fixed shape and dtype, an optimizer
whose parameter groups can be captured (``capturable=True``; :func:`make_capturable` switches it on and
turns the learning rates into device tensors, so that a scheduler's changes reach the replays), and a
step with no host synchronisation (``.item()``, boolean indexing). The gMLP models skip their
data-dependent input checks while a graph is being captured, and the blocks take the fused gating kernels
(under a graph the host's launch cost, which made the split kernel faster at small sizes, is gone).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..kernels.sgu_triton import _prefer_fused_on_stream, prefer_fused_gating

__all__ = ["CUDAGraphInference", "CUDAGraphStep", "make_capturable"]


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Prepare ``optimizer`` (in place) for capture: ``capturable=True`` in every group and each float
    learning rate replaced by a one-element tensor on its parameters' device (a replay reads the tensor, so
    ``param_group["lr"]`` changes made by a torch or timm scheduler take effect; a float would stay frozen
    at its value at capture). Each group also gets an ``initial_lr`` (a copy of its lr) unless it has one,
    so that a scheduler created after this call schedules from that value, not from the tensor the graph
    reads. A ``step`` count already in the optimizer's state (one loaded from a run without capture) is
    moved to its parameter's device, where a capturable update reads it. Returns the optimizer.

    Raises:
        ValueError: the optimizer has no ``capturable`` option (e.g. SGD with momentum in old torch).
    """
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(
                f"optimizer {type(optimizer).__name__} has no 'capturable' option, so its step cannot be "
                "captured in a CUDA graph; use torch.optim.AdamW (fused=True or foreach=True)"
            )
        group["capturable"] = True
        lr = group["lr"]
        # a scheduler made after this call takes its base value from "initial_lr", which timm's set to the
        # object in "lr" itself: without a copy of its own, its base would be the tensor each scheduled value
        # is copied into (CUDAGraphStep), and the schedule would compound (the cosine scaling the last lr)
        group.setdefault("initial_lr", lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr))
        if not isinstance(lr, torch.Tensor):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        for p in group["params"]:  # as load_state_dict places it for a capturable group
            state = optimizer.state.get(p)
            count = state.get("step") if state else None
            if isinstance(count, torch.Tensor) and count.device != p.device:
                state["step"] = count.to(device=p.device, dtype=torch.float32)  # type: ignore[index]
    return optimizer


_CAPTURE_FAILED = (
    "capturing the {what} as a CUDA graph failed (the original error is chained below). A captured step must "
    "not synchronise with the host: no .item()/.tolist()/print of tensors, no boolean-mask indexing or "
    "other data-dependent shapes, no CPU tensors created from GPU values. Nor may it launch a kernel that "
    "the warm-up calls did not (a Triton kernel is compiled and loaded at its first launch, which a capture "
    "refuses: 'operation not permitted when stream is capturing'): the warm-up calls must take the code "
    "paths of the captured one (the same masks, options and shapes)"
)


def _describe(batch: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in batch)


class _Graphed:
    """What both graphed callables share: eager warm-up calls on a side stream, the capture, the replay,
    and the checks on each batch (CUDA tensors; once captured, the captured shapes, dtypes, devices)."""

    def __init__(self, warmup_steps: int) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        """Whether the call has been captured (later calls replay it)."""
        return self.graph is not None

    def _check(self, batch: tuple[torch.Tensor, ...]) -> None:
        who = type(self).__name__
        if not batch or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in batch):
            kinds = ", ".join(
                f"{t.device}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch
            )
            raise ValueError(
                f"{who} takes a batch of CUDA tensors (CUDA graphs exist only on CUDA), got: "
                f"{kinds or 'no arguments'}"
            )
        if self.graph is not None:
            captured = self._inputs
            same = len(batch) == len(captured) and all(
                t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
                for t, s in zip(batch, captured, strict=False)
            )
            if not same:
                raise ValueError(
                    f"a captured {who} replays fixed shapes: expected a batch of {_describe(captured)}, got "
                    f"{_describe(batch)} (drop the last partial batch, e.g. DataLoader(drop_last=True), or "
                    "pad it)"
                )

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The warm-up and capture stream, made to wait for the work queued so far."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._stream

    def _eager(self, body: Callable[[tuple[torch.Tensor, ...]], Any], batch: tuple[torch.Tensor, ...]) -> Any:
        """A warm-up call: ``body(batch)`` on the side stream (as capture requires), then back in order. The
        stream prefers the fused gating in every thread, as the capture does: autograd runs the backward (and
        a checkpointed block's recomputed forward) in its device thread, outside the caller's
        :func:`prefer_fused_gating`."""
        stream = self._side_stream(batch[0].device)
        with torch.cuda.stream(stream), _prefer_fused_on_stream(stream):
            out = body(batch)
        torch.cuda.current_stream().wait_stream(self._stream)  # type: ignore[arg-type]
        return out

    def _capture(
        self,
        body: Callable[[tuple[torch.Tensor, ...]], Any],
        what: str,
        stream: torch.cuda.Stream | None = None,
    ) -> Any:
        """Capture ``body`` on the input buffers (``self._inputs``), then replay it once (capture records
        without running); returns what ``body`` returned, the graph's output buffers."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                out = body(self._inputs)
        except RuntimeError as err:
            raise RuntimeError(_CAPTURE_FAILED.format(what=what)) from err
        self.graph = graph
        graph.replay()
        return out

    def _replay(self, batch: tuple[torch.Tensor, ...]) -> None:
        for static, t in zip(self._inputs, batch, strict=True):
            static.copy_(t, non_blocking=True)
        self.graph.replay()  # type: ignore[union-attr]


def _settings(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each parameter group's settings that a captured step freezes: all but its parameters and the
    learning rate (and ``initial_lr``, a scheduler's bookkeeping)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]


def _changed_settings(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """The names of the settings that differ between ``before`` and ``now`` (a tensor counts as unchanged
    only if it is the same tensor: one filled in place is read by the graph anyway)."""

    def same(a: object, b: object) -> bool:
        if a is b:
            return True
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return bool(a == b)

    missing = object()
    return sorted(
        {k for old, new in zip(before, now, strict=True) for k in old.keys() | new.keys()
         if not same(old.get(k, missing), new.get(k, missing))}
    )  # fmt: skip


class CUDAGraphStep(_Graphed):
    """One training step, captured as a CUDA graph after ``warmup_steps`` eager steps, then replayed.

    Args:
        loss_fn: ``loss_fn(*batch) -> loss``: the forward and the loss (with autocast inside, if wanted),
            a scalar tensor. It must not synchronise with the host.
        optimizer: the optimizer of the parameters ``loss_fn`` trains; made capturable with
            :func:`make_capturable` (in place).
        warmup_steps: eager steps before the capture (at least 1: the first step allocates the optimizer
            state, compiles the Triton kernels and picks the cuBLAS algorithms).
        max_grad_norm: clip the gradient norm to this before the update (None = no clipping); the norm is
            computed on the device, as part of the graph.

    Calling it with a batch (CUDA tensors, the same shapes and dtypes at every call) runs one optimizer
    step and returns the loss, a new one-element tensor (not the captured buffer, which the next replay
    overwrites).
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int = 3,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(warmup_steps)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.loss_fn = loss_fn
        self.optimizer = make_capturable(optimizer)
        self._lrs = [group["lr"] for group in optimizer.param_groups]
        # load_state_dict() puts new group dicts (capturable as saved: often False) and new state tensors in
        # place of these: before the capture they are made capturable again, after it the change is refused
        self._groups = optimizer.param_groups
        self._state = optimizer.state
        self.max_grad_norm = max_grad_norm
        self.steps = 0
        self._loss: torch.Tensor | None = None
        self._settings: list[dict[str, Any]] | None = None  # the groups' other settings, from the capture

    def _sync_lrs(self) -> None:
        """Keep each group's learning rate in the tensor the graph reads: a scheduler that assigns a new
        value (timm's do; torch's fill the tensor in place) has it copied in and the tensor put back.

        An optimizer state loaded (``optimizer.load_state_dict``) before the capture is made capturable
        again, as :func:`make_capturable` made the one it replaced.

        Raises:
            RuntimeError: a parameter group was added or removed since this step was made, or, after the
                capture, the optimizer state was replaced (``load_state_dict``) or a setting other than the
                learning rate (betas, weight decay, eps, ...) changed: the replays would silently keep
                updating the captured state with the captured values.
        """
        opt = self.optimizer
        if opt.param_groups is not self._groups or opt.state is not self._state:
            if self.graph is not None:
                raise RuntimeError(
                    "the optimizer's state was replaced (optimizer.load_state_dict?) after the CUDA graph "
                    "was captured; the replays would go on updating the captured moments and step counts, "
                    f"not the loaded ones: load it before the capture (the first {self.warmup_steps} calls "
                    "are eager), or make a new CUDAGraphStep"
                )
            make_capturable(opt)  # (the loaded groups say capturable=False unless saved by a graphed run)
            self._groups, self._state = opt.param_groups, opt.state
            if len(self._groups) == len(self._lrs):
                self._lrs = [group["lr"] for group in self._groups]
        groups = opt.param_groups
        if len(groups) != len(self._lrs):
            raise RuntimeError(
                f"the optimizer has {len(groups)} parameter groups, but had {len(self._lrs)} when this "
                "CUDAGraphStep was made: make a new CUDAGraphStep after add_param_group"
            )
        changed = [] if self._settings is None else _changed_settings(self._settings, _settings(groups))
        if changed:
            raise RuntimeError(
                f"optimizer settings {changed} changed after the CUDA graph was captured; the graph keeps "
                "their captured values (only the learning rate stays live): make a new CUDAGraphStep, or "
                "use the eager step for schedules of other settings (e.g. OneCycleLR's cycle_momentum)"
            )
        for group, lr in zip(groups, self._lrs, strict=True):
            value = group["lr"]
            if value is not lr:
                if isinstance(value, torch.Tensor):
                    lr.copy_(value)
                else:
                    lr.fill_(float(value))
                group["lr"] = lr

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a one-element loss tensor, got {got}")
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on ``batch``; returns its loss."""
        self._check(batch)
        self._sync_lrs()
        if self.graph is not None:
            self._replay(batch)
        else:
            with warnings.catch_warnings(), prefer_fused_gating():
                # capturable=True warns when it runs uncaptured: expected for the warm-up steps
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                if self.steps < self.warmup_steps:
                    loss = self._eager(self._step, batch)
                    loss.record_stream(torch.cuda.current_stream())
                    self.steps += 1
                    return loss
                stream = self._side_stream(batch[0].device)
                self._inputs = tuple(t.clone() for t in batch)
                torch.cuda.current_stream().wait_stream(stream)
                self.optimizer.zero_grad(set_to_none=True)
                self._settings = _settings(self.optimizer.param_groups)
                self._loss = self._capture(self._step, "training step", stream)
        self.steps += 1
        return self._loss.clone()  # type: ignore[union-attr]


class CUDAGraphInference(_Graphed):
    """``fn(*batch)`` without gradients, captured as a CUDA graph after ``warmup_steps`` eager calls, then
    replayed: inference at a fixed batch shape with one launch per call.

    Args:
        fn: the forward (with autocast inside, if wanted); returns a tensor or a structure of tensors.
        warmup_steps: eager calls before the capture (at least 1).

    Calling it with a batch (CUDA tensors, fixed shapes and dtypes) returns ``fn``'s output. After the
    capture that output is the graph's own buffers, overwritten by the next call: copy what you keep.
    """

    def __init__(self, fn: Callable[..., object], *, warmup_steps: int = 2) -> None:
        super().__init__(warmup_steps)
        self.fn = fn
        self.calls = 0
        self._output: object = None

    @torch.no_grad()
    def __call__(self, *batch: torch.Tensor) -> object:
        """``fn(*batch)``; see the class notes on the returned buffers."""
        self._check(batch)
        self.calls += 1
        if self.graph is not None:
            self._replay(batch)
            return self._output
        run = lambda inputs: self.fn(*inputs)  # noqa: E731
        with prefer_fused_gating():
            if self.calls <= self.warmup_steps:
                return self._eager(run, batch)
            self._inputs = tuple(t.clone() for t in batch)
            self._output = self._capture(run, "forward")
        return self._output

"""Host read-backs per training and inference step, pinned.

On a GPU every read of a tensor's values on the host (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``torch.equal``, printing) and every data-dependent shape
(``nonzero``, boolean-mask indexing, ``unique``, ...) waits for the device: the CPU stops queuing work and
the GPU runs dry. The models and loops read some values back on purpose (input checks, skipping the padding
work, the non-finite stop), merged into as few read-backs as possible. These tests count, on the CPU, what a
GPU would have to wait for, so that a new read-back in a hot path fails a test instead of showing up as a
slower step.

:func:`host_reads` counts: a ``TorchDispatchMode`` sees the aten ops that read values back
(``_local_scalar_dense``, behind ``item``/``bool``/``int``/``float``/``__index__``; ``equal``; ``nonzero``;
boolean-mask ``index``/``index_put``; ...), and ``Tensor.tolist``/``cpu``/``numpy``, which on a CPU tensor
dispatch nothing, are wrapped. (A dispatch mode sends the blocks down the plain-op path instead of the CPU
oneDNN kernels: the plain path is what runs on a GPU without Triton, and the oneDNN path is CPU-only.) The
loops run as on a GPU (their read-every-step switch for the CPU turned off); what they do with the CPU
batches before moving them to the device (data preparation, counting tokens) and the evaluation are not
counted.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gmlp
from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    modeling_gmlp,
)

# -- the counter ---------------------------------------------------------------------------------------------

#: aten ops that read values back to the host (a scalar, a comparison's result, or a data-dependent size)
_READ_OPS = frozenset({
    "_local_scalar_dense", "equal", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc", "_assert_async",
})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_SRC = "/src/gmlp/"


class HostReads(TorchDispatchMode):
    """The host read-backs seen while active, each as ``(kind, where, step)``: ``where`` is the innermost
    ``file:line function`` in gmlp's sources (else in any file outside torch), ``step`` what :attr:`step`
    was. Nothing is recorded while :meth:`paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int]] = []
        self.step = -1
        self._paused = 0

    def record(self, kind: str) -> None:
        if self._paused:
            return
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if _SRC in f.filename]
        others = [f for f in frames if "/torch/" not in f.filename and f.filename != __file__]
        frame = (ours or others or frames)[-1]
        where = f"{frame.filename.rsplit(_SRC, 1)[-1]}:{frame.lineno} {frame.name}"
        self.events.append((kind, where, self.step))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def count(self, step: int | None = None) -> int:
        """Read-backs (of ``step``, or all)."""
        return sum(1 for e in self.events if step is None or e[2] == step)

    def report(self, step: int | None = None) -> str:
        seen = Counter((kind, where) for kind, where, s in self.events if step is None or s == step)
        return "\n".join(f"  {n} x {kind} at {where}" for (kind, where), n in seen.items()) or "  none"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _READ_OPS:
            self.record(name)
        elif name in _INDEX_OPS and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()
        ):
            self.record(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads() -> Iterator[HostReads]:
    """Count host read-backs inside the block (see the module docstring)."""
    reads = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.record(name)
            return method(self, *args, **kwargs)

        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        with reads:
            yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def _bool_setitem(t: torch.Tensor) -> None:
    t[t > 0] = 0.0


@pytest.mark.parametrize(
    ("read", "n"),
    [(lambda t: t[0].item(), 1), (lambda t: bool(t[0] > 0), 1), (lambda t: int(t[0]), 1),
     (lambda t: float(t[0]), 1), (lambda t: [0, 1][t.long()[0].clamp(0, 1)], 1), (lambda t: t.tolist(), 1),
     (lambda t: t.cpu(), 1), (lambda t: t.numpy(), 1), (lambda t: torch.equal(t, t), 1),
     (lambda t: t.nonzero(), 1), (lambda t: t[t > 0], 1), (_bool_setitem, 1), (lambda t: t.unique(), 1),
     (lambda t: (t * 2).sum(0).exp(), 0), (lambda t: t.masked_fill(t > 0, 0.0).any(), 0)],
    ids=["item", "bool", "int", "float", "index", "tolist", "cpu", "numpy", "equal", "nonzero",
         "bool_getitem", "bool_setitem", "unique", "arithmetic", "masked_fill_any"],
)
def test_the_counter_sees_each_kind_of_read_back_once(read: Callable[[torch.Tensor], Any], n: int) -> None:
    t = torch.randn(4)
    with host_reads() as reads:
        read(t)
    assert reads.count() == n, reads.report()


# -- the models: one training step and one inference forward -------------------------------------------------

B, N, VOCAB = 2, 8, 50


def _config(**overrides: Any) -> GMLPConfig:
    return GMLPConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      max_position_embeddings=N, **overrides)


def _masks() -> dict[str, torch.Tensor | None]:
    full = torch.ones(B, N, dtype=torch.long)
    right, left, inner = full.clone(), full.clone(), full.clone()
    right[0, 6:] = 0
    left[0, :2] = 0
    inner[0, 3] = 0
    return {"none": None, "all_real": full, "right": right, "left": left, "inner": inner}


_IDS = torch.randint(5, VOCAB, (B, N), generator=torch.Generator().manual_seed(0))
_LABELS = _IDS.masked_fill(torch.arange(N) % 2 == 0, -100)  # 4 labelled tokens per row

# name: (model factory, inputs without the mask, read-backs of a training step, of an inference forward)
#   the input checks (ids, mask values, token types, the mask's layout): 1 read-back, in every forward
#   token labels (range), before the model runs: 1
#   exact sparse prediction (the labelled rows: a data-dependent shape): 1
#   max_predictions_per_seq (a row's labelled tokens counted): 1
#   QA targets (range), after the model: 1; sequence-classification labels (range), before the model: 1
_CASES: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, torch.Tensor], int, int]] = {
    "mlm": (lambda: GMLPForMaskedLM(_config()), {"labels": _LABELS}, 2, 1),
    "mlm_sparse": (lambda: GMLPForMaskedLM(_config(sparse_prediction=True)), {"labels": _LABELS}, 3, 1),
    "mlm_sparse_per_seq": (
        lambda: GMLPForMaskedLM(_config(sparse_prediction=True, max_predictions_per_seq=4)),
        {"labels": _LABELS}, 3, 1,
    ),
    "mlm_token_types": (
        lambda: GMLPForMaskedLM(_config()),
        {"labels": _LABELS, "token_type_ids": (torch.arange(N) >= 4).long().expand(B, N)}, 2, 1,
    ),
    "amlp_mlm": (lambda: GMLPForMaskedLM(_config(tiny_attn_size=8)), {"labels": _LABELS}, 2, 1),
    "causal_lm": (lambda: GMLPForCausalLM(_config(causal=True)), {"labels": _IDS}, 2, 1),
    "sequence_classification": (lambda: GMLPForSequenceClassification(_config(num_labels=3)),
                                {"labels": torch.tensor([0, 2])}, 2, 1),
    "multi_label": (lambda: GMLPForSequenceClassification(_config(num_labels=3)),
                    {"labels": torch.tensor([[0.0, 1, 1], [1, 0, 0]])}, 2, 1),
    "regression": (lambda: GMLPForSequenceClassification(_config(num_labels=1)),
                   {"labels": torch.tensor([0.5, 2.0])}, 1, 1),
    "token_classification": (lambda: GMLPForTokenClassification(_config(num_labels=3)),
                             {"labels": _LABELS.clamp(max=2)}, 2, 1),
    "question_answering": (
        lambda: GMLPForQuestionAnswering(_config()),
        {"start_positions": torch.tensor([4, 4]), "end_positions": torch.tensor([5, 9])}, 2, 1,
    ),
}
_TARGETS = ("labels", "start_positions", "end_positions")


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize("case", list(_CASES))
def test_text_model_step_and_inference_read_backs(case: str, mask: str) -> None:
    """Forward, backward and a (fused, as the loops use) AdamW step, then an inference forward: the pinned
    number of read-backs, whatever the padding (none, all real, right, left, inner)."""
    factory, inputs, train_reads, inference_reads = _CASES[case]
    model = factory()
    inputs = {"input_ids": _IDS, **inputs}
    if _masks()[mask] is not None:
        inputs["attention_mask"] = _masks()[mask]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with host_reads() as reads:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert reads.count() == train_reads, f"{case}, {mask} padding: a training step\n{reads.report()}"
    model.eval()
    with torch.no_grad(), host_reads() as reads:
        model(**{k: v for k, v in inputs.items() if k not in _TARGETS})
    assert reads.count() == inference_reads, f"{case}, {mask} padding: inference\n{reads.report()}"


@pytest.mark.parametrize("case", list(_CASES))
def test_text_models_read_nothing_back_without_host_checks(case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where nothing may be read back (a CUDA graph being captured, torch.compile tracing) the text models
    read nothing back: a left-padded training step as ``host_checks_enabled`` and ``capturing`` say
    during a capture."""
    monkeypatch.setattr(modeling_gmlp, "host_checks_enabled", lambda t: False)
    monkeypatch.setattr(modeling_gmlp, "capturing", lambda t: True)
    factory, inputs, _, _ = _CASES[case]
    model = factory()
    with host_reads() as reads:
        out = model(input_ids=_IDS, attention_mask=_masks()["left"], **inputs)
        out.loss.backward()
    assert reads.count() == 0, reads.report()


def test_vision_model_step_and_inference_read_nothing_back() -> None:
    model = gmlp.create_model("gmlp_micro4_28")
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with host_reads() as reads:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert reads.count() == 0, reads.report()
    model.eval()
    with torch.no_grad(), host_reads() as reads:
        model(x)
    assert reads.count() == 0, reads.report()


# -- behaviour of the merged read-backs ----------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["none", "right", "inner"])
def test_exact_sparse_prediction_matches_boolean_indexing_bit_for_bit(mask: str) -> None:
    """The labelled rows are found once (``nonzero``) and gathered with ``index_select``: the same logits,
    loss and gradients, bit for bit, as the decoder on ``hidden[labels != -100]``."""
    torch.manual_seed(0)
    model = GMLPForMaskedLM(_config(sparse_prediction=True))
    attention_mask = _masks()[mask]
    out = model(input_ids=_IDS, attention_mask=attention_mask, labels=_LABELS)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    labels = _LABELS if attention_mask is None else _LABELS.masked_fill(attention_mask == 0, -100)
    keep = labels != -100
    hidden = model.gmlp(input_ids=_IDS, attention_mask=attention_mask).last_hidden_state
    logits = modeling_gmlp.apply_linear(model.decoder, hidden[keep])
    loss = torch.nn.functional.cross_entropy(logits, labels[keep])
    loss.backward()
    assert torch.equal(out.logits, logits) and torch.equal(out.loss, loss)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


_PRIORITY = (
    "input_ids contains", "attention_mask must hold", "token_type_ids must be", "token_type_ids contains"
)


@given(bad=st.lists(st.booleans(), min_size=4, max_size=4))
def test_input_errors_keep_their_order_with_one_read_back(bad: list[bool]) -> None:
    """The value checks of ids, mask and token types are read back together; the error is still the first
    of: an id out of range, a mask value other than 0/1, token types of a bad shape, a type out of range."""
    model = GMLPForMaskedLM(_config())
    ids, mask = _IDS.clone(), torch.ones(B, N, dtype=torch.long)
    types = torch.zeros(B, N, dtype=torch.long)
    if bad[0]:
        ids[1, 2] = VOCAB
    if bad[1]:
        mask[0, 5] = 2
    if bad[3]:
        types[1, 1] = 2
    if bad[2]:
        types = types[:, :-1]
    raised = [b and not (i == 3 and bad[2]) for i, b in enumerate(bad)]  # (a type's range: of a good shape)
    expected = next((p for p, r in zip(_PRIORITY, raised, strict=True) if r), None)
    if expected is None:
        model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return
    with pytest.raises(ValueError, match=expected):
        model(input_ids=ids, attention_mask=mask, token_type_ids=types)


@given(start=st.lists(st.integers(-2, N + 1), min_size=B, max_size=B),
       end=st.lists(st.integers(-2, N + 1), min_size=B, max_size=B), padded=st.booleans())
def test_question_answering_position_errors_keep_their_order(start: list[int], end: list[int],
                                                              padded: bool) -> None:
    """Both position checks of both tensors are read back together; the error is still the first of:
    a negative start, a negative end, a start on padding, an end on padding (each naming its first row)."""
    model = GMLPForQuestionAnswering(_config())
    mask = _masks()["right"] if padded else None
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask.bool()
    expected = None
    for kind in ("negative", "padding"):
        for name, positions in (("start_positions", start), ("end_positions", end)):
            rows = [r for r, p in enumerate(positions)
                    if (p < 0 if kind == "negative" else 0 <= p < N and not real[r, p])]
            if rows and expected is None:
                expected = f"{name} of example {rows[0]} is {positions[rows[0]]}"
    call = dict(input_ids=_IDS, attention_mask=mask, start_positions=torch.tensor(start),
                end_positions=torch.tensor(end))
    if expected is None:
        model(**call)  # (NaN where every position is ignored, as in BERT)
        return
    with pytest.raises(ValueError, match=expected):
        model(**call)


# -- the training loops --------------------------------------------------------------------------------------

_SENTENCES = [
    "The whale swam past the ship and the sailors watched it go.",
    "Emma walked to the village with her father in the morning.",
    "A spatial gating unit mixes tokens with a learned matrix.",
    "Python functions take arguments and return values to callers.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gmlp.train.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok"
    docs = [" ".join(_SENTENCES[i:] + _SENTENCES[:i]) for i in range(len(_SENTENCES) * 2)]
    train_tokenizer(docs, vocab_size=120, model_max_length=16).save_pretrained(str(path))
    return path


@pytest.fixture
def text_loop_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[HostReads]]:
    """``_train_loop`` run as on a GPU (the flag read back only where it logs, evaluates or saves), with its
    read-backs counted per step; ``micro_batch``, the token and target counts (CPU batches) and the
    evaluation are not counted."""
    from gmlp.train import text

    monkeypatch.setattr(text, "_reads_each_step", lambda device: False)
    real_loop = text._train_loop
    reads_of_run: list[HostReads] = []

    def loop(**kwargs: Any) -> Any:
        with host_reads() as reads:
            reads_of_run.append(reads)

            def uncounted(fn: Callable[..., Any] | None, marks_step: bool = False) -> Any:
                if fn is None:
                    return None

                def call(*args: Any, **kw: Any) -> Any:
                    if marks_step and args[1] == 0:  # micro_batch(step, 0): the step begins
                        reads.step = args[0]
                    with reads.paused():
                        return fn(*args, **kw)

                return call

            for name in ("tokens_per_batch", "targets_per_batch", "evaluate"):
                kwargs[name] = uncounted(kwargs.get(name))
            kwargs["micro_batch"] = uncounted(kwargs["micro_batch"], marks_step=True)
            return real_loop(**kwargs)

    monkeypatch.setattr(text, "_train_loop", loop)
    yield reads_of_run


_TEXT = dict(arch="gmlp", layers=1, hidden=16, ffn=32, seq_len=16, batch_size=2, progress=False, device="cpu",
             save_every=0)
#: the last step: the non-finite flag (read once though it logs and saves), the logged mean loss, and the
#: save's finite-weights check and loss window
_LAST_STEP = 4


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_pretrain_loop_read_backs_per_step(tmp_path: Path, tokenizer_dir: Path,
                                           text_loop_reads: list[HostReads], grad_accum: int) -> None:
    """``gmlp pretrain`` (sparse prediction, padded blocks): per micro-batch the labels' range, the input
    checks and the labelled rows (3); nothing else until the step that logs and saves."""
    from gmlp.train.text import PretrainConfig, pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(_SENTENCES[i:] + _SENTENCES[:i]) for i in range(4)))
    steps = 3
    pretrain(PretrainConfig(output=str(tmp_path / "run"), corpus=[str(corpus)], tokenizer=str(tokenizer_dir),
                            steps=steps, log_every=steps, eval_every=0, eval_batches=1, valid_fraction=0.2,
                            grad_accum=grad_accum, **_TEXT))
    (reads,) = text_loop_reads
    for step in range(steps):
        expected = 3 * grad_accum + (_LAST_STEP if step == steps - 1 else 0)
        assert reads.count(step) == expected, f"step {step}:\n{reads.report(step)}"


def test_finetune_loop_read_backs_per_step(tmp_path: Path, tokenizer_dir: Path,
                                           text_loop_reads: list[HostReads]) -> None:
    """``gmlp finetune`` (sentence classification, padded batches): the input checks and the labels'
    range (2) per step, one more (the non-finite flag) where it evaluates, the last step's where it logs
    and saves."""
    from gmlp.train.text import FinetuneConfig, finetune

    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(_SENTENCES * 2)))
    steps = 5
    finetune(FinetuneConfig(output=str(tmp_path / "ft"), train_file=str(data), validation_file=str(data),
                            steps=steps, log_every=steps, tokenizer=str(tokenizer_dir), **_TEXT))
    (reads,) = text_loop_reads
    evaluated = 3  # (8 sentences, batch 2: an epoch is 4 steps; the evaluation after the 4th)
    for step in range(steps):
        expected = 2 + (1 if step == evaluated else 0) + (_LAST_STEP if step == steps - 1 else 0)
        assert reads.count(step) == expected, f"step {step}:\n{reads.report(step)}"


@pytest.mark.parametrize("option", [{}, {"grad_clip": 1.0, "ema": True, "grad_accum_steps": 2}],
                         ids=["plain", "clip_ema_accum"])
def test_vision_loop_read_backs_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         option: dict[str, Any]) -> None:
    """``gmlp train`` as on a GPU: nothing read back in a step that does not log; one read-back (the
    pending losses and norms and the logged loss together) where it logs; at the epoch's end and checkpoint
    right after a logged step, only the weights' finite check more."""
    from gmlp.train import vision

    monkeypatch.setattr(vision, "_flush_losses_every_step", lambda device: False)
    cfg = dict(model="gmlp_micro4_28", dataset="digits", train_subset=64, test_subset=16, epochs=1,
               batch_size=16, eval_batch_size=16, workers=0, progress=False, plot=False, tensorboard=False,
               warmup_steps=0, augment=False, device="cpu", threads=1, log_every=2, **option)
    with host_reads() as reads:
        real_seed = vision.step_seed

        def step_seed(seed: int, step: int, *keys: Any) -> int:  # called once at the start of each step
            reads.step = step
            return real_seed(seed, step, *keys)

        def uncounted(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                with reads.paused():
                    return fn(*args, **kwargs)

            return call

        monkeypatch.setattr(vision, "step_seed", step_seed)
        monkeypatch.setattr(vision, "_evaluate_tensors", uncounted(vision._evaluate_tensors))
        vision.train_vision(vision.VisionTrainConfig(output=str(tmp_path / "run"), **cfg))
    steps = 4  # 64 images, batch 16
    for step in range(steps):
        expected = [0, 1, 0, 2][step]
        assert reads.count(step) == expected, f"step {step}:\n{reads.report(step)}"

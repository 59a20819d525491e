"""``gmlp pretrain`` under 2 processes (torchrun, gloo on the CPU): the stop request (SIGTERM / SIGINT, seen
by any process) travels with each step's target-count all-reduce, so a step does one collective and host
read, not two; a request heard there stops the run before the step does anything, at the step the signalled
process announced, and every process exits 130 (twenty-seventh session: both tests failed before, with 2
all-reduces a step, and process 0 exiting 0 without a word when the signal was process 1's).

One launch runs every scenario in the same two worker processes (a launch costs seconds of start-up), each
``gmlp pretrain`` call in turn: the uninterrupted run (counting the all-reduces of each step), a run whose
process 1 alone gets SIGTERM mid-step, a resume stopped the same way before its first step, and the resume to
the end, which must equal the uninterrupted run (weights bit for bit, metrics). The launch has a timeout after
which its whole process tree is killed, so a collective out of step fails the test instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import documents, write_corpus
from torchrun_helpers import launch

from gmlp.train import text as pipelines
from gmlp.train.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers: main thread only")

TIMEOUT = 150  # seconds for the launch; it takes ~10 s on 2 cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
STEPS = 6
# logs and evaluates after steps 3 and 6 only; no --save-every: the checkpoints are the stops' (and the end's)
ARGS = ["pretrain", "--arch", ARCH, "--layers", "2", "--hidden", "32", "--ffn", "64", "--seq-len", "32",
        "--no-progress", "--steps", str(STEPS), "--log-every", "3", "--eval-every", "3", "--eval-batches",
        "1", "--save-every", "0", "--valid-fraction", "0.2", "--batch-size", "2", "--grad-accum", "2",
        "--dropout", "0.1", "--keep-last", "5"]
STOPPED = "[gmlp] stopped at step {}/{} with a checkpoint; --resume continues the run"

# Each process: every all-reduce ("R"), where each step begins (its first micro-batch is read: the step) and
# where its first forward pass begins ("F" and the step), in order;
# process 1 SIGTERMs itself where a scenario says: in a step's forward ("dropout" seed: after the step's
# first collective) or as a step's data is read (before it).
WORKER = textwrap.dedent('''
    import json, os, signal, sys

    import torch.distributed as dist

    from gmlp.cli import main
    from gmlp.train import text as pipelines

    args, out = json.loads(sys.argv[1]), sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    events, kill = [], [None]  # kill: ("forward" | "data", step) of the scenario running

    real_all_reduce, real_offset, real_seed = dist.all_reduce, pipelines._micro_offset, pipelines.step_seed

    def all_reduce(*a, **kw):
        events.append("R")
        return real_all_reduce(*a, **kw)

    def micro_offset(opts, accelerator, step, micro):
        if micro == 0:
            events.append(step)
            if rank == 1 and kill[0] == ("data", step):
                os.kill(os.getpid(), signal.SIGTERM)
        return real_offset(opts, accelerator, step, micro)

    def step_seed(seed, *keys):  # ("dropout", step, 0, micro * world + rank)
        if keys[0] == "dropout" and keys[3] == rank:
            events.append(f"F{keys[1]}")  # (the step's first forward)
        if rank == 1 and keys[0] == "dropout" and kill[0] == ("forward", keys[1]) and keys[3] == world + 1:
            os.kill(os.getpid(), signal.SIGTERM)  # (mid-step: in its second micro-batch)
        return real_seed(seed, *keys)

    dist.all_reduce, pipelines._micro_offset, pipelines.step_seed = all_reduce, micro_offset, step_seed
    results = []
    for where, extra in args:
        events.clear()
        kill[0] = tuple(where) if where else None
        code = main(extra)
        results.append({"code": code, "events": list(events)})
        print(f"[worker {rank}] scenario done: exit {code}", file=sys.stderr, flush=True)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict]], str]:
    """The scenarios' run folder, each process's results (exit status and events of each scenario) and the
    launch's standard error."""
    root = tmp_path_factory.mktemp("text-stop")
    corpus = write_corpus(root / "corpus.txt")
    train_tokenizer(documents(), vocab_size=150, model_max_length=32).save_pretrained(str(root / "tok"))
    common = [*ARGS, "--corpus", str(corpus), "--tokenizer", str(root / "tok")]
    run, reference = root / "run", root / "reference"
    scenarios = [
        (None, [*common, "--output", str(reference)]),
        (["forward", 1], [*common, "--output", str(run)]),  # mid-log-window: the checkpoint of step 2
        (["data", 2], [*common, "--output", str(run), "--resume"]),  # before the resumed run's first step
        (["forward", 2], [*common, "--output", str(run), "--resume"]),  # in the step before a log/eval step
        (None, [*common, "--output", str(run), "--resume"]),
    ]
    (root / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "worker.py"), json.dumps(scenarios), str(root / "results")]
    code, out, err = launch(cmd, ENV, root, TIMEOUT)
    assert code == 0, f"exit {code}\n{out[-2000:]}\n--- stderr\n{err[-6000:]}"
    results = [json.loads((root / f"results.{rank}").read_text()) for rank in (0, 1)]
    return root, results, err


def _per_step(events: list) -> dict[int, int]:
    """The all-reduces from the start of each step (its data read) to the start of the next (or the end)."""
    counts: dict[int, int] = {}
    step = None
    for e in events:
        if e == "R":
            if step is not None:
                counts[step] += 1
        elif isinstance(e, int):
            step = e
            counts[step] = 0
    return counts


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")} for x in lines]


def test_one_all_reduce_per_plain_optimizer_step(launched: tuple[Path, list[list[dict]], str]) -> None:
    """Steps that neither log, evaluate nor save (ending at 1, 2, 4, 5) all-reduce once: the target count
    and the stop request together (there were two: the stop request again at the end of each step)."""
    _, results, _ = launched
    for rank in (0, 1):
        reference = results[rank][0]
        assert reference["code"] == 0
        counts = _per_step(reference["events"])
        assert list(counts) == list(range(STEPS))
        assert {s: counts[s] for s in (0, 1, 3, 4)} == {0: 1, 1: 1, 3: 1, 4: 1}, (rank, counts)


def test_sigterm_to_one_process_stops_both_at_its_step_and_the_resume_equals_the_uninterrupted_run(
    launched: tuple[Path, list[list[dict]], str],
) -> None:
    """Process 1 alone gets SIGTERM during step 2 (1-based): both processes stop after that step (not
    after the next one), before step 3 does anything; one checkpoint (of step 2), written by process 0; both
    exit 130, and process 0 says where it stopped (it said nothing, and exited 0, when the signal was
    another process's). A resume signalled before its first step stops at once: exit 130 and the same
    message, the checkpoint as it was; a resume signalled in the step before an evaluation stops after that
    evaluation; the last resume ends with the uninterrupted run's weights and metrics."""
    root, results, err = launched
    run = root / "run"
    codes = [[r["code"] for r in results[rank]] for rank in (0, 1)]
    assert codes == [[0, 130, 130, 130, 0]] * 2, (codes, err[-4000:])
    for rank in (0, 1):
        # the stopped runs did no work in the step that heard the request: its data read was their last
        marks = [[e for e in r["events"] if e != "R"] for r in results[rank][1:4]]
        assert marks == [[0, "F0", 1, "F1", 2], [2], [2, "F2", 3]], marks
    stops = [line for line in err.splitlines() if line.startswith("[gmlp] stopped")]
    assert stops == [STOPPED.format(s, STEPS) for s in (2, 2, 3)], err[-4000:]  # (process 0's lines)
    assert err.count("[gmlp] signal 15: stopping after this step") == 3  # (process 1's, one per stop)
    assert len(re.findall(r"\binterrupted\b", err)) == 6  # (both processes of each stop)
    # the stops' checkpoints and the end's (--keep-last keeps them all): step 2 once, for both stops at 2
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000003", "step-00000006"]
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (root / "reference", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records, expected = _records(run), _records(root / "reference")
    assert [(r["step"], r["split"]) for r in records] == [(3, "train"), (3, "validation"), (6, "train"),
                                                          (6, "validation")]
    for x, y in zip(records, expected, strict=True):
        # (the training-loss window a checkpoint keeps is the processes' float32 mean: its sum with the
        # steps after it is rounded otherwise than the uninterrupted run's, in the 7th digit)
        assert x == {k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v for k, v in y.items()}

"""Small-scale reproduction of the paper's language findings (Table 3 ordering, aMLP vs gMLP, finetuning).

CPU-sized: every model has the same depth, width, sequence length, tokenizer, data and step budget, and
(within 1.5%) the same number of parameters; the hidden width ``d_ffn`` of each variant is chosen to
match the SGU model's count. Runs one after the other through the ``gmlp`` CLI, then writes a markdown
table of what was measured.

    .venv/bin/python scripts/reproduce_text.py --steps 400 --out runs/repro_text --table docs/results_text.md

A run that exists in ``--out`` is reused (delete it to redo it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gmlp.cli import main as gmlp
from gmlp.models.text import GMLPConfig, GMLPForMaskedLM


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmlp_params(
    layers: int, hidden: int, ffn: int, seq: int, vocab: int, variant: str, attn: int | None
) -> int:
    cfg = GMLPConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        max_position_embeddings=seq,
        sgu_variant=variant,
        tiny_attn_size=attn,
    )
    with torch.device("meta"):
        return _params(GMLPForMaskedLM(cfg))


def bert_params(layers: int, hidden: int, ffn: int, seq: int, vocab: int) -> int:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=seq,
    )
    with torch.device("meta"):
        return _params(BertForMaskedLM(cfg))


def mpnet_params(layers: int, hidden: int, ffn: int, seq: int, vocab: int) -> int:
    """Parameters of ``--arch bert-relpos`` (Table 3's BERT + relative position bias: transformers' MPNet),
    built by the config the pipeline builds."""
    from transformers import MPNetForMaskedLM

    from gmlp.train.text import PretrainConfig, build_model_config

    opts = PretrainConfig(arch="bert-relpos", layers=layers, hidden=hidden, ffn=ffn, seq_len=seq)
    cfg = build_model_config(opts, vocab_size=vocab, special_ids={"pad": 0, "cls": 2, "sep": 3, "mask": 4})
    with torch.device("meta"):
        return _params(MPNetForMaskedLM(cfg))


def match_ffn(target: int, count, start: int) -> int:
    """The even d_ffn whose parameter count (``count(ffn)``) is closest to ``target``."""
    best = min(range(16, 4 * start, 2), key=lambda f: abs(count(f) - target))
    return best


def _final_ppl(run: Path) -> tuple[float, int]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in records if "perplexity" in r][-1]
    return float(last["perplexity"]), int(last["step"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--out", default="runs/repro_text")
    parser.add_argument("--table", default="docs/results_text.md")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        gmlp(
            [
                "tokenizer",
                "--output",
                str(tok),
                "--vocab-size",
                str(args.vocab_size),
                "--max-chars",
                "5000000",
            ]
        )
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok, trust_remote_code=False))
    L, d, n = args.layers, args.hidden, args.seq_len
    target = gmlp_params(L, d, args.ffn, n, vocab, "sgu", None)
    tiny = max(16, d // 4)
    runs: dict[str, list[str]] = {}
    facts: dict[str, dict] = {}
    # "mixer": Table 3's MLP-Mixer row (2-layer token MLP, hidden size = the sequence length, full W1/W2:
    # its ~2 n^2 spatial weights per layer are paid for with a smaller d_ffn)
    for variant in ("sgu", "multiplicative", "additive", "linear", "mixer"):
        ffn = (
            args.ffn
            if variant == "sgu"
            else match_ffn(target, lambda f, v=variant: gmlp_params(L, d, f, n, vocab, v, None), args.ffn)
        )
        runs[f"gmlp-{variant}"] = ["--arch", "gmlp", "--sgu-variant", variant, "--ffn", str(ffn)]
        facts[f"gmlp-{variant}"] = {"ffn": ffn, "params": gmlp_params(L, d, ffn, n, vocab, variant, None)}
    ffn_a = match_ffn(target, lambda f: gmlp_params(L, d, f, n, vocab, "sgu", tiny), args.ffn)
    runs["amlp"] = ["--arch", "amlp", "--tiny-attn", str(tiny), "--ffn", str(ffn_a)]
    facts["amlp"] = {"ffn": ffn_a, "params": gmlp_params(L, d, ffn_a, n, vocab, "sgu", tiny)}
    ffn_b = match_ffn(target, lambda f: bert_params(L, d, f, n, vocab), args.ffn)
    runs["bert"] = ["--arch", "bert", "--ffn", str(ffn_b)]
    facts["bert"] = {"ffn": ffn_b, "params": bert_params(L, d, ffn_b, n, vocab)}
    # Table 3's "BERT-base + relative position bias" (MPNet: BERT + a learned bucketed relative bias)
    ffn_r = match_ffn(target, lambda f: mpnet_params(L, d, f, n, vocab), args.ffn)
    runs["bert-relpos"] = ["--arch", "bert-relpos", "--ffn", str(ffn_r)]
    facts["bert-relpos"] = {"ffn": ffn_r, "params": mpnet_params(L, d, ffn_r, n, vocab)}
    only = set(args.only.split(",")) if args.only else None
    common = [
        "--layers",
        str(L),
        "--hidden",
        str(d),
        "--seq-len",
        str(n),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--tokenizer",
        str(tok),
        "--seed",
        "0",
        "--eval-every",
        str(max(50, args.steps // 4)),
        "--eval-batches",
        "40",
        "--no-progress",
        "--save-every",
        str(args.steps),
    ]
    for name, extra in runs.items():
        if only and name not in only:
            continue
        run = out / name
        if not (run / "final").is_dir():
            t0 = time.time()
            gmlp(["pretrain", "--output", str(run), "--overwrite", *common, *extra])
            facts[name]["seconds"] = time.time() - t0
            (run / "repro.json").write_text(json.dumps(facts[name]))
        saved = json.loads((run / "repro.json").read_text()) if (run / "repro.json").exists() else {}
        facts[name].update({k: v for k, v in saved.items() if k == "seconds"})
        facts[name]["ppl"], facts[name]["step"] = _final_ppl(run)
    for name in ("gmlp-sgu", "amlp", "bert", "bert-relpos"):
        if only and name not in only or "ppl" not in facts[name]:
            continue
        ft = out / f"finetune-{name}"
        if not (ft / "test_metrics.json").is_file():
            gmlp(
                [
                    "finetune",
                    "--model",
                    str(out / name / "final"),
                    "--output",
                    str(ft),
                    "--overwrite",
                    "--data",
                    "tweets",
                    "--steps",
                    str(args.finetune_steps),
                    "--lr",
                    "1e-4",
                    "--batch-size",
                    "32",
                    "--seq-len",
                    str(n),
                    "--seed",
                    "0",
                    "--no-progress",
                ]
            )
        facts[name]["finetune"] = json.loads((ft / "test_metrics.json").read_text())
    lines = [
        f"Pretraining: {L} layers, d_model {d}, seq {n}, batch {args.batch_size}, {args.steps} steps, "
        f"lr {args.lr}, WordPiece vocab {vocab} trained on the offline corpus; held-out MLM perplexity at "
        "the last evaluation.",
        "",
        "| model | d_ffn | params | held-out MLM ppl | pretrain s |",
        "|---|---|---|---|---|",
    ]
    for name, f in facts.items():
        if "ppl" in f:
            secs = f"{f['seconds']:.0f}" if "seconds" in f else "-"
            lines.append(f"| {name} | {f['ffn']} | {f['params']:,} | {f['ppl']:.2f} | {secs} |")
    fts = {k: v["finetune"] for k, v in facts.items() if "finetune" in v}
    if fts:
        lines += [
            "",
            f"Finetuning on the offline tweet sentiment set (3 classes), {args.finetune_steps} steps, "
            "test split:",
            "",
            "| pretrained model | test accuracy | test macro-F1 |",
            "|---|---|---|",
        ]
        for name, m in fts.items():
            lines.append(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
    table = "\n".join(lines) + "\n"
    Path(args.table).write_text(table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m megatron_llamapro.quickstart --out quickstart`: the whole LLaMA Pro pipeline on a laptop.

Nothing is downloaded. On a 2-core CPU (`--size tiny`, the default) it takes a few minutes:

1. generate a "general" (English-like prose) and a "domain" (arithmetic / small Python functions)
   corpus and train a LLaMA-like sentencepiece tokenizer on them;
2. ``python -m megatron_llamapro.cli.preprocess_data``: tokenize the base model's training mix, the
   domain training text and a general and a domain validation set into Megatron .bin/.idx files;
3. the base model: a randomly initialised tiny LLaMA (transformers), pretrained on the general text
   (with a little domain-like text) by ``python -m megatron_llamapro.pretrain --train-all`` and
   exported to HF with ``python -m megatron_llamapro.cli.convert_megatron_to_hf``, so the model that
   gets expanded is a real, trained model;
4. ``python -m megatron_llamapro.cli.convert_hf_to_megatron``: HF -> Megatron shards (TP1 PP2);
5. ``python -m megatron_llamapro.cli.expand_blocks``: add interleaved identity blocks (LLaMA Pro block
   expansion);
6. ``python -m megatron_llamapro.pretrain`` on 2 gloo processes: train only the new blocks on the
   domain text, evaluating general and domain validation loss as it goes;
7. the paper's comparison: full fine-tuning of the original (unexpanded) model, same data, steps and lr;
8. ``python -m megatron_llamapro.cli.convert_megatron_to_hf``: export the trained expanded model to HF,
   load it with transformers, check its domain loss against the trainer's and generate a little text;
9. the paper's second stage: ``preprocess_data --chat`` on synthetic chat samples, then
   ``python -m megatron_llamapro.pretrain --sft`` from the post-pretrained model (every parameter, loss
   on the answers only), exported to HF and asked held-out questions in LLaMA-2's [INST] format;
10. write ``OUT/report.md`` (with ``OUT/loss_curves.png``) and ``OUT/summary.json``.

Every tool step runs the installed package's entry point as a subprocess in OUT, exactly as a user
would (no file of the source checkout is needed); the command lines are printed and kept in the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_llamapro.errors import EXIT_FAILED, entry_point
from megatron_llamapro.quickstart.report import fmt
from megatron_llamapro.quickstart.runner import StepFailed, log
from megatron_llamapro.quickstart.sizes import SIZE_KEYS, SIZES, parse_override
from megatron_llamapro.quickstart.steps import Quickstart


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="python -m megatron_llamapro.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quickstart", help="output directory (default: quickstart)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="tiny (default, < 10 min on 2 CPU cores) or smoke (the test's size, ~2 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the size, e.g. --set train_iters=200 --set lr=3e-4 "
                             f"(keys: {', '.join(SIZE_KEYS)})")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        try:
            key, value = parse_override(item)
        except ValueError as exc:
            parser.error(str(exc))
        overrides[key] = value
    return args, overrides


@entry_point(prog="quickstart")
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    quickstart = Quickstart(out, args.size, args.seed, overrides)
    log(f"size {args.size}, output {out}")
    try:
        quickstart.make_data()
        quickstart.preprocess()
        quickstart.train_base()
        quickstart.convert_and_expand()
        quickstart.post_pretrain("run_expand", "expanded", [])
        quickstart.post_pretrain("run_full", "base_mg", ["--train-all"])
        quickstart.export_and_check()
        quickstart.instruction_tune()
        report = quickstart.write_report(time.time() - start)
    except StepFailed as exc:
        print(f"[quickstart] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    g = quickstart.summary["comparison"]["general"]
    d = quickstart.summary["comparison"]["domain"]
    log(f"general loss: base {fmt(g['base'])}, expansion {fmt(g['expand'])}, full FT {fmt(g['full_ft'])}")
    log(f"domain loss:  base {fmt(d['base'])}, expansion {fmt(d['expand'])}, full FT {fmt(d['full_ft'])}")
    sft = quickstart.summary["instruct"]
    log(f"instruction tuning: chat loss {fmt(sft['valid_loss']['chat'][0])} -> {fmt(sft['valid_loss']['chat'][1])}, "
        f"{sft['right']}/{sft['asked']} held-out questions answered right")
    log(f"done in {time.time() - start:.0f} s; report: {report}")
    return 0

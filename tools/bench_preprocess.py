"""Preprocessing throughput on a generated corpus with a sentencepiece tokenizer.

    python tools/bench_preprocess.py [--docs 20000] [--vocab 4000] [--workers 1 2]

Writes a synthetic JSONL corpus (half general prose, half domain text), trains a LLaMA-like
sentencepiece model on it, then preprocesses it once per worker count and prints tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.errors import entry_point, run  # noqa: E402


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents of each corpus")
    parser.add_argument("--vocab", type=int, default=1500,
                        help="the synthetic corpora support about 1590 pieces at most")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per setting")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_llamapro.data import synthetic
    from megatron_llamapro.data.indexed import PreprocessConfig, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = (synthetic.general_corpus(args.docs, seed=0)
                 + synthetic.domain_corpus(args.docs, seed=0))
        corpus = synthetic.write_jsonl(texts, tmp / "corpus.jsonl")
        size_mb = corpus.stat().st_size / 1e6
        model = synthetic.train_sentencepiece(texts[::10], args.vocab, tmp)
        print(f"corpus: {len(texts)} docs, {size_mb:.1f} MB; sentencepiece vocab {args.vocab}")
        for workers in args.workers:
            best = None
            for repeat in range(args.repeats):
                stats = preprocess(PreprocessConfig(
                    [corpus], tmp / f"out{workers}_{repeat}", "sentencepiece", model,
                    workers=workers, append_eod=True, progress=False))
                if best is None or stats.seconds < best.seconds:
                    best = stats
            print(f"workers={workers}: {best.tokens} tokens in {best.seconds:.2f} s = "
                  f"{best.tokens_per_second:,.0f} tokens/s, {size_mb / best.seconds:.1f} MB/s, "
                  f"{best.documents / best.seconds:,.0f} docs/s")
    return 0


if __name__ == "__main__":
    run(main)

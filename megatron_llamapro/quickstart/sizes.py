"""The quickstart's size presets and `--set KEY=VALUE` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    """Everything that differs between the quickstart sizes."""
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    new_blocks: int
    seq_length: int
    # data (documents)
    general_docs: int
    domain_docs: int
    valid_docs: int
    base_domain_fraction: float  # share of domain-like documents in the base model's training mix
    # base model pretraining from random initialisation
    base_steps: int
    base_batch: int
    base_lr: float
    # LLaMA Pro post-pretraining and the full fine-tuning baseline (same recipe for both)
    train_iters: int
    micro_batch: int
    global_batch: int
    lr: float
    min_lr: float
    eval_interval: int
    eval_iters: int
    tp: int
    pp: int
    # instruction tuning of the expanded, post-pretrained model (--sft), all parameters
    sft_train_samples: int = 3000
    sft_valid_samples: int = 200
    sft_iters: int = 80
    sft_lr: float = 5e-4
    sft_seq_length: int = 128


SIZES = {
    # < 10 minutes on 2 CPU cores.
    "tiny": Size(vocab=512, hidden=128, ffn=352, layers=4, heads=4, new_blocks=2, seq_length=64,
                 general_docs=12000, domain_docs=4000, valid_docs=300, base_domain_fraction=0.05,
                 base_steps=500, base_batch=32, base_lr=3e-3,
                 train_iters=300, micro_batch=4, global_batch=8, lr=1e-3, min_lr=1e-4,
                 eval_interval=25, eval_iters=8, tp=1, pp=2),
    # The test's size: a few steps, smallest shapes (< ~2.5 minutes).
    "smoke": Size(vocab=400, hidden=64, ffn=176, layers=4, heads=4, new_blocks=2, seq_length=64,
                  general_docs=3000, domain_docs=1000, valid_docs=120, base_domain_fraction=0.05,
                  base_steps=150, base_batch=32, base_lr=5e-3,
                  train_iters=30, micro_batch=4, global_batch=8, lr=3e-3, min_lr=3e-4,
                  eval_interval=10, eval_iters=4, tp=1, pp=2,
                  sft_train_samples=600, sft_valid_samples=64, sft_iters=12, sft_lr=1e-3),
}

SIZE_KEYS = tuple(f.name for f in dataclasses.fields(Size))


def parse_override(item: str) -> tuple[str, int | float]:
    """'KEY=VALUE' -> (key, number of the field's type); ValueError with the reason otherwise."""
    types = {f.name: f.type for f in dataclasses.fields(Size)}
    key, sep, value = item.partition("=")
    if not sep or key not in types:
        raise ValueError(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(types)}")
    try:
        return key, float(value) if types[key] in ("float", float) else int(value)
    except ValueError:
        raise ValueError(f"--set {item}: {value!r} is not a number") from None


def resolve_size(name: str, overrides: dict | None = None) -> Size:
    return dataclasses.replace(SIZES[name], **(overrides or {}))

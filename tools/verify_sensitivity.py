#!/usr/bin/env python3
"""How sharp is `--verify`? Healthy conversions vs. injected layout bugs, on random LLaMA shapes.

    python tools/verify_sensitivity.py [--shape small|medium|large] [--layers N] [--logit-scale S]

Builds a random HF LLaMA of the shape (with transformers), converts it to Megatron (TP1 PP1, legacy),
and runs the converters' verification on the healthy checkpoint and on copies with one layout bug
each: a query head swapped with its group's key head in layer 0, gate/up halves of layer 0's fused
fc1 swapped, and two query heads swapped. Prints each result's max |logit diff|, the reference's
max |logit|, their ratio (what --verify-tolerance bounds) and the verdict. `--logit-scale` multiplies
the output layer so logits reach the magnitudes of trained models (random models' are ~1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro.errors import entry_point, run  # noqa: E402

SHAPES = {  # hidden, ffn, heads, kv heads, layers, vocab
    "small": (256, 688, 4, 2, 4, 4000),
    "medium": (1024, 2752, 16, 4, 4, 32000),
    "large": (2048, 5504, 16, 4, 8, 32000),
}


def make_random_hf(out: Path, hidden: int, ffn: int, heads: int, kv: int, layers: int, vocab: int,
                   logit_scale: float, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(out, safe_serialization=True)
    return out


def inject(ckpt: Path, bug: str, heads: int, kv: int, hidden: int) -> None:
    """Rewrite layer 0 of a TP1 PP1 legacy checkpoint with one layout bug."""
    import torch

    file = next(ckpt.glob("release/mp_rank_00/model_optim_rng.pt"))
    state = torch.load(file, map_location="cpu", weights_only=False)
    model = state["model"]
    head_dim = hidden // heads
    q_per_group = heads // kv
    qkv = model["decoder.layers.0.self_attention.linear_qkv.weight"]
    rows = lambda i: slice(i * head_dim, (i + 1) * head_dim)  # noqa: E731
    if bug == "q<->k head":
        q0, k0 = qkv[rows(0)].clone(), qkv[rows(q_per_group)].clone()
        qkv[rows(0)], qkv[rows(q_per_group)] = k0, q0
    elif bug == "q head 0<->1":
        a, b = qkv[rows(0)].clone(), qkv[rows(1)].clone()
        qkv[rows(0)], qkv[rows(1)] = b, a
    elif bug == "gate<->up":
        fc1 = model["decoder.layers.0.mlp.linear_fc1.weight"]
        half = fc1.shape[0] // 2
        gate, up = fc1[:half].clone(), fc1[half:].clone()
        fc1[:half], fc1[half:] = up, gate
    else:
        raise ValueError(bug)
    torch.save(state, file)
    # a deliberate edit, not damage: record the file's new checksum so the readers accept it
    from megatron_llamapro.checkpoint.integrity import record_checksums

    record_checksums(file.parents[1])


@entry_point(prog="verify_sensitivity")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--logit-scale", type=float, default=20.0)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per result")
    args = parser.parse_args(argv)
    import functools
    import shutil

    from megatron_llamapro.checkpoint.convert import write_checkpoint
    from megatron_llamapro.checkpoint.hf import HFSource
    from megatron_llamapro.checkpoint.layout import Layout
    from megatron_llamapro.checkpoint.open import open_checkpoint
    from megatron_llamapro.checkpoint.verify import DEFAULT_TOLERANCE, compare

    hidden, ffn, heads, kv, layers, vocab = SHAPES[args.shape]
    layers = args.layers or layers
    with tempfile.TemporaryDirectory(prefix="verify-sensitivity-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        hf = make_random_hf(tmp / "hf", hidden, ffn, heads, kv, layers, vocab, args.logit_scale)
        healthy = tmp / "megatron"
        write_checkpoint(functools.partial(HFSource, hf), healthy, "torch", Layout())
        print(f"shape {args.shape}: hidden {hidden}, ffn {ffn}, heads {heads}/{kv}, {layers} layers, "
              f"vocab {vocab}, logit scale {args.logit_scale} (built + converted in "
              f"{time.perf_counter() - start:.0f} s); default tolerance {DEFAULT_TOLERANCE:.0e} relative")
        failures = 0
        for bug in ("none", "q<->k head", "q head 0<->1", "gate<->up"):
            ckpt = healthy
            if bug != "none":
                ckpt = tmp / "buggy"
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.copytree(healthy, ckpt)
                inject(ckpt, bug, heads, kv, hidden)
            with open_checkpoint(ckpt) as source:
                result = compare(hf, source)
            expected_ok = bug == "none"
            failures += result.ok != expected_ok
            print(f"  {bug:>13}: {result.describe()}"
                  f"{'' if result.ok == expected_ok else '   <-- WRONG VERDICT'}")
            if args.json:
                print(json.dumps({"shape": args.shape, "bug": bug, "max_abs_diff": result.max_abs_diff,
                                  "reference_max_abs": result.reference_max_abs,
                                  "relative": result.relative_diff, "ok": result.ok}))
    return 1 if failures else 0


if __name__ == "__main__":
    run(main)

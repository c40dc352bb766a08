"""Apply an expansion plan to any checkpoint: an expanded view of its tensors, written by convert.

`ExpandedSource` wraps the source of the original checkpoint (HF, legacy or torch_dist) and
answers for the expanded model: a new block's tensor is its source layer's, except the two
residual-output projections (weight_map.IDENTITY_ZEROED, and their biases if a model had any),
which are zero (every other tensor of the block, Qwen2's q/k/v biases and Qwen3's q/k norms
included, is its source layer's: with zero outputs the block is the identity whatever they hold);
original layers are renumbered; embedding, final norm and output layer pass
through. Asked for a TP shard at the stored TP, a legacy source hands over its stored shard, so an
output shard whose layers all come from one input shard opens only that input file.

Manifest: arch.num_layers becomes L' (per-layer lists in the HF config are expanded the same way)
and an `Expansion` is appended. Expansions accumulate: every stored expansion's `new_layers` (and
the keys of its `sources`) are global indices of the CURRENT model, so an earlier expansion's
indices are renumbered when a later one inserts blocks below them; the values of `sources` stay
indices of the model that expansion started from. `Manifest.trainable_layers` is the newest
expansion's blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from megatron_llamapro.arch import LlamaArch, torch_dtype
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.layout import Layout
from megatron_llamapro.checkpoint.manifest import Expansion, Manifest
from megatron_llamapro.checkpoint.open import open_checkpoint
from megatron_llamapro.checkpoint.source import TensorSource
from megatron_llamapro.expansion.plan import ExpansionPlan, PlanError, check_balance

# Per-layer suffixes a new block gets as zeros: the output projections and any bias they carry.
ZEROED_SUFFIXES = weight_map.IDENTITY_ZEROED + tuple(
    s[: -len(".weight")] + ".bias" for s in weight_map.IDENTITY_ZEROED)


def is_zeroed(suffix: str) -> bool:
    return suffix in ZEROED_SUFFIXES


def expansion_record(plan: ExpansionPlan) -> Expansion:
    return Expansion(original_num_layers=plan.original_num_layers, new_layers=plan.new_layers,
                     sources=plan.sources, placement=plan.placement)


def renumber_expansion(expansion: Expansion, plan: ExpansionPlan) -> Expansion:
    """An earlier expansion with its layer indices moved into the numbering after `plan`."""
    where = plan.renumbering
    return Expansion(original_num_layers=expansion.original_num_layers,
                     new_layers=[where[i] for i in expansion.new_layers],
                     sources={where[k]: v for k, v in expansion.sources.items()},
                     placement=expansion.placement)


def expand_arch(arch: LlamaArch, plan: ExpansionPlan) -> LlamaArch:
    """The architecture with L' layers; HF config lists with one entry per layer are expanded too
    (each new block takes its source layer's entry)."""
    extra = {}
    for key, value in arch.extra_hf.items():
        if isinstance(value, list) and len(value) == plan.original_num_layers:
            value = [value[o] for o in plan.origins]
        extra[key] = value
    return dataclasses.replace(arch, num_layers=plan.num_layers, extra_hf=extra)


def expanded_manifest(manifest: Manifest, plan: ExpansionPlan) -> Manifest:
    if manifest.arch.num_layers != plan.original_num_layers:
        raise PlanError(f"the plan expands {plan.original_num_layers} layers but the checkpoint has "
                         f"{manifest.arch.num_layers}")
    earlier = [renumber_expansion(e, plan) for e in manifest.expansions]
    return manifest.replace(arch=expand_arch(manifest.arch, plan),
                            expansions=earlier + [expansion_record(plan)])


class ExpandedSource(TensorSource):
    """The expanded model's tensors, read from the original checkpoint's source on demand."""

    def __init__(self, base: TensorSource, plan: ExpansionPlan):
        self.base = base
        self.plan = plan
        self.path = base.path
        self.manifest = expanded_manifest(base.manifest, plan)

    @property
    def files_opened(self) -> list:
        return getattr(self.base, "files_opened", [])

    def _origin(self, name: str) -> tuple[str, bool]:
        """(name in the original checkpoint, whether the tensor is zero in the expanded model)."""
        layer = weight_map.layer_of(name)
        if layer is None:
            return name, False
        if not 0 <= layer < self.plan.num_layers:
            raise KeyError(f"{name}: layer {layer} out of range for {self.plan.num_layers} layers")
        zero = self.plan.new[layer] and is_zeroed(weight_map.layer_suffix(name))
        return weight_map.with_layer(name, self.plan.origins[layer]), zero

    def full(self, name: str) -> torch.Tensor:
        original, zero = self._origin(name)
        tensor = self.base.full(original)
        return torch.zeros_like(tensor) if zero else tensor

    def get(self, name: str, tp_rank: int = 0, tp: int = 1,
            padded_vocab: int | None = None) -> torch.Tensor:
        original, zero = self._origin(self.resolve(name))
        tensor = self.base.get(original, tp_rank, tp, padded_vocab)
        return torch.zeros_like(tensor) if zero else tensor

    def tokenizer_dir(self) -> Path | None:
        return self.base.tokenizer_dir()

    def close(self) -> None:
        self.base.close()


def open_expanded(path: str | Path, plan: ExpansionPlan) -> ExpandedSource:
    """Open a checkpoint of any kind and expand it (module level, so a partial of it pickles)."""
    return ExpandedSource(open_checkpoint(Path(path)), plan)


def expanded_source_factory(path: str | Path, plan: ExpansionPlan):
    """A picklable `make_source` for convert.write_checkpoint (works with --workers N, spawn)."""
    return functools.partial(open_expanded, str(path), plan)


def default_target(manifest: Manifest) -> tuple[str, Layout]:
    """Output format and layout when none are asked for: the input's."""
    return manifest.format, manifest.layout


def expand_checkpoint(src: str | Path, out: str | Path, plan: ExpansionPlan, fmt: str | None = None,
                      layout: Layout | None = None, dtype: str | None = None, overwrite: bool = False,
                      workers: int = 1, allow_non_finite: bool = False) -> dict:
    """Write the expanded checkpoint; returns convert.write_checkpoint's summary.

    fmt / layout default to the input's; the plan must balance over the layout (PlanError
    otherwise). summary["files"] maps each legacy output file to the input
    files read to write it; summary["manifest"] is the written manifest.
    """
    from megatron_llamapro.checkpoint.convert import write_checkpoint

    make_source = expanded_source_factory(src, plan)
    if fmt is None or layout is None:
        with open_checkpoint(Path(src)) as base:
            default_fmt, default_layout = default_target(base.manifest)
        fmt = fmt or default_fmt
        layout = layout or (default_layout if fmt != "hf" else Layout())
    check_balance(plan, layout.pp, layout.vpp)
    return write_checkpoint(make_source, Path(out), fmt, layout, dtype=dtype, overwrite=overwrite,
                            workers=workers, allow_non_finite=allow_non_finite)


# ---- checking an expansion: logits of the original and the expanded model -----------------------

def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def model_logits(source: TensorSource, tokens: torch.Tensor, round_to: str | None = None) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab] of a checkpoint's model: one process, TP=1, PP=1, on CPU
    (or the current GPU when one is in use). `round_to` (bf16 | fp16) rounds the weights through
    that dtype first (a no-op for weights already representable in it)."""
    from megatron_llamapro.checkpoint.load import load_source_into_model
    from megatron_llamapro.model import ModelOptions, build_model
    from megatron_llamapro.runtime.distributed import single_process_megatron
    from megatron_llamapro.pipeline import forward_only_logits

    arch = source.arch
    with single_process_megatron():
        padded = arch.padded_vocab_size(1, source.manifest.make_vocab_size_divisible_by)
        chunks = build_model(arch, ModelOptions(params_dtype="fp32", padded_vocab_size=padded))
        load_source_into_model(chunks, source, padded)
        with torch.no_grad():
            for chunk in chunks:
                chunk.eval()
                if round_to not in (None, "fp32"):
                    for param in chunk.parameters():
                        param.copy_(param.to(torch_dtype(round_to)).to(param.dtype))
        device = next(chunks[0].parameters()).device
        logits = forward_only_logits(chunks, tokens.to(device))
    return logits[..., : arch.vocab_size].float().cpu()


def compare_logits(original: TensorSource, expanded: TensorSource, seq: int = 16,
                   batch: int = 2, round_to: str | None = None) -> tuple[bool, float]:
    """(bit-identical, max |difference|) of the two models' fp32 logits on the same sample tokens.

    Pass the expanded checkpoint's dtype as `round_to` when it differs from the original's: both
    models' weights are then rounded through it, so the check measures the expansion alone."""
    if original.arch.vocab_size != expanded.arch.vocab_size:
        raise PlanError("vocabulary sizes differ between the original and the expanded checkpoint")
    seq = min(seq, original.arch.max_position_embeddings)
    tokens = sample_tokens(original.arch.vocab_size, batch, seq)
    a = model_logits(original, tokens, round_to)
    b = model_logits(expanded, tokens, round_to)
    return torch.equal(a, b), float((a - b).abs().max())

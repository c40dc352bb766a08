"""Megatron-LM's legacy torch checkpoint format.

    ROOT/latest_checkpointed_iteration.txt        "release" or the iteration
    ROOT/{release|iter_0000100}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
each file: {"model" | "model0", "model1", ...: state dict with stage-local layer indices,
            "checkpoint_version": 3.0, "iteration": N, "args": argparse.Namespace}
Keys are those of megatron-core GPTModel with the Transformer Engine spec, so a GPU run loads
them strictly; `copy_stored_tensors` maps them to the local spec for CPU runs.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import torch

from megatron_llamapro.arch import LlamaArch, torch_dtype
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.weight_map import local_spec_name
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, chunk_key, merge_tp, vpp_of_chunk_keys
from megatron_llamapro.checkpoint.manifest import Manifest, tokenizer_dir
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import iteration_dir, mp_rank_dir, parse_mp_rank_dir, read_tracker

CHECKPOINT_VERSION = 3.0
FILE_NAME = "model_optim_rng.pt"

torch.serialization.add_safe_globals([argparse.Namespace])


def megatron_args(manifest: Manifest, iteration: int | str = 0, seq_length: int | None = None) -> argparse.Namespace:
    """The argparse.Namespace Megatron-LM reads to rebuild a LLaMA model from a checkpoint."""
    arch, layout = manifest.arch, manifest.layout
    tokenizer_type = {"sentencepiece": "Llama2Tokenizer", "hf": "HuggingFaceTokenizer"}.get(
        manifest.tokenizer_type or "", None)
    return argparse.Namespace(
        **arch.megatron_fields("args"),
        seq_length=seq_length or arch.max_position_embeddings,
        padded_vocab_size=manifest.padded_vocab_size,
        make_vocab_size_divisible_by=manifest.make_vocab_size_divisible_by,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=(
            StagePlacement(arch.num_layers, layout).layers_per_chunk if layout.vpp else None),
        bf16=manifest.dtype == "bf16",
        fp16=manifest.dtype == "fp16",
        params_dtype=torch_dtype(manifest.dtype),
        tokenizer_type=tokenizer_type,
        tokenizer_model="tokenizer" if tokenizer_type else None,
        iteration=iteration,
        transformer_impl="transformer_engine",
        use_mcore_models=True,
    )


def arch_from_args(args: argparse.Namespace, source: str) -> tuple[LlamaArch, Manifest]:
    """Rebuild architecture and manifest from a Megatron-LM checkpoint that has no llamapro.json."""
    try:
        kv = args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads
        arch = LlamaArch(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
            num_kv_heads=kv, vocab_size=getattr(args, "vocab_size", None) or args.padded_vocab_size,
            head_dim=getattr(args, "kv_channels", None),
            rope_theta=float(getattr(args, "rotary_base", 10000)),
            rms_norm_eps=float(getattr(args, "norm_epsilon", 1e-5)),
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        )
    except AttributeError as exc:
        raise CheckpointError(f"{source}: args lack a field needed to rebuild the model ({exc})") from None
    layout = Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    getattr(args, "virtual_pipeline_model_parallel_size", None))
    dtype = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return arch, Manifest(arch=arch, padded_vocab_size=args.padded_vocab_size,
                          make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128),
                          layout=layout, dtype=dtype, format="torch")


def model_keys(chunk_state: dict) -> list[str]:
    return [k for k in chunk_state if not k.endswith("._extra_state")]


class LegacySource(TensorSource):
    """Reads a legacy checkpoint lazily, file by file (memory-mapped)."""

    def __init__(self, path: Path, iteration: int | str | None = None, cache_files: int | None = None):
        self.path = Path(path)
        try:
            self.iteration = read_tracker(self.path) if iteration is None else iteration
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
        self.dir = iteration_dir(self.path, self.iteration)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: missing (named by {self.path}/latest_checkpointed_iteration.txt)")
        ranks = {}
        for entry in self.dir.iterdir():
            rank = parse_mp_rank_dir(entry.name)
            if rank is not None:
                ranks[rank] = entry / FILE_NAME
        if not ranks:
            raise CheckpointError(f"{self.dir}: no mp_rank_* directories")
        manifest = Manifest.read(self.path)
        first = self._load(ranks[min(ranks)])
        if manifest is None:
            if "args" not in first:
                raise CheckpointError(f"{ranks[min(ranks)]}: no llamapro.json and no args to rebuild the model")
            _, manifest = arch_from_args(first["args"], str(ranks[min(ranks)]))
        tp = 1 + max(t for t, _ in ranks)
        pp = 1 + max(p for _, p in ranks)
        layout = Layout(tp, pp, vpp_of_chunk_keys(first))
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in ranks or not ranks[(t, p)].is_file():
                    raise CheckpointError(
                        f"{self.dir / mp_rank_dir(t, p, pp) / FILE_NAME}: missing shard of a {layout.describe()} checkpoint")
        self.manifest = manifest.replace(layout=layout, format="torch")
        self.placement = StagePlacement(self.arch.num_layers, layout)
        self._ranks = ranks
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._cache_size = cache_files or tp
        self.files_opened: list[Path] = []

    def _load(self, file: Path) -> dict:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing") from None
        except Exception as exc:  # torch raises a variety of errors for damaged zip archives
            raise CheckpointError(f"{file}: unreadable checkpoint file ({type(exc).__name__}: {exc})") from None

    def _file(self, tp_rank: int, stage: int) -> dict:
        key = (tp_rank, stage)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        file = self._ranks[key]
        self.files_opened.append(file)
        state = self._load(file)
        self._cache[key] = state
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return state

    def _stored(self, name: str, tp_rank: int) -> torch.Tensor:
        stage, chunk = self.placement.unit_of(name)
        state = self._file(tp_rank, stage)
        key = chunk_key(chunk, self.manifest.layout.vpp)
        try:
            return state[key][self.placement.local_name(name)]
        except KeyError:
            raise CheckpointError(
                f"{self._ranks[(tp_rank, stage)]}: tensor {self.placement.local_name(name)} missing in {key}") from None

    def full(self, name: str) -> torch.Tensor:
        rule = weight_map.split_rule(name)
        shards = [self._stored(name, r) for r in range(self.manifest.layout.tp)]
        return merge_tp(shards, rule)

    def get(self, name: str, tp_rank: int = 0, tp: int = 1, padded_vocab: int | None = None) -> torch.Tensor:
        name = self.resolve(name)
        stored_padded = self.manifest.padded_vocab_size
        same_vocab = padded_vocab in (None, stored_padded) or weight_map.split_rule(name) is not weight_map.Split.VOCAB
        if tp == self.manifest.layout.tp and same_vocab:
            return self._stored(name, tp_rank)  # the stored shard as is: opens only its own file
        return super().get(name, tp_rank, tp, padded_vocab)

    def tokenizer_dir(self) -> Path | None:
        return tokenizer_dir(self.path)

    def close(self) -> None:
        self._cache.clear()


def te_state_dict_entries(local_names: list[str]) -> list[str]:
    """The `_extra_state` keys a TE-spec GPTModel has for the given layer-local tensor names."""
    layers = sorted({weight_map.layer_of(n) for n in local_names if weight_map.layer_of(n) is not None})
    extra = [f"decoder.layers.{i}.{module}._extra_state" for i in layers for module in weight_map.TE_EXTRA_STATE]
    if weight_map.OUTPUT_LAYER in local_names:
        extra.append("output_layer._extra_state")
    return extra


def own_storage(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """`tensor`, copied only if it is a view into a larger storage (torch.save writes whole storages)
    or shares its storage with a tensor already in the file (`seen`: storage pointers so far).

    Fresh tensors (read from HF files, fused, merged) are kept as they are: an unconditional clone
    doubled the largest tensor's memory at every step and added copy time.
    """
    storage = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size() \
            or storage.data_ptr() in seen:
        tensor = tensor.clone()
    seen.add(tensor.untyped_storage().data_ptr())
    return tensor


def write_legacy_file(source: TensorSource, out: Path, manifest: Manifest, tp_rank: int, stage: int,
                      iteration: int | str, dtype: torch.dtype, bar=None) -> Path:
    """Write one mp_rank file of `manifest.layout` from `source` (tensors fetched per chunk)."""
    layout = manifest.layout
    placement = StagePlacement(manifest.arch.num_layers, layout)
    checkpoint = {}
    seen: set[int] = set()
    for chunk in range(layout.chunks_per_stage):
        state = {}
        for name in placement.canonical_names(stage, chunk, manifest.arch.tie_word_embeddings,
                                                  manifest.arch):
            tensor = source.get(name, tp_rank, layout.tp, manifest.padded_vocab_size)
            tensor = own_storage(tensor.to(dtype).contiguous(), seen)
            state[placement.local_name(name)] = tensor
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())
        for key in te_state_dict_entries(list(state)):
            state[key] = None
        checkpoint[chunk_key(chunk, layout.vpp)] = state
    checkpoint["checkpoint_version"] = CHECKPOINT_VERSION
    checkpoint["iteration"] = 0 if iteration == "release" else int(iteration)
    checkpoint["args"] = megatron_args(manifest, iteration)
    file = Path(out) / mp_rank_dir(tp_rank, stage, layout.pp) / FILE_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(FILE_NAME + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, file)
    return file


def uses_te_spec(module: torch.nn.Module) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in module.state_dict())


def copy_stored_tensors(module: torch.nn.Module, items, where: str, strict: bool = True) -> None:
    """Copy (stored TE-spec key, tensor) pairs into a module built with either spec, one at a time.

    Keys are the module's own (stage-local) names; `_extra_state` entries are skipped. With
    `strict`, every module tensor must be filled.
    """
    own = module.state_dict()
    rename = (lambda k: k) if uses_te_spec(module) else local_spec_name
    filled = set()
    with torch.no_grad():
        for stored_key, tensor in items:
            if tensor is None or stored_key.endswith("._extra_state"):
                continue
            key = rename(stored_key)
            if key not in own:
                raise CheckpointError(f"{where}: the model has no tensor {key} (stored as {stored_key})")
            own[key].copy_(tensor)
            filled.add(key)
    missing = sorted(k for k in own if not k.endswith("._extra_state") and k not in filled)
    if strict and missing:
        raise CheckpointError(f"{where}: model tensors not in the checkpoint: {missing[:4]}"
                              + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))

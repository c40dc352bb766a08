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
import pickle
from collections import OrderedDict
from pathlib import Path

import torch

from megatron_llamapro.arch import torch_dtype
from megatron_llamapro.checkpoint import weight_map
from megatron_llamapro.checkpoint.weight_map import local_spec_name
from megatron_llamapro.checkpoint.integrity import check_file, check_finite, check_folder
from megatron_llamapro.checkpoint.layout import Layout, StagePlacement, chunk_key, merge_tp, vpp_of_chunk_keys
from megatron_llamapro.checkpoint.manifest import (
    Manifest,
    detect_tokenizer_type,
    manifest_from_megatron_args,
    stored_tokenizer,
    tokenizer_dir,
)
from megatron_llamapro.checkpoint.source import CheckpointError, TensorSource
from megatron_llamapro.checkpoint.tracker import iteration_dir, mp_rank_dir, parse_mp_rank_dir, read_tracker

CHECKPOINT_VERSION = 3.0
FILE_NAME = "model_optim_rng.pt"

torch.serialization.add_safe_globals([argparse.Namespace])


def megatron_args(manifest: Manifest, iteration: int | str = 0, seq_length: int | None = None) -> argparse.Namespace:
    """The argparse.Namespace Megatron-LM reads from a checkpoint, with its field names.

    Every field that Megatron-LM's `load_args_from_checkpoint`, `check_checkpoint_args`,
    `load_checkpoint` and tools/checkpoint loader_base/saver_base read from the stored args (see
    tests/test_megatron_lm.py for the list and who reads what), and only types its weights_only
    torch.load allows. `tokenizer_model` is None, as Megatron-LM's own saver writes it: a stored
    path would override the user's --tokenizer-model under --use-checkpoint-args.
    """
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
        expert_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        bf16=manifest.dtype == "bf16",
        fp16=manifest.dtype == "fp16",
        params_dtype=torch_dtype(manifest.dtype),
        tokenizer_type=tokenizer_type,
        tokenizer_model=None,
        iteration=0 if iteration == "release" else int(iteration),
        consumed_train_samples=0,
        skipped_train_samples=0,
        consumed_valid_samples=0,
        ckpt_format="torch_dist" if manifest.format == "torch_dist" else "torch",
        transformer_impl="transformer_engine",
        use_mcore_models=True,
    )


def load_checkpoint_file(file: Path, mmap: bool = True) -> dict:
    """torch.load with weights_only, as Megatron-LM loads (torch >= 2.6).

    Our files need only argparse.Namespace allowed; Megatron-LM's args also hold megatron-core
    classes (AttnBackend, ...), which `import megatron.core` registers as safe: done only when a
    file needs it, since that import costs seconds.
    """
    try:
        return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:
        import megatron.core  # noqa: F401  (registers its safe globals)

        return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)


def model_keys(chunk_state: dict) -> list[str]:
    return [k for k in chunk_state if not k.endswith("._extra_state")]


def _check_num_layers(manifest: Manifest, args, file: Path) -> None:
    """llamapro.json and the shards' stored args must describe the same depth."""
    stored = getattr(args, "num_layers", None)
    if stored is not None and int(stored) != manifest.arch.num_layers:
        raise CheckpointError(f"{file}: args.num_layers is {stored}, but the checkpoint's llamapro.json says "
                              f"num_layers {manifest.arch.num_layers}")


class LegacySource(TensorSource):
    """Reads a legacy checkpoint lazily, file by file (memory-mapped)."""

    def __init__(self, path: Path, iteration: int | str | None = None, cache_files: int | None = None,
                 tokenizer: Path | None = None):
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
        # Our tokenizer/ folder, else --tokenizer-model, else a Megatron-LM args.tokenizer_model found here.
        self._tokenizer = tokenizer_dir(self.path) or tokenizer or (
            stored_tokenizer(first.get("args")) if manifest is None else None)
        if manifest is None:
            manifest = manifest_from_megatron_args(first.get("args"), str(ranks[min(ranks)]), "torch", self._tokenizer)
        elif manifest.tokenizer_type is None and self._tokenizer is not None:
            manifest = manifest.replace(tokenizer_type=detect_tokenizer_type(self._tokenizer))
        args = first.get("args")
        tp = max(1 + max(t for t, _ in ranks), getattr(args, "tensor_model_parallel_size", None) or 1)
        pp = max(1 + max(p for _, p in ranks), getattr(args, "pipeline_model_parallel_size", None) or 1)
        layout = Layout(tp, pp, vpp_of_chunk_keys(first))
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in ranks or not ranks[(t, p)].is_file():
                    raise CheckpointError(
                        f"{self.dir / mp_rank_dir(t, p, pp) / FILE_NAME}: missing shard of a {layout.describe()} checkpoint")
        _check_num_layers(manifest, args, ranks[min(ranks)])
        check_folder(self.dir, content=False)  # sizes now; each file's checksum when it is loaded
        self.manifest = manifest.replace(layout=layout, format="torch")
        self.placement = StagePlacement(self.arch.num_layers, layout)
        self._ranks = ranks
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._cache_size = cache_files or tp
        self.files_opened: list[Path] = []

    def _load(self, file: Path) -> dict:
        check_file(self.dir, file)
        try:
            return load_checkpoint_file(file)
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
        local = self.placement.local_name(name)
        try:
            tensors = state[key]
            # Megatron-LM with --transformer-impl local names the fused norms input_/pre_mlp_layernorm.
            return tensors[local] if local in tensors else tensors[local_spec_name(local)]
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
        return self._tokenizer

    def close(self) -> None:
        self._cache.clear()


def te_state_dict_entries(local_names: list[str]) -> dict[str, torch.Tensor | None]:
    """The `_extra_state` entries megatron-core 0.16.1's TE-spec GPTModel has for the given stage-local
    tensor names, with the values a non-FP8 model writes: Transformer Engine 2.x modules (the fused
    norm+linear layers, the row-parallel linears, core attention, the final RMSNorm) an empty uint8
    tensor, megatron's own ColumnParallelLinear (output_layer) None. Both load under TE's and
    megatron's set_extra_state and under a weights_only torch.load."""
    layers = sorted({weight_map.layer_of(n) for n in local_names if weight_map.layer_of(n) is not None})
    keys = [f"decoder.layers.{i}.{module}._extra_state" for i in layers for module in weight_map.TE_EXTRA_STATE]
    if weight_map.FINAL_NORM in local_names:
        keys.append("decoder.final_layernorm._extra_state")
    entries: dict[str, torch.Tensor | None] = {key: torch.empty(0, dtype=torch.uint8) for key in keys}
    if weight_map.OUTPUT_LAYER in local_names or weight_map.FINAL_NORM in local_names:
        # output_layer exists on the last stage even when tied (then it has no weight of its own)
        entries["output_layer._extra_state"] = None
    return entries


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
                      iteration: int | str, dtype: torch.dtype, bar=None, allow_non_finite: bool = False) -> Path:
    """Write one mp_rank file of `manifest.layout` from `source` (tensors fetched per chunk); a
    NaN/Inf tensor is refused by name unless `allow_non_finite`."""
    layout = manifest.layout
    placement = StagePlacement(manifest.arch.num_layers, layout)
    checkpoint = {}
    seen: set[int] = set()
    for chunk in range(layout.chunks_per_stage):
        state = {}
        for name in placement.canonical_names(stage, chunk, manifest.arch.tie_word_embeddings,
                                                  manifest.arch):
            tensor = source.get(name, tp_rank, layout.tp, manifest.padded_vocab_size)
            if not allow_non_finite:
                check_finite(name, tensor, str(source.path))
            tensor = own_storage(tensor.to(dtype).contiguous(), seen)
            state[placement.local_name(name)] = tensor
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())
        state.update(te_state_dict_entries(list(state)))
        checkpoint[chunk_key(chunk, layout.vpp)] = state
    checkpoint["checkpoint_version"] = CHECKPOINT_VERSION
    checkpoint["iteration"] = 0 if iteration == "release" else int(iteration)  # release: Megatron-LM loads as 0
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
